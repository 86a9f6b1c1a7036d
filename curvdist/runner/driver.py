"""The Ray driver: plan stages, start one actor per stage, stream the evaluation batch, gather, write.

    cfg = curvdist.config.load_config("configs/quickstart.yaml", ["stages=2"])
    run_id = curvdist.runner.driver.main(cfg)

Flow: checkpoint index (no weights) → stage plan (contiguous blocks balanced by parameter and factor bytes) →
Ray (a local cluster unless ``ray.address`` is given) → one :class:`curvdist.runner.worker.Worker` actor per stage in a
placement group → pass 1 (statistics) → spectral work on every stage in parallel → pass 2 (projections) →
exact curvature (forward tangents carried stage to stage, then the reverse pass with tangent adjoints) → each stage's
rows written to the Parquet store as soon as they arrive.  Layers already written under the same run id are skipped,
so rerunning after a crash only does what is missing.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from rich.console import Console

from curvdist import __version__
from curvdist import config as C
from curvdist.io import store
from curvdist.io.checkpoint import CheckpointIndex
from curvdist.runner.plan import StagePlan
from curvdist.runner.supervise import ClusterError, WorkerPool, check_reachable, drop_orphans, fault_point

console = Console(stderr=True)
STAT_BYTES = {"float32": 4, "float64": 8}


def make_plan(cfg: C.RunConfig, index: CheckpointIndex | None = None) -> tuple[CheckpointIndex, list[StagePlan]]:
    """The checkpoint index and the stage plan (with each stage's passes) of ``cfg``
    (:mod:`curvdist.runner.planning`)."""
    from curvdist.io.sources import resolve_checkpoint
    from curvdist.runner.planning import plan_from_index

    index = index or CheckpointIndex.open(resolve_checkpoint(cfg.model))
    return index, plan_from_index(index, cfg).stages


def _device(cfg: C.RunConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _start_ray(cfg: C.RunConfig, stages: int, device: str):
    """Start (or join) Ray and reserve one bundle per stage; never ask for more than the cluster has (Ray would
    wait silently)."""
    import ray
    from ray.util.placement_group import placement_group

    if not ray.is_initialized():
        if cfg.ray.address:
            check_reachable(cfg.ray.address)
            try:
                ray.init(address=cfg.ray.address, log_to_driver=False)
            except ConnectionError as e:   # the port answered, but not as a Ray GCS
                raise ConnectionError(f"cannot reach the Ray cluster at {cfg.ray.address} ({e}); check ray.address "
                                      "and that `ray start --head` runs there, or set ray.address to null for a "
                                      "local Ray") from None
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kw = {}
            if cfg.ray.object_store_gb:
                kw["object_store_memory"] = int(cfg.ray.object_store_gb * 2**30)
            # bound to loopback; the dashboard only when asked (it listens on a port)
            ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=cfg.ray.dashboard,
                     _node_ip_address="127.0.0.1", log_to_driver=False, **kw)
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    cpu_each = min(cfg.ray.cpus_per_stage, cpus / stages) if not cfg.ray.address else cfg.ray.cpus_per_stage
    gpu_each = 0.0
    if device == "cuda":
        gpu_each = cfg.ray.num_gpus_per_stage if cfg.ray.num_gpus_per_stage is not None else 1.0
        if gpus < gpu_each * stages:
            raise ClusterError(f"the Ray cluster has {gpus:g} GPUs but {stages} stages × {gpu_each:g} GPU were asked "
                               "for; lower `stages` or ray.num_gpus_per_stage, or add GPU nodes")
    if cpus < cpu_each * stages - 1e-9:
        raise ClusterError(f"the Ray cluster has {cpus:g} CPUs but {stages} stages × {cpu_each:g} CPU were asked for; "
                           "lower ray.cpus_per_stage (fractions work)")
    bundle = {"CPU": cpu_each} | ({"GPU": gpu_each} if gpu_each else {})
    pg = placement_group([dict(bundle) for _ in range(stages)], strategy=cfg.ray.placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=120)
    if not ready:
        raise ClusterError(f"could not place {stages} stage actors with {bundle} each within 120 s "
                           f"(strategy {cfg.ray.placement_strategy}); check `ray status`")
    # WorkerPool of one pipeline mostly take turns (a micro-batch or a tangent moves through them in sequence), so on a
    # local cluster every actor may use all the cores; on a shared cluster an actor keeps to its reservation.
    threads = max(1, int(cpu_each)) if cfg.ray.address else int(cfg.ray.num_cpus or os.cpu_count())
    return pg, cpu_each, gpu_each, threads


def _spec(cfg: C.RunConfig, ckpt: Path, plan: StagePlan, layers: list[str], device: str, threads: int) -> dict:
    return {"checkpoint": str(ckpt), "stage": plan.index, "first_block": plan.first_block,
            "last_block": plan.last_block, "has_embedding": plan.has_embedding, "has_head": plan.has_head,
            "layers": layers, "dtype": cfg.model.dtype, "stat_dtype": cfg.stat_dtype, "device": device,
            "loss": cfg.loss, "fisher": cfg.fisher, "mc_samples": cfg.mc_samples, "top_k": cfg.top_k,
            "gradient_labels": cfg.gradient_labels,
            "seed": cfg.data.seed, "factor_budget_bytes": int(cfg.factor_budget_gb * 2**30), "threads": threads,
            "attn_implementation": cfg.model.attn_implementation, "exact": cfg.exact, "gn": cfg.gn,
            "exact_layers": cfg.exact_layers, "fault": os.environ.get("CURVDIST_FAULT")}


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


def _hardware(device: str) -> dict:
    import ray
    import torch
    hw = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device,
          "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}}
    if device == "cuda":
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


def stream(actors: list, batches: list, progress=None, task=None) -> None:
    """One pass over the batch: forward stage by stage, loss and seeds on the last, backward stage by stage."""
    import ray

    for b, (inputs, targets) in enumerate(batches):
        mask = inputs.get("attention_mask")
        mask = None if mask is None else mask.numpy()
        x = inputs["input_ids"].numpy()
        for a in actors[:-1]:
            x = a.forward.remote(b, x, mask)
        grads, n_terms = actors[-1].loss_backward.options(num_returns=2).remote(b, x, mask, targets.numpy())
        for a in reversed(actors[:-1]):
            grads = a.backward.remote(b, grads)
        ray.get([a.end_microbatch.remote(b, n_terms) for a in actors])
        if progress is not None:
            progress.advance(task)


def main(cfg: C.RunConfig) -> str:
    """Run the measurement described by ``cfg``; returns the run id.  Prints the α-by-layer-type table.

    Dead stage actors are replaced and their group replayed (:mod:`curvdist.runner.supervise`); Ctrl-C stops the actors
    and raises KeyboardInterrupt with every finished layer kept; a rerun into the same ``out`` resumes."""
    import ray

    from curvdist.io import data as D
    from curvdist.io.sources import load_tokenizer
    from curvdist.preflight import check as preflight

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    run_id = C.resolve_run_id(cfg)
    ckpt, index = preflight(cfg)   # bad input: one clear error before Ray starts, nothing written
    out = Path(cfg.out)
    index, plans = make_plan(cfg, index)
    if store.is_dataset(out):
        drop_orphans(out, run_id)
    done = store.done_layers(out, run_id) if store.is_dataset(out) else set()
    todo = {p.index: [n for n in p.layers if n not in done] for p in plans}
    n_todo = sum(len(v) for v in todo.values())
    console.print(f"[bold]curvdist[/] run {run_id}: {index.family} checkpoint {ckpt}, {len(plans)} stages, "
                  f"{n_todo} layers to analyse" + (f" ({len(done)} already written)" if done else ""))
    base_run = {"created_at": None, "config_json": json.dumps(C.to_dict(cfg)), "config_hash": C.config_hash(cfg),
                "versions_json": json.dumps(_versions()), "git_commit": _git_commit()}
    if n_todo == 0:
        _finish(cfg, out, run_id, base_run, timings, "complete (resumed: nothing left)", None)
        return run_id
    tok = load_tokenizer(ckpt, trust_remote_code=cfg.model.trust_remote_code)
    vocab = index.hf_config().vocab_size
    batches = D.make_batches(cfg.data, tokenizer=tok, vocab_size=vocab)
    device = _device(cfg)
    pg, cpu_each, gpu_each, threads = _start_ray(cfg, len(plans), device)
    stages = None
    try:
        stages = _start_stages(cfg, ckpt, plans, todo, device, threads, pg, cpu_each, gpu_each)
        t0 = time.perf_counter()
        stages.run("loading", lambda actors: ray.get([a.info.remote() for a in actors]))
        timings["load_s"] = time.perf_counter() - t0
        groups = max(len(p.passes) for p in plans)
        for g in range(groups):   # the plan's passes: each group's factors fit the per-worker budget
            stages.run(f"group {g + 1}/{groups}", lambda actors, g=g: _group(cfg, actors, plans, batches, out,
                                                                           run_id, g, groups, timings))
        info = ray.get([a.info.remote() for a in stages.actors])
    except KeyboardInterrupt:
        _stop(stages, pg)
        kept = len(store.done_layers(out, run_id)) if store.is_dataset(out) else 0
        console.print(f"[yellow]interrupted: stage actors stopped; {kept} finished layers kept in {out}; rerun the "
                      "same command to resume[/]", soft_wrap=True)
        raise
    except BaseException:
        _stop(stages, pg)
        raise
    _stop(stages, pg)
    timings["total_s"] = time.perf_counter() - t_start
    timings["stage_restarts"] = len(stages.restarts)
    timings["peak_rss_gb_per_stage"] = [round(i["peak_rss_bytes"] / 2**30, 3) for i in info]
    _finish(cfg, out, run_id, base_run, timings, "complete", _hardware(device))
    return run_id


def _start_stages(cfg, ckpt, plans, todo, device, threads, pg, cpu_each, gpu_each) -> WorkerPool:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from curvdist.runner.worker import Worker

    Actor = ray.remote(Worker)

    def start(i: int):
        p = plans[i]
        return Actor.options(num_cpus=cpu_each, num_gpus=gpu_each, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=p.index)).remote(
            _spec(cfg, ckpt, p, todo[p.index], device, threads))

    return WorkerPool(start, len(plans), max_restarts=cfg.ray.max_restarts)


def _stop(stages: WorkerPool | None, pg) -> None:
    from ray.util.placement_group import remove_placement_group

    if stages is not None:
        stages.kill()
    try:
        remove_placement_group(pg)
    except Exception:   # Ray already shutting down
        pass


def _group(cfg, actors, plans, batches, out: Path, run_id: str, g: int, groups: int, timings: dict) -> None:
    """One group of the plan's passes: statistics, projections, exact curvature, then each stage's rows written.
    Replayable: layers already written (before a failure) are dropped from the group first."""
    import ray
    from rich.progress import Progress

    from curvdist.runner.schedule import exact_pass

    done = store.done_layers(out, run_id) if store.is_dataset(out) else set()
    mine = [[n for n in (p.passes[g] if g < len(p.passes) else []) if n not in done] for p in plans]
    if not any(mine):
        return
    ray.get([a.set_layers.remote(names) for a, names in zip(actors, mine)])
    with Progress(console=console, transient=True) as progress:
        for kind in ("stats", "projections"):
            task = progress.add_task(f"group {g + 1}/{groups}: pass {kind}", total=len(batches))
            t0 = time.perf_counter()
            ray.get([a.begin_pass.remote(kind) for a in actors])
            stream(actors, batches, progress, task)
            ray.get([a.end_pass.remote() for a in actors])
            timings[f"{kind}_s"] = timings.get(f"{kind}_s", 0.0) + time.perf_counter() - t0
        if cfg.exact:
            t0 = time.perf_counter()
            exact_pass(actors, batches, progress=progress)
            timings["exact_s"] = timings.get("exact_s", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    _gather(actors, out, run_id, g)
    timings["write_s"] = timings.get("write_s", 0.0) + time.perf_counter() - t0


def _gather(actors: list, out: Path, run_id: str, group: int) -> None:
    """Write each stage's rows as soon as they arrive (a crash keeps every part already written)."""
    import ray

    pending = {a.rows.remote(): i for i, a in enumerate(actors)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        layers, directions, spectra = ray.get(ready[0])
        if layers:
            store.write_result(out, run_id, f"stage-{i:03d}-group-{group:03d}-{int(time.time() * 1000)}",
                               {"layers": store.to_table("layers", layers, run_id),
                                "directions": store.to_table("directions", directions, run_id),
                                "spectra": store.to_table("spectra", spectra, run_id)})
            fault_point({"fault": os.environ.get("CURVDIST_FAULT"), "stage": "driver"}, "written")


def _finish(cfg, out: Path, run_id: str, base_run: dict, timings: dict, status: str, hardware: dict | None) -> None:
    import datetime as dt
    row = dict(base_run, created_at=dt.datetime.now(dt.timezone.utc), timings_json=json.dumps(timings),
               hardware_json=json.dumps(hardware or {}), status=status)
    store.write_run(out, run_id, row)
    con = store.open(out)
    console.print(store.format_summary(store.summary(con, run_id)), highlight=False)
    con.close()
    if cfg.plots:
        from curvdist.plots import make_plots
        paths = make_plots(out, run_id)
        console.print(f"{len(paths)} figures in {store.plots_dir(out, run_id)}")
    console.print(f"results: {out} (run_id={run_id}); query with `curvdist query {out} \"select * from layers\"`")
