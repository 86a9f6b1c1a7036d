"""The one IO module that writes the dataset: Parquet schema, dataset paths, atomic writes and commits.  Reading
it (the DuckDB views, resume bookkeeping, schema versions) is :mod:`curvdist.io.query`.

Layout of a dataset at ``OUT`` (hive-partitioned by ``run_id``)::

    OUT/_curvdist.json                            marker: {"format": "curvdist", "schema_version": N}
    OUT/runs/run_id=<id>/run.parquet              one row: config, versions, hardware, timings, status
    OUT/layers/run_id=<id>/<part>.parquet         one row per layer
    OUT/directions/run_id=<id>/<part>.parquet     one row per (layer, k), k = 1..K
    OUT/spectra/run_id=<id>/<part>.parquet        one row per (layer, factor, k): eigenvalues of C_A, C_δ
    OUT/plots/<run_id>/*.png                      figures (curvdist.plots)

A file is whole or absent: every write goes to a hidden temporary name (``.tmp-…``, no ``.parquet`` suffix) in the
destination directory, is fsync'ed, then ``os.replace``'d.  Readers (:mod:`curvdist.io.query`) skip names that
start with ``.``.  Every table carries a ``schema_version`` column and ``curvdist.schema_version`` file metadata.

Commits (schema 2): a run commits each layer twice when it gets exact curvature, once otherwise.  After the
statistics and projections passes, a stage's Kronecker rows (``phase = kronecker``; ``exact_pending`` true for the
layers the exact pass will measure); after that stage's exact sweeps, those layers again, complete
(``phase = exact``).  One commit is one ``part`` name in every table; ``write_result`` writes ``directions`` and
``spectra`` first and ``layers`` last, so the ``layers`` row is the commit record: every reader counts a layer's
rows only through it (:func:`curvdist.io.query.current_rows`).

Example::

    rows = [{"layer": "h.0.mlp.c_fc", "layer_type": "mlp_up", "alpha": 1.1}]
    write_part("out", "layers", "run1", "stage0-pass0", rows)
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


# ---------------------------------------------------------------------------------------------------- writing
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
    commit record), every row stamped with ``part = part_name``.  Readers (:func:`curvdist.io.query.open`,
    :func:`curvdist.io.query.done_layers`) count a layer's rows only through a ``layers`` row, so they never see
    half a commit."""
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


def write_run(out: str | os.PathLike, run_id: str, row: Mapping[str, Any]) -> Path:
    """Write (or replace) the single ``runs`` row of ``run_id``; dict/list values are stored as JSON text."""
    row = {k: (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v)
           for k, v in row.items()}
    return write_part(out, "runs", run_id, "run", [row])
