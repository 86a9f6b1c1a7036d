"""``curvdist verify OUT``: is a dataset sound?

    report = verify("out/quickstart")
    report.problems   # one line each: unreadable file, wrong schema version, duplicate layer, missing directions
    report.warnings   # orphan rows of an interrupted write, a run without its runs row, stale temporary files
    report.summary()  # "4 runs, 112 layers, 2240 directions in 37 files"

Problems make the dataset wrong to read; warnings are what an interrupted run leaves behind (rerunning the same
command completes it).  The ``layers`` part of a commit is written last as its commit record
(:func:`curvdist.io.store.write_result`), so ``directions``/``spectra`` rows without a ``layers`` row are orphans of a
crash, not corruption; a layer committed twice (Kronecker rows, then the same layer with exact curvature) is
read through its current commit (:func:`curvdist.io.query.current_rows`), which must be whole.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curvdist.io import query, store
from curvdist.io.lock import holder

STALE_TEMP_S = 3600.0  # a temporary file this old (or older than its run's runs row) is a leftover


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        c = self.counts
        state = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"{state}: {c.get('runs', 0)} runs, {c.get('layers', 0)} layers, {c.get('directions', 0)} "
                f"directions, {c.get('spectra', 0)} spectra rows in {c.get('files', 0)} files"
                + (f"; {len(self.warnings)} warning(s)" if self.warnings else ""))


def verify(out: str | os.PathLike) -> Report:
    """Check every Parquet file and the consistency of the tables of the dataset at ``out``."""
    root = Path(out)
    if not query.is_dataset(root):
        raise ValueError(f"{str(out)!r} holds no curvdist dataset (no {store.MARKER}); give the `out` of a run")
    r = Report()
    marker = root / store.MARKER
    if marker.exists():
        try:
            v = json.loads(marker.read_text()).get("schema_version")
            if v != store.SCHEMA_VERSION:
                r.problems.append(f"{marker}: schema version {v}, this curvdist reads {store.SCHEMA_VERSION}; use the "
                                  f"curvdist that wrote it")
        except (OSError, ValueError, AttributeError) as e:
            r.problems.append(f"{marker}: unreadable ({e}); it should read "
                              f'{{"format": "curvdist", "schema_version": {store.SCHEMA_VERSION}}}')
    tables = {t: _read_table(root, t, r) for t in store.TABLES}
    r.counts.update({t: tab.num_rows for t, tab in tables.items()})
    r.counts["runs"] = len(set(tables["runs"].column("run_id").to_pylist()))
    # what a reader sees: each layer's current commit (a layer committed twice counts once)
    current = query.current_rows(tables["layers"].to_pylist()) if tables["layers"].num_rows else {}
    r.counts["layers"] = len(current)
    for t in ("directions", "spectra"):
        tab = tables[t]
        if tab.num_rows and "part" in tab.column_names:
            parts = {key: row.get("part") for key, row in current.items()}
            if t == "spectra":   # spectra come with a layer's Kronecker commit
                parts = {}
                for row in tables["layers"].to_pylist():
                    key = (row["run_id"], row["layer"])
                    if row.get("phase") != "exact" and (row.get("part") or "") >= (parts.get(key) or ""):
                        parts[key] = row.get("part")
            r.counts[t] = sum(1 for row in tab.select(["run_id", "layer", "part"]).to_pylist()
                              if parts.get((row["run_id"], row["layer"]), "\0") == row["part"])
    # a run that is being written now has commits in flight: its newest parts are not yet orphans or leftovers
    writing = {run_id: owner for run_id in sorted({d.name[len("run_id="):] for t in store.TABLES
                                                   for d in (root / t).glob("run_id=*")})
               if (owner := holder(root, run_id)) is not None}
    for run_id, owner in writing.items():
        r.warnings.append(f"run {run_id} is being written now ({owner.describe()}); its unfinished commits are "
                          "not checked: verify again when it ends")
    _consistency(tables, r, set(writing))
    _temp_files(root, tables["runs"], r, set(writing))
    return r


def _read_table(root: Path, table: str, r: Report) -> pa.Table:
    """Every visible part file of ``table`` (unreadable or mismatched ones become problems), concatenated with a
    ``_file`` column."""
    parts = []
    for d in sorted((root / table).glob("run_id=*")):
        run_id = d.name[len("run_id="):]
        for f in query.visible_parquet(d):
            r.counts["files"] = r.counts.get("files", 0) + 1
            try:
                t = pq.read_table(f)
                meta = query.file_schema_version(f)
            except (OSError, pa.ArrowException) as e:
                r.problems.append(f"{f}: unreadable Parquet ({' '.join(str(e).split())[:200]}); delete it (and the "
                                  f"layers part of the same name) and rerun the same command to rewrite it")
                continue
            versions = set(t.column("schema_version").to_pylist()) if "schema_version" in t.column_names else set()
            if meta != store.SCHEMA_VERSION or versions - {store.SCHEMA_VERSION}:
                found = meta if meta != store.SCHEMA_VERSION else min(versions - {store.SCHEMA_VERSION})
                r.problems.append(f"{f}: schema version {found}, this curvdist writes {store.SCHEMA_VERSION}; write "
                                  f"this run to another out")
                continue
            if set(t.column("run_id").to_pylist()) - {run_id}:
                r.problems.append(f"{f}: rows of another run_id than its directory run_id={run_id}")
                continue
            keep = [c for c in ("run_id", "layer", "k", "factor", "status", "m", "n", "config_json", "phase",
                                "exact_pending", "part") if c in t.column_names]
            t = t.select(keep)
            parts.append(t.append_column("_file", pa.array([str(f)] * t.num_rows, pa.string())))
    if not parts:
        return pa.table({"run_id": pa.array([], pa.string()), "_file": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="default")


def _consistency(tables: dict[str, pa.Table], r: Report, writing: set[str] = frozenset()) -> None:
    """Per layer, its current commit (:func:`curvdist.io.query.current_rows`: highest phase, latest part) must hold
    one row and its directions k = 1..K; a Kronecker commit still waiting for its exact pass is a warning (an
    interrupted run: rerunning completes it)."""
    layers = tables["layers"].to_pylist()
    commits: dict[tuple, list[dict]] = defaultdict(list)
    for row in layers:
        commits[row["run_id"], row["layer"], row.get("part")].append(row)
    for (run_id, layer, part), rows in commits.items():
        if len(rows) > 1:
            r.problems.append(f"layers: run {run_id} has {len(rows)} rows for layer {layer} in one commit (in "
                              f"{', '.join(sorted({x['_file'] for x in rows}))}); delete the extra part file(s)")
    current = query.current_rows(layers)
    files = {key: [row["_file"]] for key, row in current.items()}
    top_k = {}
    for row in tables["runs"].to_pylist():
        try:
            top_k[row["run_id"]] = int(json.loads(row.get("config_json") or "{}").get("top_k"))
        except (TypeError, ValueError):
            pass
    ks: dict[tuple, list[int]] = defaultdict(list)
    for row in tables["directions"].select([c for c in ("run_id", "layer", "k", "part")
                                            if c in tables["directions"].column_names]).to_pylist() \
            if tables["directions"].num_rows else []:
        ks[row["run_id"], row["layer"], row.get("part")].append(row["k"])
    pending = Counter()
    for key, row in current.items():
        if not query.is_final(row):
            pending[row["run_id"]] += 1
        got = sorted(ks.get((*key, row.get("part")), []))
        if row.get("status") != "ok":
            continue
        want = top_k.get(row["run_id"])
        want = min(want, row.get("m") or want, row.get("n") or want) if want else (len(got) or 1)
        if got != list(range(1, want + 1)):
            r.problems.append(f"directions: layer {row['layer']} of run {row['run_id']} (status ok) has "
                              f"{len(got)} direction rows (k = {_ks(got)}) in its commit {row.get('part')}, "
                              f"expected k = 1..{want}; delete its layers part and rerun the same command")
    for run_id, n in sorted((run_id, n) for run_id, n in pending.items() if run_id not in writing):
        r.warnings.append(f"layers: {n} layers of run {run_id} have their Kronecker rows but not yet their exact "
                          f"curvature (an interrupted run); rerun the same command to complete")
    for t in ("directions", "spectra"):
        orphans = Counter(row["run_id"] for row in tables[t].select(["run_id", "layer"]).to_pylist()
                          if (row["run_id"], row["layer"]) not in files and row["run_id"] not in writing) \
            if tables[t].num_rows else {}
        for run_id, n in sorted(orphans.items()):
            r.warnings.append(f"{t}: {n} orphan rows of run {run_id} (layers absent from `layers`): orphan rows from "
                              f"an interrupted write; rerun the same command to complete")
    runs = set(tables["runs"].column("run_id").to_pylist())
    for run_id in sorted({row["run_id"] for row in layers} - runs - writing):
        r.warnings.append(f"run {run_id} has layers but no runs row: the run was interrupted; rerun the same "
                          f"command to complete")


def _ks(ks: list[int]) -> str:
    return ", ".join(map(str, ks[:6])) + (" …" if len(ks) > 6 else "") if ks else "none"


def _temp_files(root: Path, runs: pa.Table, r: Report, writing: set[str] = frozenset()) -> None:
    created = {}
    for row in runs.select([c for c in ("run_id", "created_at") if c in runs.column_names]).to_pylist():
        if row.get("created_at") is not None:
            created[row["run_id"]] = row["created_at"].timestamp()
    now = time.time()
    for f in [*root.glob(".tmp-*"), *root.glob("*/run_id=*/.tmp-*")]:
        run_id = f.parent.name[len("run_id="):] if f.parent.name.startswith("run_id=") else None
        try:
            mtime = f.stat().st_mtime
        except FileNotFoundError:   # renamed into place by a writer meanwhile
            continue
        age = now - mtime
        if run_id not in writing and (age > STALE_TEMP_S or (run_id in created and mtime < created[run_id])):
            r.warnings.append(f"{f}: leftover temporary file ({age / 60:.0f} min old) of an interrupted write; "
                              f"delete it when no run is writing to this dataset")
