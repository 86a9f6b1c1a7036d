"""The Ray driver: plan stages, start one actor per stage, stream the evaluation batch, gather, write.

    cfg = curvdist.config.load_config("configs/quickstart.yaml", ["stages=2"])
    run_id = curvdist.runner.driver.main(cfg)

Flow: checkpoint index (no weights) → stage plan (contiguous blocks balanced by parameter and factor bytes) →
Ray (a local cluster unless ``ray.address`` is given) → one :class:`curvdist.runner.worker.Worker` actor per stage in a
placement group (both held by a :class:`curvdist.runner.session.Session`, which a trajectory keeps across its
checkpoints) → pass 1 (statistics; each worker keeps its rows within ``row_cache_gb``) → spectral work on every
stage in parallel → pass 2 (projections: replayed from the kept rows when every worker holds all of its own, else
streamed again) → exact curvature (forward tangents carried stage to stage, then the reverse pass with tangent
adjoints) → each stage's rows written to the Parquet store as soon as they arrive.  Layers already written under
the same run id are skipped, so rerunning after a crash only does what is missing.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from curvdist import __version__
from curvdist import config as C
from curvdist.io import query, store, summary
from curvdist.io.checkpoint import CheckpointIndex
from curvdist.io.lock import run_lock
from curvdist.math.sequence import exact_microbatches
from curvdist.runner import cluster, transport
from curvdist.runner.plan import StagePlan
from curvdist.runner.schedule import WAIT_S, exact_pass, stream
from curvdist.runner.spec import FAULT_ENV
from curvdist.runner.supervise import Terminated, drop_orphans, fault_point

if TYPE_CHECKING:
    from curvdist.runner.session import Session

console = Console(stderr=True)
STAT_BYTES = {"float32": 4, "float64": 8}


def make_plan(cfg: C.RunConfig, index: CheckpointIndex | None = None) -> tuple[CheckpointIndex, list[StagePlan]]:
    """The checkpoint index and the stage plan (with each stage's passes) of ``cfg``
    (:mod:`curvdist.runner.planning`)."""
    from curvdist.io.sources import resolve_checkpoint
    from curvdist.runner.planning import plan_from_index

    index = index or CheckpointIndex.open(resolve_checkpoint(cfg.model), cfg.model.config_json)
    return index, plan_from_index(index, cfg).stages


def _versions() -> dict:
    import importlib.metadata as md
    out = {"curvdist": __version__, "python": platform.python_version()}
    for pkg in ("torch", "ray", "transformers", "pyarrow", "duckdb", "safetensors", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


def main(cfg: C.RunConfig) -> str:
    """Run the measurement described by ``cfg``; returns the run id.  Prints the α-by-layer-type table.

    Dead workers are replaced and their group replayed (:mod:`curvdist.runner.supervise`), also on the nodes
    that remain or return when theirs left the cluster (at most ``ray.node_wait_s``, else ``CapacityLost``);
    Ctrl-C (or SIGTERM: ``Terminated``) stops the workers and raises KeyboardInterrupt with every finished layer
    kept; a rerun into the same ``out`` resumes.  A second writer of the same run id into the same ``out`` is
    refused (:mod:`curvdist.io.lock`).  ``model.checkpoints`` runs each checkpoint in turn on one set of stage
    actors (:mod:`curvdist.runner.trajectory`; returns the last id)."""
    if cfg.model.checkpoints:
        from curvdist.runner import trajectory
        return trajectory.main(cfg)[-1]
    from curvdist.preflight import check as preflight
    from curvdist.runner.session import Session

    t_start = time.perf_counter()
    run_id = C.resolve_run_id(cfg)
    ckpt, index = preflight(cfg)   # bad input: one clear error before Ray starts, nothing written
    with run_lock(cfg.out, run_id):   # a second writer of this run id into this out is refused at once
        index, plans = make_plan(cfg, index)
        with Session(cfg, plans) as session:
            return measure(session, cfg, run_id, ckpt, index, t_start)


def measure(session: Session, cfg: C.RunConfig, run_id: str, ckpt, index: CheckpointIndex, t_start: float) -> str:
    """One checkpoint's measurement on ``session``'s stage actors (:class:`curvdist.runner.session.Session`:
    started here for the first checkpoint with work, given only the new weights for a later one), under the run
    lock: the layers not yet written under ``run_id``, group by group, then the ``runs`` row.  Any failure stops
    the session's actors before it is raised."""
    import ray

    from curvdist.io import data as D
    from curvdist.io.sources import load_tokenizer, tokenizer_dir

    timings: dict = {}
    out = Path(cfg.out)
    plans = session.plans
    if query.is_dataset(out):
        drop_orphans(out, run_id)
    done = query.done_layers(out, run_id) if query.is_dataset(out) else set()
    todo = {p.index: [n for n in p.layers if n not in done] for p in plans}
    n_todo = sum(len(v) for v in todo.values())
    base_run = {"created_at": None, "config_json": json.dumps(C.to_dict(cfg)), "config_hash": C.config_hash(cfg),
                "versions_json": json.dumps(_versions()), "git_commit": _git_commit(), "step": _step(cfg)}
    if n_todo == 0:
        console.print(f"[bold]curvdist[/] run {run_id}: every layer is already written in {out}")
        _finish(cfg, out, run_id, base_run, timings, "complete (resumed: nothing left)", None)
        return run_id
    if session.batches is None:
        tok = load_tokenizer(tokenizer_dir(cfg.model, ckpt, index), trust_remote_code=cfg.model.trust_remote_code)
        session.batches = D.make_batches(cfg.data, tokenizer=tok, vocab_size=index.hf_config().vocab_size)
    batches = session.batches
    chunk = _exact_chunk(cfg, index)
    try:
        placement = session.start()
        console.print(f"[bold]curvdist[/] run {run_id}: {index.family} checkpoint {ckpt}, {placement.stages} "
                      f"stages × {placement.replicas} replicas, {placement.in_flight} micro-batches in flight, "
                      f"{n_todo} layers to analyse" + (f" ({len(done)} already written)" if done else ""))
        timings["layout"] = {"stages": placement.stages, "replicas": placement.replicas,
                             "in_flight": placement.in_flight, "microbatches": len(batches), "exact_chunk": chunk,
                             "transport": placement.transport}
        restarts = session.restarts
        timings.update(session.load(cfg, ckpt, todo).timings())
        groups = max(len(p.passes) for p in plans)
        for g in range(groups):   # the plan's passes: each group's factors fit the per-worker budget
            session.pool.run(f"group {g + 1}/{groups}", lambda actors, g=g: run_group(
                GroupContext(cfg, plans, placement, batches, out, run_id, g, groups, timings, chunk, session.link),
                actors))
        info = ray.get([a.info.remote() for a in session.pool.actors])
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (Terminated) from a scheduler's preemption
        session.close()
        kept = len(query.done_layers(out, run_id)) if query.is_dataset(out) else 0
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        console.print(f"[yellow]{what}: workers stopped; {kept} finished layers kept in {out}; rerun the "
                      "same command to resume[/]", soft_wrap=True)
        raise
    except BaseException:
        session.close()
        raise
    timings["total_s"] = time.perf_counter() - t_start
    timings["stage_restarts"] = session.restarts - restarts
    timings["peak_rss_gb_per_worker"] = [round(i.peak_rss_bytes / 2**30, 3) for i in info]
    timings["worker_pids"] = [i.pid for i in info]   # the same processes across a trajectory's checkpoints
    _finish(cfg, out, run_id, base_run, timings, "complete", cluster.hardware(session.device))
    return run_id


def _step(cfg: C.RunConfig) -> int | None:
    """The training step of the measured checkpoint: ``model.step``, else parsed from ``model.path``'s name."""
    from curvdist.runner.trajectory import step_of
    if cfg.model.step is not None or not cfg.model.path:
        return cfg.model.step
    return step_of(cfg.model.path)


def _exact_chunk(cfg: C.RunConfig, index: CheckpointIndex) -> int | None:
    """``exact_chunk``, or (null) the most directions per exact sweep whose exact pass fits the device memory by
    the memory model (:func:`curvdist.runner.estimate.fit_exact_chunk`); None (all of a stage's at once) when the
    model has no memory model or the memory is unknown."""
    if cfg.exact_chunk is not None or not cfg.exact:
        return cfg.exact_chunk
    from curvdist.runner.estimate import estimate
    from curvdist.runner.planning import plan_from_index
    try:
        return estimate(cfg, plan_from_index(index, cfg), at_run_time=True).workload.exact_chunk
    except ValueError:   # a family without a memory model: every direction of a stage in one sweep
        return None


@dataclass(frozen=True)
class GroupContext:
    """Everything one group step needs besides the (possibly replaced) workers."""
    cfg: C.RunConfig
    plans: list[StagePlan]
    placement: cluster.Placement
    batches: list
    out: Path
    run_id: str
    group: int
    groups: int
    timings: dict
    exact_chunk: int | None          # directions per exact sweep (None: all of a stage's)
    link: transport.Link             # the stage-to-stage group of an RDT transport, re-formed every group step


def run_group(ctx: GroupContext, actors: list) -> None:
    """One group of the plan's passes: statistics and projections (pipelined, every replica at once), the
    Kronecker rows of every layer committed per stage, then exact curvature with each stage's exact rows committed
    as soon as that stage's sweeps are done.  Replayable: layers already written are dropped from the group first,
    and the replicas re-form their process groups (a replaced worker joins afresh)."""
    import ray
    from rich.progress import Progress

    pl = ctx.placement
    done = query.done_layers(ctx.out, ctx.run_id) if query.is_dataset(ctx.out) else set()
    mine = [[n for n in (p.passes[ctx.group] if ctx.group < len(p.passes) else []) if n not in done]
            for p in ctx.plans]
    if not any(mine):
        return
    pipelines = pl.pipelines(actors)
    ctx.link.connect(actors)
    ray.get([a.set_layers.remote(mine[j]) for r in pipelines for j, a in enumerate(r)])
    if pl.replicas > 1:
        _join_replicas(pipelines)
    label = f"group {ctx.group + 1}/{ctx.groups}"
    with Progress(console=console, transient=True) as progress:
        for kind in ("stats", "projections"):
            task = progress.add_task(f"{label}: pass {kind}", total=len(ctx.batches))
            t0 = time.perf_counter()
            # projections: replayed from every worker's kept rows when all of them hold their statistics pass's
            # rows (a replacement that has not run it, or a cache over row_cache_gb, holds none), else streamed
            caches = ray.get([a.row_cache.remote() for a in actors]) if kind == "projections" else None
            replay = caches is not None and all(c.complete for c in caches)
            ray.get([a.begin_pass.remote(kind, replay) for a in actors])
            if replay:
                progress.update(task, completed=len(ctx.batches))
            else:
                stream(pipelines, ctx.batches, pl.in_flight, progress, task, transport=pl.transport)
            reports = ray.get([a.end_pass.remote() for a in actors])
            _record_pass(ctx.timings, kind, ctx.group, time.perf_counter() - t0, reports, caches)
        _write_rows(ctx, pipelines[0], "kronecker")
        if ctx.cfg.exact:
            t0 = time.perf_counter()
            subset = exact_microbatches(len(ctx.batches), ctx.cfg.data.exact_microbatches, ctx.cfg.data.seed)
            reports = exact_pass(pipelines, len(ctx.batches), in_flight=pl.in_flight, chunk=ctx.exact_chunk,
                                 progress=progress, subset=subset, transport=pl.transport,
                                 on_stage_done=lambda j: _write_rows(ctx, [pipelines[0][j]], "exact", first=j))
            wall = time.perf_counter() - t0
            ctx.timings["exact_s"] = ctx.timings.get("exact_s", 0.0) + wall
            ctx.timings.setdefault("passes", []).append({
                "group": ctx.group, "kind": "exact", "wall_s": round(wall, 4),
                "busy_s": [round(r["busy_s"], 4) for r in reports],
                "workers": [f"s{r['stage']}r{r['replica']}" for r in reports],
                "busy_fraction": round(sum(r["busy_s"] for r in reports) / (wall * len(reports)), 4) if wall else None,
                "sweeps": sum(r["sweeps"] for r in reports), "sent_bytes": sum(r["sent_bytes"] for r in reports),
                "exact_dtype": reports[0]["exact_dtype"], "transport": pl.transport})


def _join_replicas(pipelines: list[list]) -> None:
    """Every stage's replicas form (or re-form) their process group: rank 0 names the address, all join at once."""
    import ray

    addrs = ray.get([pipelines[0][j].replica_address.remote() for j in range(len(pipelines[0]))])
    ray.get([a.join_replicas.remote(*addrs[j]) for r in pipelines for j, a in enumerate(r)])


def _record_pass(timings: dict, kind: str, group: int, wall: float, reports: list, caches: list | None = None
                 ) -> None:
    """Per pass: wall time, each worker's busy time (inside its forward/backward calls, or its replay of kept rows)
    and the busy fraction Σ busy / (wall × workers); for the projections pass (``caches``: each worker's
    :class:`curvdist.runner.worker.RowCacheState`) whether it was ``replayed`` from the statistics pass's rows or
    ``streamed``, the bytes of rows each worker held and, when streamed, why."""
    busy = [round(r.busy_s, 4) for r in reports]
    timings[f"{kind}_s"] = timings.get(f"{kind}_s", 0.0) + wall
    record = {"group": group, "kind": kind, "wall_s": round(wall, 4), "busy_s": busy,
              "workers": [f"s{r.stage}r{r.replica}" for r in reports],
              "busy_fraction": round(sum(r.busy_s for r in reports) / (wall * len(reports)), 4) if wall > 0 else None}
    if caches is not None:
        replayed = all(c.complete for c in caches)
        record |= {"projections": "replayed" if replayed else "streamed",
                   "row_cache_bytes": [c.nbytes for c in caches]}
        if not replayed:
            record["streamed_because"] = "; ".join(c.reason for c in caches if not c.complete)
    timings.setdefault("passes", []).append(record)


def _write_rows(ctx: GroupContext, workers: list, phase: str, first: int = 0) -> None:
    """Commit the rows of ``phase`` ("kronecker": every layer, statistics and projections final; "exact": the
    layers that got exact h) from replica 0's ``workers`` (stages first, first+1, …), each stage's as soon as
    they arrive.  ``layers`` is written last: it is the commit record (:mod:`curvdist.io.store`)."""
    import ray

    pending = {a.rows.remote(phase): first + i for i, a in enumerate(workers)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
        if not ready:
            continue
        j = pending.pop(ready[0])
        rows = ray.get(ready[0])
        if rows.layers:
            part = store.part_name(phase, j, ctx.group)
            step = _step(ctx.cfg)
            layers = [dict(r, step=step) for r in rows.layers]
            store.write_result(ctx.out, ctx.run_id, part, {"layers": layers, "directions": rows.directions,
                                                           "spectra": rows.spectra})
            fault_point(os.environ.get(FAULT_ENV), "driver", f"written-{phase}")


def _finish(cfg, out: Path, run_id: str, base_run: dict, timings: dict, status: str, hardware: dict | None) -> None:
    import datetime as dt
    row = dict(base_run, created_at=dt.datetime.now(dt.timezone.utc), timings_json=json.dumps(timings),
               hardware_json=json.dumps(hardware or {}), status=status)
    store.write_run(out, run_id, row)
    con = query.open(out)
    console.print(summary.format_summary(summary.summary(con, run_id)), highlight=False)
    con.close()
    if cfg.plots:
        from curvdist.plots import make_plots
        paths = make_plots(out, run_id)
        console.print(f"{len(paths)} figures in {store.plots_dir(out, run_id)}")
    console.print(f"results: {out} (run_id={run_id}); query with `curvdist query {out} \"select * from layers\"`")
