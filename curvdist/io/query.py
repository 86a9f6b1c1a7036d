"""Reading the dataset that :mod:`curvdist.io.store` writes: the rule every reader follows, the ``runs`` row,
resume bookkeeping, schema versions, and the DuckDB views over committed snapshots.

Every reader takes, per layer, the latest commit of its highest phase (:func:`current_rows`; the views
``layers``, ``directions``, ``spectra``; ``all_*`` views keep every commit), so a reader during a run sees whole
layers only, and ``done_layers`` (resume) lists the layers whose final commit is on disk.  A connection reads the
files committed when it was opened (:func:`committed_files`), so one query never mixes two moments of a run that
is writing.  Names that start with ``.`` (a write in progress) are never read.

Example::

    con = open("out")
    con.sql("SELECT layer_type, avg(alpha) FROM layers GROUP BY 1").fetchall()
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from curvdist.io.store import MARKER, TABLES, partition_dir, schema


# ---------------------------------------------------------------------------------------------------- commits
def visible_parquet(d: Path) -> list[Path]:
    """The Parquet files of directory ``d``, without hidden names (a write in progress)."""
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))


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


# ---------------------------------------------------------------------------------------------------- files
def read_run(out: str | os.PathLike, run_id: str) -> dict | None:
    """The ``runs`` row of ``run_id`` as a dict, or None."""
    files = visible_parquet(partition_dir(out, "runs", run_id))
    if not files:
        return None
    rows = pq.read_table(files[0]).to_pylist()
    return rows[0] if rows else None


def run_exists(out: str | os.PathLike, run_id: str) -> bool:
    return bool(visible_parquet(partition_dir(out, "runs", run_id)))


def layer_commits(out: str | os.PathLike, run_id: str) -> list[dict]:
    """Every committed ``layers`` row of ``run_id`` (run_id, layer, phase, exact_pending, part only)."""
    rows = []
    for f in visible_parquet(partition_dir(out, "layers", run_id)):
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
            for f in visible_parquet(d):
                try:
                    return file_schema_version(f), f
                except (OSError, pa.ArrowException):
                    continue
    return None, None


# ---------------------------------------------------------------------------------------------------- views
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
    layers = {d.name: visible_parquet(d) for d in sorted((root / "layers").glob("run_id=*"))}
    files = {"layers": [f for fs in layers.values() for f in fs]}
    for t in ("directions", "spectra"):
        files[t] = [f for d in sorted((root / t).glob("run_id=*")) for f in visible_parquet(d)
                    if f.name in {g.name for g in layers.get(d.name, [])}]
    files["runs"] = [f for d in sorted((root / "runs").glob("run_id=*")) for f in visible_parquet(d)]
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
            cols = ", ".join(f'CAST(NULL AS {_DUCK[f.type]}) AS "{f.name}"' for f in schema(t))
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
