"""The one IO module: Parquet schema, dataset paths, atomic writes and the DuckDB views.

Layout of a dataset at ``OUT`` (hive-partitioned by ``run_id``)::

    OUT/_curvdist.json                            marker: {"format": "curvdist", "schema_version": N}
    OUT/runs/run_id=<id>/run.parquet              one row: config, versions, hardware, timings, status
    OUT/layers/run_id=<id>/<part>.parquet         one row per layer
    OUT/directions/run_id=<id>/<part>.parquet     one row per (layer, k), k = 1..K
    OUT/spectra/run_id=<id>/<part>.parquet        one row per (layer, factor, k): eigenvalues of C_A, C_δ
    OUT/plots/<run_id>/*.png                      figures (curvdist.plots)

A file is whole or absent: every write goes to a hidden temporary name (``.tmp-…``, no ``.parquet`` suffix) in the
destination directory, is fsync'ed, then ``os.replace``'d.  Readers (the views, ``done_layers``) skip names that
start with ``.``.  Every table carries a ``schema_version`` column and ``curvdist.schema_version`` file metadata.

Commits (schema 2): a run commits each layer twice when it gets exact curvature, once otherwise.  After the
statistics and projections passes, a stage's Kronecker rows (``phase = kronecker``; ``exact_pending`` true for the
layers the exact pass will measure); after that stage's exact sweeps, those layers again, complete
(``phase = exact``).  One commit is one ``part`` name in every table; ``write_result`` writes ``directions`` and
``spectra`` first and ``layers`` last, so the ``layers`` row is the commit record.  Every reader takes, per layer,
the latest commit of its highest phase (:func:`current_rows`; the views ``layers``, ``directions``, ``spectra``;
``all_*`` views keep every commit), so a reader during a run sees whole layers only, and ``done_layers`` (resume)
lists the layers whose final commit is on disk.  A connection reads the files committed when it was opened
(:func:`committed_files`), so one query never mixes two moments of a run that is writing.

Example::

    rows = [{"layer": "h.0.mlp.c_fc", "layer_type": "mlp_up", "alpha": 1.1}]
    write_part("out", "layers", "run1", "stage0-pass0", rows)
    con = open("out")
    con.sql("SELECT layer_type, avg(alpha) FROM layers GROUP BY 1").fetchall()
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curvdist.vocab import DIRECTION_COLUMNS

SCHEMA_VERSION = 2   # 2: rows committed per phase (kronecker, then exact), `part` names each commit
TABLES = ("runs", "layers", "directions", "spectra")
MARKER = "_curvdist.json"
_SAFE = re.compile(r"^[A-Za-z0-9_.+-]+$")

_f64, _i64, _i32, _str = pa.float64(), pa.int64(), pa.int32(), pa.string()


def _fields(required: Sequence[tuple[str, pa.DataType]], optional: Sequence[tuple[str, pa.DataType]]):
    return ([pa.field(n, t, nullable=False) for n, t in required] + [pa.field(n, t) for n, t in optional]
            + [pa.field("schema_version", _i32, nullable=False)])


_FIT = ["alpha", "r2_alpha", "alpha_se", "alpha_se_h", "alpha_kron", "r2_alpha_kron", "beta", "phi", "chi_slope", "gamma", "r2_gamma",
        "s", "r2_s"]
_SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema(_fields(
        [("run_id", _str)],
        [("created_at", pa.timestamp("us", tz="UTC")), ("config_json", _str), ("config_hash", _str),
         ("versions_json", _str), ("git_commit", _str), ("hardware_json", _str), ("timings_json", _str),
         ("status", _str), ("step", _i64)])),
    "layers": pa.schema(_fields(
        [("run_id", _str), ("layer", _str)],
        [("layer_type", _str), ("block", _i32), ("family", _str), ("m", _i64), ("n", _i64), ("rows", _i64),
         ("n_terms", _i64), ("fisher", _str), ("stage", _i32), ("device", _str)]
        + [(c, _f64) for c in _FIT]
        + [("n_valid", _i32), ("n_valid_kron", _i32), ("pr_h", _f64), ("pr_grad", _f64),
           ("triangle_error", _f64), ("triangle_rel_error", _f64), ("rank_model", _str),
           ("bic_power_law", _f64), ("bic_exponential", _f64), ("bic_lognormal", _f64), ("status", _str),
           ("t_factors_s", _f64), ("t_spectral_s", _f64), ("t_exact_s", _f64),
           ("n_units", _i64), ("grad_mean_sq", _f64), ("grad_trace_cov", _f64), ("grad_snr", _f64),
           ("noise_scale", _f64), ("stable_directions", _i32), ("alpha_half_a", _f64), ("alpha_half_b", _f64),
           ("exact_dtype", _str), ("phase", _str), ("exact_pending", pa.bool_()), ("part", _str),
           ("factor_mode_A", _str), ("factor_mode_delta", _str), ("lambda_rel_err_A", _f64),
           ("lambda_rel_err_delta", _f64), ("exact_units", _i64), ("h_unit_rel_sd", _f64), ("step", _i64)])),
    "directions": pa.schema(_fields(
        [("run_id", _str), ("layer", _str), ("k", _i32)],
        [(c, _f64) for c in DIRECTION_COLUMNS[2:]] + [("part", _str)])),
    "spectra": pa.schema(_fields(
        [("run_id", _str), ("layer", _str), ("factor", _str), ("k", _i32)],
        [("eigenvalue", _f64), ("part", _str), ("factor_mode", _str), ("eigenvalue_err", _f64)])),
}


def schema(table: str) -> pa.Schema:
    """The Arrow schema of ``table`` (one of TABLES), with curvdist metadata."""
    _check_table(table)
    return _SCHEMAS[table].with_metadata({b"curvdist.table": table.encode(),
                                          b"curvdist.schema_version": str(SCHEMA_VERSION).encode()})


def _check_table(table: str) -> None:
    if table not in _SCHEMAS:
        raise ValueError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _SAFE.match(value) or value.startswith("."):
        raise ValueError(f"{what}={value!r} is not a safe file name: use letters, digits and _ . + - "
                         "(not starting with '.')")


# ---------------------------------------------------------------------------------------------------- tables
def _column(values: Any, field: pa.Field) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.cast(field.type)
    else:
        if hasattr(values, "detach"):  # a torch tensor, without importing torch here
            values = values.detach().cpu().numpy()
        arr = pa.array(values, type=field.type, from_pandas=True)  # from_pandas: NaN -> null
    if pa.types.is_floating(field.type):
        # NaN means "undefined" here (a fit that failed): store it as null so that SQL aggregates skip it
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, field.type), arr)
    return arr


def _scalar(v: Any) -> Any:
    # 0-d torch tensors / numpy arrays in row dicts become Python scalars
    return v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v


def to_table(table_name: str, rows: list[dict] | pa.Table | Mapping[str, Any], run_id: str | None = None) -> pa.Table:
    """Cast ``rows`` (list of dicts, Arrow table or dict of columns) to the schema of ``table_name``.

    Missing nullable columns are filled with nulls, NaN in float columns becomes null, ``schema_version`` is set,
    ``run_id`` is filled from the argument when the data has no such column.  Unknown columns raise ValueError.
    """
    sch = schema(table_name)
    if isinstance(rows, (list, tuple)) and not rows:
        return sch.empty_table()
    if isinstance(rows, pa.Table):
        names, n = rows.column_names, rows.num_rows
        get = rows.column
    elif isinstance(rows, Mapping):
        names = list(rows)
        lengths = {len(v) for v in rows.values()}
        if len(lengths) > 1:
            raise ValueError(f"{table_name}: columns have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        get = rows.__getitem__
    else:
        rows = list(rows)
        names = list(dict.fromkeys(k for r in rows for k in r))
        n = len(rows)
        get = lambda c: [_scalar(r.get(c)) for r in rows]
    unknown = [c for c in names if c not in sch.names]
    if unknown:
        raise ValueError(f"{table_name}: unknown column(s) {', '.join(map(repr, unknown))}; "
                         f"valid columns: {', '.join(sch.names)}")
    cols = []
    for field in sch:
        if field.name in names:
            arr = _column(get(field.name), field)
        elif field.name == "schema_version":
            arr = pa.array([SCHEMA_VERSION] * n, type=field.type)
        elif field.name == "run_id" and run_id is not None:
            arr = pa.array([run_id] * n, type=field.type)
        elif field.nullable:
            arr = pa.nulls(n, type=field.type)
        else:
            raise ValueError(f"{table_name}: required column {field.name!r} is missing")
        if not field.nullable and arr.null_count:
            raise ValueError(f"{table_name}: column {field.name!r} may not contain nulls")
        cols.append(arr)
    return pa.Table.from_arrays(cols, schema=sch)


def empty_table(table_name: str) -> pa.Table:
    return schema(table_name).empty_table()


# ---------------------------------------------------------------------------------------------------- paths
def partition_dir(out: str | os.PathLike, table_name: str, run_id: str) -> Path:
    _check_table(table_name)
    _check_name("run_id", run_id)
    return Path(out) / table_name / f"run_id={run_id}"


def plots_dir(out: str | os.PathLike, run_id: str) -> Path:
    _check_name("run_id", run_id)
    return Path(out) / "plots" / run_id


def _visible_parquet(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary name beside ``path``, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.stem}-{uuid.uuid4().hex}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _ensure_marker(out: Path) -> None:
    marker = out / MARKER
    if not marker.exists():
        text = json.dumps({"format": "curvdist", "schema_version": SCHEMA_VERSION})
        atomic_write(marker, lambda p: p.write_text(text + "\n"))


def write_part(out: str | os.PathLike, table_name: str, run_id: str, part_name: str,
               table: pa.Table | list[dict] | Mapping[str, Any]) -> Path:
    """Write one part file ``OUT/<table_name>/run_id=<run_id>/<part_name>.parquet`` atomically (replacing it)."""
    _check_name("part_name", part_name)
    d = partition_dir(out, table_name, run_id)
    table = to_table(table_name, table, run_id=run_id)
    if table.num_rows and not pc.all(pc.equal(table["run_id"], run_id)).as_py():
        raise ValueError(f"{table_name}: rows carry a run_id other than {run_id!r}")
    _ensure_marker(Path(out))
    return atomic_write(d / f"{part_name}.parquet", lambda p: pq.write_table(table, p))


PHASES = ("kronecker", "exact")


def part_name(phase: str, stage: int, group: int) -> str:
    """The name of one commit: nanoseconds first, so that names sort by commit time (the readers take a layer's
    latest commit of its highest phase), then what it holds."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    return f"{time.time_ns():020d}-{phase}-stage{stage:03d}-group{group:03d}"


def write_result(out: str | os.PathLike, run_id: str, part_name: str,
                 tables: Mapping[str, pa.Table | list[dict] | Mapping[str, Any]]) -> list[Path]:
    """Commit one unit of work: its ``directions`` and ``spectra`` parts first, its ``layers`` part last (the
    commit record), every row stamped with ``part = part_name``.  Readers (:func:`open`, :func:`done_layers`)
    count a layer's rows only through a ``layers`` row, so they never see half a commit."""
    order = sorted(tables, key=lambda t: (t == "layers", TABLES.index(t) if t in TABLES else -1))
    written = []
    for name in order:
        tab = to_table(name, tables[name], run_id=run_id)
        if tab.num_rows == 0 and name != "layers":
            continue
        i = tab.schema.get_field_index("part")
        tab = tab.set_column(i, tab.schema.field(i), pa.array([part_name] * tab.num_rows, pa.string()))
        written.append(write_part(out, name, run_id, part_name, tab))
    return written


def current_rows(layer_rows: list[dict]) -> dict[tuple[str, str], dict]:
    """The rule every reader follows, on ``layers`` rows: per (run_id, layer), the row of the highest phase
    (exact over kronecker), latest commit first.  Rows of schema 1 (no phase, no part) count as final."""
    best: dict[tuple[str, str], dict] = {}
    for r in layer_rows:
        key = (r["run_id"], r["layer"])
        rank = (r.get("phase") == "exact", r.get("part") or "")
        if key not in best or rank > (best[key].get("phase") == "exact", best[key].get("part") or ""):
            best[key] = r
    return best


def is_final(row: dict) -> bool:
    """A layer row that nothing will replace: an exact commit, or a Kronecker commit with no exact pass pending."""
    return row.get("phase") == "exact" or not row.get("exact_pending")


def write_run(out: str | os.PathLike, run_id: str, row: Mapping[str, Any]) -> Path:
    """Write (or replace) the single ``runs`` row of ``run_id``; dict/list values are stored as JSON text."""
    row = {k: (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v)
           for k, v in row.items()}
    return write_part(out, "runs", run_id, "run", [row])


def read_run(out: str | os.PathLike, run_id: str) -> dict | None:
    """The ``runs`` row of ``run_id`` as a dict, or None."""
    files = _visible_parquet(partition_dir(out, "runs", run_id))
    if not files:
        return None
    rows = pq.read_table(files[0]).to_pylist()
    return rows[0] if rows else None


def run_exists(out: str | os.PathLike, run_id: str) -> bool:
    return bool(_visible_parquet(partition_dir(out, "runs", run_id)))


def layer_commits(out: str | os.PathLike, run_id: str) -> list[dict]:
    """Every committed ``layers`` row of ``run_id`` (run_id, layer, phase, exact_pending, part only)."""
    rows = []
    for f in _visible_parquet(partition_dir(out, "layers", run_id)):
        names = pq.read_schema(f).names
        cols = [c for c in ("run_id", "layer", "phase", "exact_pending", "part") if c in names]
        rows += [dict(r, run_id=run_id) for r in pq.read_table(f, columns=cols).to_pylist()]
    return rows


def done_layers(out: str | os.PathLike, run_id: str) -> set[str]:
    """Names of the layers of ``run_id`` whose final rows are written (for resume): a layer whose Kronecker rows
    are committed but whose exact pass is pending is not done (a rerun measures it again; the newer commit
    replaces the older in every reader)."""
    return {layer for (_, layer), r in current_rows(layer_commits(out, run_id)).items() if is_final(r)}


def file_schema_version(path: str | os.PathLike) -> int | str | None:
    """The ``curvdist.schema_version`` of one Parquet file's metadata (None when absent)."""
    v = (pq.read_schema(path).metadata or {}).get(b"curvdist.schema_version")
    if v is None:
        return None
    return int(v) if v.decode().isdigit() else v.decode()


def dataset_schema_version(out: str | os.PathLike) -> tuple[int | str | None, Path | None]:
    """The schema version an existing dataset was written with, and the file it was read from: the marker, else
    the first readable Parquet file; ``(None, None)`` when there is neither."""
    out = Path(out)
    marker = out / MARKER
    if marker.exists():
        try:
            return json.loads(marker.read_text()).get("schema_version"), marker
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{marker} is corrupt ({e}); use another out, or delete the marker if the dataset "
                             f"is yours") from None
    for t in TABLES:
        for d in sorted((out / t).glob("run_id=*")):
            for f in _visible_parquet(d):
                try:
                    return file_schema_version(f), f
                except (OSError, pa.ArrowException):
                    continue
    return None, None


# ---------------------------------------------------------------------------------------------------- reading
_DUCK = {pa.bool_(): "BOOLEAN", pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
         pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ"}


def is_dataset(out: str | os.PathLike) -> bool:
    out = Path(out)
    return (out / MARKER).exists() or any((out / t).is_dir() for t in TABLES)


def committed_files(out: str | os.PathLike) -> dict[str, list[Path]]:
    """The files of every table that belong to a commit, listed now: ``layers`` first, then the ``directions``
    and ``spectra`` parts whose ``layers`` part (the commit record, written last) was listed, then ``runs``.  A
    commit that lands while this lists is either wholly in (its ``layers`` part was listed, and its other parts
    were on disk before it) or wholly out; parts of an unfinished commit (and the orphans a rerun deletes) are
    never listed, so a reader never opens a file that may vanish."""
    root = Path(out)
    layers = {d.name: _visible_parquet(d) for d in sorted((root / "layers").glob("run_id=*"))}
    files = {"layers": [f for fs in layers.values() for f in fs]}
    for t in ("directions", "spectra"):
        files[t] = [f for d in sorted((root / t).glob("run_id=*")) for f in _visible_parquet(d)
                    if f.name in {g.name for g in layers.get(d.name, [])}]
    files["runs"] = [f for d in sorted((root / "runs").glob("run_id=*")) for f in _visible_parquet(d)]
    return files


def open(out: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views ``runs``, ``layers``, ``directions``, ``spectra`` over ``out``.

    The views read the files committed when the connection was opened (:func:`committed_files`): a snapshot
    that a run writing meanwhile does not change, with whole layers only; reopen to see later commits.  A table
    with no file gets an empty view with the right columns.
    """
    root = Path(out)
    if not root.exists():
        raise FileNotFoundError(f"OUT={str(out)!r} does not exist; run `curvdist run CONFIG.yaml out=...` first")
    if not is_dataset(root):
        raise ValueError(f"OUT={str(out)!r} holds no curvdist dataset (no {MARKER} and none of "
                         f"{', '.join(t + '/' for t in TABLES)}); point at the `out` directory of a run")
    con = duckdb.connect()
    files = committed_files(root)
    for t in TABLES:
        name = t if t == "runs" else f"all_{t}"
        if files[t]:
            paths = ", ".join("'" + str(f.resolve()).replace("'", "''") + "'" for f in files[t])
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{paths}], hive_partitioning=true, "
                        f"union_by_name=true, hive_types={{'run_id': 'VARCHAR'}})")
        else:
            cols = ", ".join(f'CAST(NULL AS {_DUCK[f.type]}) AS "{f.name}"' for f in _SCHEMAS[t])
            con.execute(f"CREATE VIEW {name} AS SELECT {cols} WHERE false")
    _current_views(con)
    return con


def _current_views(con: duckdb.DuckDBPyConnection) -> None:
    """``layers``, ``directions``, ``spectra``: each layer's current commit only (:func:`current_rows`); the
    ``all_*`` views keep every commit.  Datasets of schema 1 (no ``part``) have one commit per layer."""
    def has_part(view):
        return "part" in [d[0] for d in con.sql(f"DESCRIBE {view}").fetchall()]

    if not has_part("all_layers"):
        for t in ("layers", "directions", "spectra"):
            con.execute(f"CREATE VIEW {t} AS SELECT * FROM all_{t}")
        return
    con.execute("CREATE VIEW layers AS SELECT * EXCLUDE (_rank) FROM (SELECT *, row_number() OVER ("
                "PARTITION BY run_id, layer ORDER BY coalesce(phase = 'exact', false) DESC, part DESC) AS _rank "
                "FROM all_layers) WHERE _rank = 1")
    for t, source in (("directions", "layers"),
                      ("spectra", "(SELECT run_id, layer, max(part) AS part FROM all_layers "
                                  "WHERE coalesce(phase, 'kronecker') = 'kronecker' GROUP BY run_id, layer)")):
        if has_part(f"all_{t}"):
            con.execute(f"CREATE VIEW {t} AS SELECT x.* FROM all_{t} x SEMI JOIN {source} c "
                        "ON x.run_id = c.run_id AND x.layer = c.layer AND x.part IS NOT DISTINCT FROM c.part")
        else:
            con.execute(f"CREATE VIEW {t} AS SELECT * FROM all_{t}")


def arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """A relation's rows as an Arrow table (DuckDB 2: ``to_arrow_table``; DuckDB 1: ``fetch_arrow_table``)."""
    fn = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fn()
