"""Ray for a run: start or join the cluster, decide the layout (stages × replicas) and reserve its workers.

    cpus, gpus = start_ray(cfg)
    placement = place(cfg, stages=len(plans), device="cuda", cpus=cpus, gpus=gpus)   # one bundle per worker
    specs = worker_specs(cfg, ckpt, plans, todo, device, placement)                 # one WorkerSpec per slot
    start = worker_starter(lambda i: specs[i], placement)                           # start(i) → actor i

Worker ``i`` is stage ``i mod S`` of replica ``i div S``; it sits in bundle ``i`` of one placement group.
"""
from __future__ import annotations

import os
import platform
import signal
import threading
from dataclasses import dataclass

from curvdist import config as C
from curvdist.runner import transport
from curvdist.runner.plan import StagePlan, resolve_layout
from curvdist.runner.spec import WorkerSpec
from curvdist.runner.supervise import ClusterError, check_reachable


def device_of(cfg: C.RunConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def start_ray(cfg: C.RunConfig) -> tuple[float, float]:
    """Start (or join) Ray; returns the cluster's CPU and GPU counts."""
    import ray

    if not ray.is_initialized():
        sigterm = signal.getsignal(signal.SIGTERM)   # ray.init replaces it with sys.exit; keep the caller's
        _init(cfg)
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    res = ray.cluster_resources()
    return res.get("CPU", 0.0), res.get("GPU", 0.0)


def _init(cfg: C.RunConfig) -> None:
    import ray

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
        # bound to loopback; the dashboard only when asked (it listens on a port).  address="local": a new
        # Ray even when `ray start` left a cluster on this node (ray.init() would join it, and refuse num_cpus)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=cfg.ray.dashboard,
                 _node_ip_address="127.0.0.1", log_to_driver=False, **kw)


@dataclass(frozen=True)
class Placement:
    """``stages`` × ``replicas`` workers with ``cpus`` CPUs and ``gpus`` GPUs each, ``threads`` torch threads each,
    ``in_flight`` micro-batches per pipeline, in the placement group ``group``."""
    stages: int
    replicas: int
    in_flight: int
    cpus: float
    gpus: float
    threads: int
    group: object
    transport: str = "object_store"   # how stage outputs move (:mod:`curvdist.runner.transport`)

    @property
    def workers(self) -> int:
        return self.stages * self.replicas

    def pipelines(self, actors: list) -> list[list]:
        """``actors`` (worker order) as ``[replica][stage]``."""
        return [actors[r * self.stages:(r + 1) * self.stages] for r in range(self.replicas)]


def place(cfg: C.RunConfig, *, stages: int, device: str, cpus: float, gpus: float) -> Placement:
    """Reserve one bundle per worker; never ask for more than the cluster has (Ray would wait silently)."""
    import ray
    from ray.util.placement_group import placement_group

    gpu_each = 0.0
    if device == "cuda":
        gpu_each = cfg.ray.num_gpus_per_stage if cfg.ray.num_gpus_per_stage is not None else 1.0
    layout = resolve_layout(stages, cfg.replicas, cfg.in_flight, gpus, gpu_each)
    replicas = layout.replicas
    workers = stages * replicas
    if gpu_each and gpus < gpu_each * workers - 1e-9:
        raise ClusterError(f"the Ray cluster has {gpus:g} GPUs but {stages} stages × {replicas} replicas × "
                           f"{gpu_each:g} GPU were asked for; lower `stages`, `replicas` or ray.num_gpus_per_stage, "
                           "or add GPU nodes")
    try:
        kind = transport.resolve(cfg.ray.transport, device=device, gpus_per_worker=gpu_each, replicas=replicas)
    except transport.TransportError as e:
        raise ClusterError(str(e)) from None
    cpu_each = min(cfg.ray.cpus_per_stage, cpus / workers) if not cfg.ray.address else cfg.ray.cpus_per_stage
    if cpus < cpu_each * workers - 1e-9:
        raise ClusterError(f"the Ray cluster has {cpus:g} CPUs but {stages} stages × {replicas} replicas × "
                           f"{cpu_each:g} CPU were asked for; lower ray.cpus_per_stage (fractions work) or `replicas`")
    bundle = {"CPU": cpu_each} | ({"GPU": gpu_each} if gpu_each else {})
    pg = placement_group([dict(bundle) for _ in range(workers)], strategy=cfg.ray.placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=120)
    if not ready:
        raise ClusterError(f"could not place {workers} workers with {bundle} each within 120 s "
                           f"(strategy {cfg.ray.placement_strategy}); check `ray status`")
    # Pipelined stages and replicas compute at the same time, so each actor gets its share of the cores (more
    # torch threads than cores make every small kernel spin and wait); on a shared cluster, its reservation.
    threads = max(1, int(cpu_each)) if cfg.ray.address else max(1, int((cfg.ray.num_cpus or os.cpu_count())
                                                                       // workers))
    return Placement(stages, replicas, layout.in_flight, cpu_each, gpu_each, threads, pg, kind)


def worker_specs(cfg: C.RunConfig, ckpt, plans: list[StagePlan], todo: dict[int, list[str]], device: str,
                 placement: Placement) -> list[WorkerSpec]:
    """The spec of every worker slot ``i`` (stage i mod S of replica i div S) for one checkpoint."""
    S = placement.stages
    return [WorkerSpec.build(cfg, ckpt, plans[i % S], stages=S, replica=i // S, replicas=placement.replicas,
                             layers=todo[plans[i % S].index], device=device, threads=placement.threads,
                             gpus_per_worker=placement.gpus, transport=placement.transport)
            for i in range(placement.workers)]


def worker_starter(spec_of, placement: Placement):
    """``start(i)``: a new worker actor for slot ``i`` in its own bundle, built from ``spec_of(i)`` (the slot's spec
    for the checkpoint being measured now); the supervisor calls it again to replace a dead worker in the same
    slot."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from curvdist.runner.worker import Worker

    # Ray Direct Transport (an RDT transport) must be enabled on the actor class
    Actor = ray.remote(enable_tensor_transport=True)(Worker) if transport.rdt(placement.transport) else \
        ray.remote(Worker)

    def start(i: int):
        strategy = PlacementGroupSchedulingStrategy(placement_group=placement.group, placement_group_bundle_index=i)
        return Actor.options(num_cpus=placement.cpus, num_gpus=placement.gpus,
                             scheduling_strategy=strategy).remote(spec_of(i))

    return start


def missing(placement: Placement) -> str:
    """One line on the bundles of ``placement`` that have no node (their node left the cluster), and what the
    cluster has free."""
    import ray
    from ray.util.placement_group import placement_group_table

    try:
        t = placement_group_table(placement.group)
        free = ray.available_resources()
    except Exception as e:   # noqa: BLE001 - only for a message
        return f"the placement group could not be read ({e})"
    lost = [i for i, node in t["bundles_to_node_id"].items() if not node.strip("0")]
    need = {k: v for k, v in t["bundles"][lost[0]].items() if not k.startswith("bundle")} if lost else {}
    have = {k: round(free.get(k, 0.0), 3) for k in need if k in ("CPU", "GPU")}
    return (f"placement group {t['state']}, {len(lost)} bundle(s) {lost} of {need} each without a node; the "
            f"cluster has {have} free")


def release(placement: Placement | None) -> None:
    from ray.util.placement_group import remove_placement_group

    if placement is None:
        return
    try:
        remove_placement_group(placement.group)
    except Exception:   # noqa: BLE001 - Ray already shutting down
        pass


def hardware(device: str) -> dict:
    import ray
    import torch
    hw = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device,
          "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}}
    if device == "cuda":
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw
