"""A run's layout, memory and cost estimate, from its config and stage plan: what `curvdist plan` prints and what
preflight checks before Ray starts.

    plan = planning.plan_from_config(cfg)
    est = estimate(cfg, plan)                    # for `curvdist plan`: device memory from hardware.* (or the host)
    est = estimate(cfg, plan, at_run_time=True)  # for a run: read from the device the driver sees
    est.memory.peak, est.cost.total_s("pipelined"), est.device_memory.bytes
    est.check()                                  # raises memcheck.OverMemory (one line, the fix) when a stage won't fit

Device memory, first that applies: ``hardware.device_memory_gb``; at run time with device=cuda, the total memory of
the GPU the driver sees (``torch.cuda.get_device_properties``; on a remote cluster the driver may see none, or another
kind than the workers'); ``hardware.gpu`` (a table of vendor figures); with device=cpu, this machine's RAM, shared
by every stage and replica when the Ray cluster is local.  Otherwise there is nothing to check against: the
estimate is printed, the run goes ahead with a warning.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from curvdist.config import RunConfig
from curvdist.runner import devices
from curvdist.runner.cost import CostPlan, Throughput, estimate_cost
from curvdist.runner.memcheck import check_memory
from curvdist.runner.memory import MemoryPlan, memory_plan
from curvdist.runner.plan import Layout, Workload, resolve_layout


@dataclass(frozen=True)
class DeviceMemory:
    """The memory one stage may use: ``bytes`` (None: unknown), where the figure comes from, and whether every
    stage and replica shares it (a local cluster on the host's RAM)."""
    bytes: int | None
    source: str
    shared_host: bool = False


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    workload: Workload
    device: str                  # "cuda" or "cpu"
    memory: MemoryPlan
    cost: CostPlan
    device_memory: DeviceMemory
    fraction: float
    factor_budget_gb: float
    num_blocks: int

    def check(self) -> None:
        """:class:`curvdist.runner.memcheck.OverMemory` when the plan exceeds the device memory (no-op if unknown)."""
        if self.device_memory.bytes is None:
            return
        check_memory(self.memory, self.device_memory.bytes, self.fraction, shared_host=self.device_memory.shared_host,
                     workload=self.workload, factor_budget_gb=self.factor_budget_gb, num_blocks=self.num_blocks)

    def as_dict(self) -> dict:
        rate = self.cost.throughput
        return {
            "layout": dataclasses.asdict(self.layout) | {"gpus": self.layout.gpus},
            "device": self.device,
            "device_memory": dataclasses.asdict(self.device_memory) | {"fraction": self.fraction},
            "memory": [dataclasses.asdict(s) | {"pass_peaks": s.pass_peaks(), "peak": s.peak, "peak_pass": s.peak_pass}
                       for s in self.memory.stages],
            "memory_peak": self.memory.peak,
            "cost": {"estimate": True, "throughput": None if rate is None else dataclasses.asdict(rate),
                     "passes": [{"pass": p.name, "flops": p.flops, "sent_bytes": p.sent,
                                 "reduced_bytes": sum(w.reduced for w in p.stages),
                                 "stage_flops": [w.flops for w in p.stages],
                                 **({} if rate is None else {f"{s}_s": p.seconds(rate, s)
                                                             for s in ("pipelined", "sequential")})}
                                for p in self.cost.passes],
                     "total_flops": self.cost.total_flops(),
                     "total_s": {s: self.cost.total_s(s) for s in ("pipelined", "sequential")}},
        }


# ------------------------------------------------------------------------------------------------ from the config
def workload_of(cfg: RunConfig) -> Workload:
    """What ``cfg`` streams and measures."""
    d = cfg.data
    return Workload(d.sequences, d.seq_len, d.micro_batch, cfg.top_k, cfg.fisher, cfg.mc_samples, cfg.exact,
                    None if cfg.exact_layers is None else tuple(cfg.exact_layers), cfg.exact_chunk,
                    d.exact_sequences, cfg.exact_dtype, int(cfg.row_cache_gb * 2**30))


def device_kind(cfg: RunConfig) -> str:
    """"cuda" or "cpu": ``cfg.device``; auto is cuda when ``hardware.gpu`` names one or this machine has a GPU."""
    if cfg.device != "auto":
        return cfg.device
    if cfg.hardware.gpu is not None:
        return "cuda"
    return "cuda" if devices.cuda_memory_bytes() is not None else "cpu"


def layout_of(cfg: RunConfig, device: str, gpus: float | None = None) -> Layout:
    """Stages × replicas on ``gpus`` GPUs (None: ``hardware.gpus``, else only the stages' own: one replica)."""
    per_stage = 0.0
    if device == "cuda":
        per_stage = 1.0 if cfg.ray.num_gpus_per_stage is None else cfg.ray.num_gpus_per_stage
    if gpus is None:
        gpus = cfg.hardware.gpus if cfg.hardware.gpus is not None else cfg.stages * per_stage
    return resolve_layout(cfg.stages, cfg.replicas, cfg.in_flight, gpus, per_stage)


def throughput_of(cfg: RunConfig) -> Throughput | None:
    """Peak TFLOP/s for the time estimate: ``hardware.device_tflops``, else ``hardware.gpu``'s figures; None
    without either."""
    hw = cfg.hardware
    if hw.device_tflops is not None:
        return Throughput("hardware.device_tflops", hw.device_tflops, hw.device_tflops, hw.utilization)
    if hw.gpu is not None:
        g = devices.GPUS[hw.gpu]
        exact = {"float32": "float32" if cfg.model.dtype in ("bfloat16", "float16") else cfg.model.dtype,
                 "float64": "float64", "model": cfg.model.dtype}[cfg.exact_dtype]
        return Throughput(g.name, g.tflops(cfg.model.dtype), g.tflops(cfg.stat_dtype), hw.utilization,
                          exact_tflops=g.tflops(exact))
    return None


def device_memory(cfg: RunConfig, device: str, at_run_time: bool) -> DeviceMemory:
    """The memory one stage may use (module docstring: which source applies)."""
    hw, local = cfg.hardware, cfg.ray.address is None
    if hw.device_memory_gb is not None:
        return DeviceMemory(int(hw.device_memory_gb * 1e9), "hardware.device_memory_gb",
                            shared_host=device == "cpu" and local)
    if device == "cuda":
        if at_run_time:
            seen = devices.cuda_memory_bytes()
            if seen is not None:
                return DeviceMemory(seen, "cuda:0 as the driver sees it")
        if hw.gpu is not None:
            return DeviceMemory(devices.GPUS[hw.gpu].memory_bytes, f"{hw.gpu} (hardware.gpu)")
        return DeviceMemory(None, "unknown: set hardware.gpu or hardware.device_memory_gb")
    if local:
        return DeviceMemory(devices.host_memory_bytes(), "this machine's RAM, shared by every stage", True)
    return DeviceMemory(None, "unknown for a remote CPU cluster: set hardware.device_memory_gb")


def estimate(cfg: RunConfig, plan, *, at_run_time: bool = False, gpus: float | None = None) -> Estimate:
    """Layout, memory and cost of ``cfg`` over ``plan`` (:class:`curvdist.runner.planning.Plan`)."""
    device = device_kind(cfg)
    if gpus is None and at_run_time and device == "cuda" and cfg.ray.address is None:
        import torch
        gpus = torch.cuda.device_count() or None
    layout = layout_of(cfg, device, gpus)
    work = workload_of(cfg)
    dm = device_memory(cfg, device, at_run_time)
    if work.exact and work.exact_chunk is None and dm.bytes is not None:
        work = dataclasses.replace(work, exact_chunk=fit_exact_chunk(plan, layout, work, device, dm,
                                                                     cfg.hardware.memory_fraction))
    mem = memory_plan(plan, layout, work, device)
    cost = estimate_cost(plan, layout, work, throughput_of(cfg), device)
    return Estimate(layout, work, device, mem, cost, dm, cfg.hardware.memory_fraction, cfg.factor_budget_gb,
                    plan.num_blocks)


def fit_exact_chunk(plan, layout: Layout, work: Workload, device: str, dm: DeviceMemory, fraction: float) -> int | None:
    """``exact_chunk: null``: the most directions per exact sweep whose exact pass fits the device memory (binary
    search on the memory model); all of a stage's when they fit, 1 when nothing fits (the check then names the
    fix).  None when no sweep runs."""
    from curvdist.runner.memory import sweep_tangents

    most = max((sweep_tangents(plan, work, s.index) for s in plan.stages), default=0)
    if most == 0:
        return None

    def fits(chunk: int) -> bool:
        mem = memory_plan(plan, layout, dataclasses.replace(work, exact_chunk=chunk), device)
        need = mem.host_total if dm.shared_host else max(s.pass_peaks()["exact"] for s in mem.stages)
        return need <= dm.bytes * fraction

    lo, hi = 1, most
    if fits(hi):
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
