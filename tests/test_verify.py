"""`curvdist verify OUT`: a sound dataset passes; a corrupt file, a duplicate layer, missing directions and a wrong
schema version are problems (exit 1); orphans of an interrupted write, a run without its runs row and stale
temporary files are warnings."""
import datetime
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curvdist.cli import app
from curvdist.io import query, store
from curvdist.io.verify import verify

runner = CliRunner()
K = 4


def _write(out, run_id, part, names, k=K, runs_row=True):
    layers = [{"layer": n, "layer_type": "mlp_up", "block": i, "m": 8, "n": 6, "alpha": 1.0, "status": "ok"}
              for i, n in enumerate(names)]
    directions = {"layer": np.repeat(names, k), "k": np.tile(np.arange(1, k + 1), len(names)),
                  "sigma": np.ones(k * len(names))}
    spectra = {"layer": np.repeat(names, 2), "factor": ["A"] * 2 * len(names), "k": np.tile([1, 2], len(names)),
               "eigenvalue": np.ones(2 * len(names))}
    store.write_result(out, run_id, part, {"directions": directions, "spectra": spectra, "layers": layers})
    if runs_row:
        store.write_run(out, run_id, {"config_json": {"top_k": k}, "status": "complete",
                                      "created_at": datetime.datetime.now(datetime.timezone.utc)})


@pytest.fixture
def out(tmp_path):
    out = tmp_path / "out"
    for run_id in ("a", "b"):
        _write(out, run_id, "stage-000", [f"h.0.{i}" for i in range(2)])
        _write(out, run_id, "stage-001", [f"h.1.{i}" for i in range(2)])
    return out


def cli(out):
    return runner.invoke(app, ["verify", str(out)])


def test_a_sound_dataset(out):
    r = cli(out)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "ok: 2 runs, 8 layers, 32 directions, 16 spectra rows in 14 files"
    assert r.stderr == ""


def test_truncated_parquet_file(out):
    f = out / "directions" / "run_id=a" / "stage-001.parquet"
    f.write_bytes(f.read_bytes()[:100])
    r = cli(out)
    assert r.exit_code == 1
    lines = [x for x in r.stderr.splitlines() if x.startswith("problem:")]
    assert any(str(f) in x and "unreadable Parquet" in x and "rerun the same command" in x for x in lines), r.stderr
    assert r.stdout.startswith("3 problem(s):")  # and its two layers now lack their directions


def test_recommitted_layer_replaces_the_older_commit(out):
    """A layer committed again (its exact rows after its Kronecker rows, or a rerun) is read through its latest
    commit only: one row in `layers`, that commit's directions, and verify is clean."""
    _write(out, "a", "stage-000-again", ["h.0.0"], k=K)
    f = out / "directions" / "run_id=a" / "stage-000-again.parquet"
    assert f.exists()
    rep = verify(out)
    assert rep.ok, rep.problems
    con = query.open(out)
    rows = con.sql("select part from layers where run_id = 'a' and layer = 'h.0.0'").fetchall()
    assert rows == [("stage-000-again",)]
    assert con.sql("select count(*), min(part) from directions where run_id = 'a' and layer = 'h.0.0'").fetchall() \
        == [(K, "stage-000-again")]
    assert con.sql("select count(*) from all_layers where run_id = 'a' and layer = 'h.0.0'").fetchall() == [(2,)]


def test_duplicate_layer_in_one_commit(out):
    _write(out, "a", "stage-009", ["h.9.0", "h.9.0"])
    rep = verify(out)
    assert any("run a has 2 rows for layer h.9.0 in one commit" in p and "delete the extra part" in p
               for p in rep.problems), rep.problems
    assert cli(out).exit_code == 1


def test_pending_exact_pass_is_a_warning(out):
    store.write_result(out, "a", "stage-005", {"layers": [{"layer": "h.5.0", "status": "ok", "m": 8, "n": 6,
                                                           "phase": "kronecker", "exact_pending": True}],
                                               "directions": {"layer": ["h.5.0"] * K, "k": list(range(1, K + 1))}})
    rep = verify(out)
    assert rep.ok and any("1 layers of run a have their Kronecker rows but not yet their exact" in w
                          for w in rep.warnings), rep.warnings
    assert "h.5.0" not in query.done_layers(out, "a")
    store.write_result(out, "a", "stage-006", {"layers": [{"layer": "h.5.0", "status": "ok", "m": 8, "n": 6,
                                                           "phase": "exact"}],
                                               "directions": {"layer": ["h.5.0"] * K, "k": list(range(1, K + 1))}})
    assert "h.5.0" in query.done_layers(out, "a") and not verify(out).warnings


def test_missing_directions_of_an_ok_layer(out):
    _write(out, "a", "stage-002", ["h.2.0"], k=K - 1, runs_row=False)  # 3 directions where top_k = 4 asks for 4
    rep = verify(out)
    assert rep.problems == [("directions: layer h.2.0 of run a (status ok) has 3 direction rows (k = 1, 2, 3) in "
                             "its commit stage-002, expected k = 1..4; delete its layers part and rerun the same "
                             "command")]


def test_orphan_rows_and_interrupted_run_are_warnings(out):
    store.write_part(out, "directions", "a", "stage-009", {"layer": ["h.9.0"] * K, "k": np.arange(1, K + 1)})
    _write(out, "c", "stage-000", ["h.0.0"], runs_row=False)
    r = cli(out)
    assert r.exit_code == 0, r.output
    assert "orphan rows from an interrupted write; rerun the same command to complete" in r.stderr
    assert "run c has layers but no runs row: the run was interrupted" in r.stderr
    assert "2 warning(s)" in r.stdout


def test_wrong_schema_version(out):
    f = out / "layers" / "run_id=b" / "stage-000.parquet"
    t = pq.read_table(f)
    pq.write_table(t.replace_schema_metadata({b"curvdist.schema_version": b"0"}), f)
    rep = verify(out)
    assert any(str(f) in p and "schema version 0" in p and f"writes {store.SCHEMA_VERSION}" in p
               for p in rep.problems)
    (out / store.MARKER).write_text('{"format": "curvdist", "schema_version": 7}')
    assert any("schema version 7" in p for p in verify(out).problems)


def test_stale_temporary_file(out):
    tmp = out / "layers" / "run_id=a" / ".tmp-stage-005-abc"
    tmp.write_bytes(b"partial")
    assert verify(out).warnings == []  # as new as a write in progress
    old = time.time() - 2 * 3600
    os.utime(tmp, (old, old))
    rep = verify(out)
    assert rep.ok and len(rep.warnings) == 1 and "leftover temporary file" in rep.warnings[0]


def test_not_a_dataset(tmp_path):
    r = cli(tmp_path)
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "holds no curvdist dataset" in r.stderr
    r = cli(tmp_path / "absent")
    assert r.exit_code == 2 and "does not exist" in r.stderr
