"""curvdist.io.store and curvdist.io.query: schemas, atomic part files, DuckDB views, resume bookkeeping."""
import datetime
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curvdist.io import query, store, summary


def _one(con, sql):
    """The single value of a query (DuckDB 2 relations have no fetchone)."""
    return con.sql(sql).fetchall()[0][0]


def _layers(run_id="r1", n=3, part=0):
    return [{"run_id": run_id, "layer": f"model.layers.{i}.mlp.up_proj" if part == 0 else f"p{part}.{i}",
             "layer_type": "mlp_up" if i % 2 else "attn_q", "block": i, "family": "llama",
             "m": 8, "n": 4, "alpha": 1.0 + i, "alpha_kron": 2.0, "beta": 2.0, "phi": 0.0, "status": "ok"}
            for i in range(n)]


def test_schema_has_version_column_and_metadata():
    for t in store.TABLES:
        s = store.schema(t)
        assert "schema_version" in s.names and "run_id" in s.names
        assert s.metadata[b"curvdist.schema_version"] == str(store.SCHEMA_VERSION).encode()
    with pytest.raises(ValueError, match="unknown table"):
        store.schema("nope")


def test_to_table_fills_nulls_and_casts():
    t = store.to_table("layers", [{"run_id": "r", "layer": "a", "alpha": 1, "n_valid": 3, "beta": float("nan")}])
    assert t.schema.equals(store.schema("layers"), check_metadata=False)
    row = t.to_pylist()[0]
    assert row["alpha"] == 1.0 and isinstance(row["alpha"], float)
    assert row["beta"] is None and row["block"] is None and row["schema_version"] == store.SCHEMA_VERSION
    # dict of columns and Arrow input give the same table
    cols = store.to_table("directions", {"run_id": ["r", "r"], "layer": ["a", "a"], "k": [1, 2], "h": [1.0, 2.0]})
    again = store.to_table("directions", pa.table({"run_id": ["r", "r"], "layer": ["a", "a"], "k": [1, 2],
                                                   "h": [1.0, 2.0]}))
    assert cols.equals(again)


def test_unknown_and_missing_columns_are_errors():
    with pytest.raises(ValueError, match=r"unknown column\(s\) 'alhpa'.*valid columns: .*alpha"):
        store.to_table("layers", [{"run_id": "r", "layer": "a", "alhpa": 1.0}])
    with pytest.raises(ValueError, match="required column 'layer'"):
        store.to_table("layers", [{"run_id": "r"}])


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = store.write_part(tmp_path, "layers", "r1", "stage0", _layers())
    assert path == tmp_path / "layers" / "run_id=r1" / "stage0.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["stage0.parquet"]
    meta = pq.read_schema(path).metadata
    assert meta[b"curvdist.schema_version"] == str(store.SCHEMA_VERSION).encode()
    assert pq.read_table(path).column("schema_version").to_pylist() == [store.SCHEMA_VERSION] * 3


def test_failed_write_leaves_nothing(tmp_path):
    def boom(p):
        p.write_bytes(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        store.atomic_write(tmp_path / "d" / "x.parquet", boom)
    assert list((tmp_path / "d").iterdir()) == []


def test_write_part_checks_names(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        store.write_part(tmp_path, "layers", "a/b", "p", _layers())
    with pytest.raises(ValueError, match="part_name"):
        store.write_part(tmp_path, "layers", "r1", ".hidden", _layers())
    with pytest.raises(ValueError, match="run_id other than"):
        store.write_part(tmp_path, "layers", "r2", "p", _layers("r1"))


def test_views_sql_and_hidden_files_ignored(tmp_path):
    store.write_part(tmp_path, "layers", "r1", "stage0", _layers())
    store.write_part(tmp_path, "layers", "r1", "stage1", _layers(part=1, n=2))
    store.write_part(tmp_path, "layers", "2024-01-01", "stage0", _layers("2024-01-01"))  # run_id stays VARCHAR
    # a leftover temporary file of a crashed writer, even one that looks like a parquet file
    part = tmp_path / "layers" / "run_id=r1"
    pq.write_table(store.to_table("layers", [{"run_id": "r1", "layer": "ghost"}]), part / ".tmp-stage9.parquet")
    store.write_result(tmp_path, "r1", "stage2", {
        "layers": [{"layer": "a", "layer_type": "other", "status": "ok"}],
        "directions": {"layer": ["a"] * 3, "k": [1, 2, 3], "sigma": [3.0, 2.0, 1.0], "h": [9.0, 4.0, 1.0]}})
    # directions without their commit record (a crash between the two writes) stay invisible
    store.write_part(tmp_path, "directions", "r1", "stage3",
                     {"layer": ["b"] * 2, "k": [1, 2], "sigma": [3.0, 2.0], "h": [5.0, 5.0]})
    store.write_run(tmp_path, "r1", {"created_at": datetime.datetime.now(datetime.timezone.utc),
                                     "config_json": {"top_k": 20}, "status": "done"})
    con = query.open(tmp_path)
    assert _one(con, "SELECT count(*) FROM layers WHERE run_id = 'r1'") == 6
    assert _one(con, "SELECT count(*) FROM layers WHERE layer = 'ghost'") == 0
    assert _one(con, "SELECT count(*) FROM layers WHERE run_id = '2024-01-01'") == 3
    assert _one(con, "SELECT sum(h) FROM directions") == 14.0
    cfg = _one(con, "SELECT config_json FROM runs WHERE run_id = 'r1'")
    assert json.loads(cfg) == {"top_k": 20}
    types = dict(con.sql("SELECT layer_type, avg(alpha) FROM layers WHERE run_id='r1' GROUP BY 1").fetchall())
    assert types == {"attn_q": pytest.approx((1 + 3 + 1) / 3), "mlp_up": pytest.approx((2 + 2) / 2), "other": None}
    assert query.read_run(tmp_path, "r1")["status"] == "done"


def test_a_connection_reads_a_snapshot_of_committed_files(tmp_path):
    """A reader opened before a commit keeps its view of the run (one query never mixes two moments of a run);
    parts without their `layers` commit record are never listed, so they are never opened (a rerun deletes them)."""
    d = {"layer": ["a"] * 2, "k": [1, 2], "sigma": [2.0, 1.0], "h": [4.0, 1.0]}
    store.write_result(tmp_path, "r", "p1", {"layers": [{"layer": "a", "status": "ok"}], "directions": d})
    store.write_part(tmp_path, "directions", "r", "p2", dict(d, layer=["b"] * 2))     # an unfinished commit
    files = query.committed_files(tmp_path)
    assert [f.name for f in files["directions"]] == ["p1.parquet"] and [f.name for f in files["layers"]] == ["p1.parquet"]
    con = query.open(tmp_path)
    (tmp_path / "directions" / "run_id=r" / "p2.parquet").unlink()                    # what drop_orphans does
    store.write_result(tmp_path, "r", "p3", {"layers": [{"layer": "c", "status": "ok"}], "directions": dict(d, layer=["c"] * 2)})
    assert con.sql("SELECT count(*) FROM layers").fetchall() == [(1,)]
    assert con.sql("SELECT count(*) FROM all_directions").fetchall() == [(2,)]
    assert query.open(tmp_path).sql("SELECT count(*) FROM directions").fetchall() == [(4,)]


def test_empty_views_have_columns(tmp_path):
    store.write_part(tmp_path, "layers", "r1", "stage0", _layers())
    con = query.open(tmp_path)
    for t in ("directions", "spectra", "runs"):
        cols = [r[0] for r in con.sql(f"DESCRIBE {t}").fetchall()]
        assert cols == store.schema(t).names
        assert _one(con, f"SELECT count(*) FROM {t}") == 0
    assert con.sql("SELECT eigenvalue FROM spectra WHERE factor = 'A'").fetchall() == []


def test_done_layers_and_run_exists(tmp_path):
    assert query.done_layers(tmp_path, "r1") == set() and not query.run_exists(tmp_path, "r1")
    paths = store.write_result(tmp_path, "r1", "stage0-pass0", {
        "layers": _layers(n=2),
        "directions": {"layer": ["model.layers.0.mlp.up_proj"], "k": [1], "sigma": [1.0]},
        "spectra": {"layer": ["model.layers.0.mlp.up_proj"], "factor": ["A"], "k": [1], "eigenvalue": [2.0]}})
    assert [p.parent.parent.name for p in paths][-1] == "layers"  # the commit record goes last
    store.write_run(tmp_path, "r1", {"status": "running"})
    assert query.done_layers(tmp_path, "r1") == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    assert query.done_layers(tmp_path, "other") == set()
    assert query.run_exists(tmp_path, "r1") and not query.run_exists(tmp_path, "other")


def test_summary_by_layer_type(tmp_path):
    rows = _layers(n=4) + [{"run_id": "r1", "layer": "x", "layer_type": "mlp_up", "alpha": None}]
    store.write_part(tmp_path, "layers", "r1", "p", rows)
    store.write_part(tmp_path, "layers", "r2", "p", _layers("r2", n=2))
    con = query.open(tmp_path)
    s = {r["layer_type"]: r for r in summary.summary(con, "r1").to_pylist()}
    assert list(s) == ["attn_q", "mlp_up"]  # canonical layer-type order
    assert s["mlp_up"]["n_layers"] == 3 and s["mlp_up"]["alpha_n"] == 2
    assert s["mlp_up"]["alpha_mean"] == pytest.approx(3.0) and s["mlp_up"]["alpha_median"] == pytest.approx(3.0)
    assert s["attn_q"]["beta_mean"] == 2.0 and s["attn_q"]["phi_std"] == 0.0
    assert {r["run_id"] for r in summary.summary(con).to_pylist()} == {"r1", "r2"}
    assert "mlp_up" in summary.format_summary(summary.summary(con, "r1"))


def test_summary_grad_snr_flag_and_null_run(tmp_path):
    """grad_snr and stable directions beside α; a layer type with median grad_snr below the floor is flagged; a run
    whose null run (same config, gradient_labels=sampled) is in the dataset gets α − α_null per layer type."""
    from curvdist.config import load_config, to_dict

    def rows(run_id, alphas, snrs):
        return [{"run_id": run_id, "layer": f"l{i}", "layer_type": t, "alpha": a, "grad_snr": g,
                 "stable_directions": 3 if g > 2 else 0}
                for i, (t, a, g) in enumerate(zip(["attn_q", "attn_q", "mlp_up"], alphas, snrs))]

    store.write_part(tmp_path, "layers", "t", "p", rows("t", [1.0, 1.2, 0.9], [1.1, 1.3, 40.0]))
    store.write_part(tmp_path, "layers", "n", "p", rows("n", [2.1, 2.3, 2.4], [1.0, 0.9, 1.1]))
    store.write_part(tmp_path, "layers", "x", "p", rows("x", [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]))
    store.write_run(tmp_path, "t", {"config_json": to_dict(load_config(None, ["top_k=5"]))})
    store.write_run(tmp_path, "n", {"config_json": to_dict(load_config(None, ["top_k=5", "gradient_labels=sampled"]))})
    store.write_run(tmp_path, "x", {"config_json": to_dict(load_config(None, ["top_k=6"]))})
    con = query.open(tmp_path)
    assert summary.null_runs(con) == {"t": "n"}
    s = {(r["run_id"], r["layer_type"]): r for r in summary.summary(con).to_pylist()}
    q, up = s[("t", "attn_q")], s[("t", "mlp_up")]
    assert q["grad_snr_median"] == pytest.approx(1.2) and q["low_snr"] and not up["low_snr"]
    assert q["stable_directions_median"] == 0 and up["stable_directions_median"] == 3
    assert q["null_run_id"] == "n" and q["alpha_minus_null"] == pytest.approx(-1.1)
    assert up["alpha_null_mean"] == pytest.approx(2.4) and up["alpha_minus_null"] == pytest.approx(-1.5)
    assert s[("x", "attn_q")]["null_run_id"] is None and s[("n", "attn_q")]["null_run_id"] is None
    text = summary.format_summary(summary.summary(con, "t"))
    assert "grad_snr" in text and "alpha-alpha_null" in text and "1.200 !" in text and summary.SNR_NOTE in text
    assert "!" not in summary.format_summary(summary.summary(con, "x"))
    old = tmp_path / "old" / "layers" / "run_id=r1"   # a dataset written before these columns existed
    old.mkdir(parents=True)
    pq.write_table(pa.table({"layer": ["a"], "layer_type": ["mlp_up"], "alpha": [1.0], "alpha_kron": [2.0],
                             "beta": [2.0], "phi": [0.0]}), old / "p.parquet")
    s = summary.summary(query.open(tmp_path / "old")).to_pylist()
    assert s[0]["grad_snr_median"] is None and s[0]["low_snr"] is None and s[0]["null_run_id"] is None


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        query.open(tmp_path / "missing")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError, match="no curvdist dataset"):
        query.open(tmp_path)


def test_torch_and_numpy_columns(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    t = store.to_table("directions", {"layer": ["a"] * 2, "k": np.arange(1, 3), "h": torch.tensor([1.0, 2.0]),
                                      "sigma": np.array([np.nan, 1.0])}, run_id="r")
    assert t.column("h").to_pylist() == [1.0, 2.0] and t.column("sigma").to_pylist() == [None, 1.0]
    row = store.to_table("layers", [{"run_id": "r", "layer": "a", "alpha": torch.tensor(1.5),
                                     "n_valid": np.int64(3), "beta": np.float32(2.0)}]).to_pylist()[0]
    assert (row["alpha"], row["n_valid"], row["beta"]) == (1.5, 3, 2.0)
    assert os.fspath(store.partition_dir(tmp_path, "spectra", "r")).endswith(os.path.join("spectra", "run_id=r"))


def test_factor_modes_and_error_estimates_are_stored_and_summarised(tmp_path):
    """layers: factor_mode_A/_delta and lambda_rel_err_*; spectra: factor_mode and eigenvalue_err per λ_k; the
    summary counts the sketched layers of each type beside their largest error estimate."""
    rows = _layers(n=3)
    rows[0].update(factor_mode_A="dense", factor_mode_delta="sketch", lambda_rel_err_delta=0.004)
    rows[1].update(factor_mode_A="sketch", factor_mode_delta="sketch", lambda_rel_err_A=0.02,
                   lambda_rel_err_delta=0.01)
    rows[2].update(factor_mode_A="dense", factor_mode_delta="dense")
    store.write_part(tmp_path, "layers", "r1", "p", rows)
    store.write_part(tmp_path, "spectra", "r1", "p", [
        {"layer": rows[0]["layer"], "factor": "delta", "k": 1, "eigenvalue": 2.0, "factor_mode": "sketch",
         "eigenvalue_err": 0.008},
        {"layer": rows[0]["layer"], "factor": "A", "k": 1, "eigenvalue": 3.0, "factor_mode": "dense"}])
    con = query.open(tmp_path)
    assert con.sql("SELECT factor_mode, eigenvalue_err FROM spectra ORDER BY factor").fetchall() == [
        ("dense", None), ("sketch", 0.008)]
    s = summary.summary(con, "r1").to_pylist()
    assert sum(r["n_sketched"] for r in s) == 2
    assert max(r["lambda_rel_err_max"] or 0 for r in s) == pytest.approx(0.02)
    text = summary.format_summary(summary.summary(con, "r1"))
    assert "sketched (max λ err)" in text and "2.0e-02" in text and "Nyström sketch" in text
    plain = tmp_path / "plain"
    store.write_part(plain, "layers", "r1", "p", _layers(n=2))
    assert "sketched" not in summary.format_summary(summary.summary(query.open(plain), "r1"))
