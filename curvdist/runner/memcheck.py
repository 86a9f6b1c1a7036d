"""The memory check of a run's memory plan (:mod:`curvdist.runner.memory`): one line naming the stage, the pass,
its largest parts and the fix.

    check_memory(mem, device_bytes=80e9, fraction=0.9)         # raises OverMemory with the fix in one line
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from curvdist.runner.memory import MemoryPlan
    from curvdist.runner.plan import Workload


class OverMemory(ValueError):
    """A stage's planned peak exceeds the device memory; the message names the fix (one line)."""


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e9:.3g} GB"


def check_memory(mem: MemoryPlan, device_bytes: int, fraction: float = 0.9, *, shared_host: bool = False,
                 workload: Workload | None = None, factor_budget_gb: float | None = None,
                 num_blocks: int | None = None) -> None:
    """Raise :class:`OverMemory` when a stage's peak exceeds ``fraction`` of ``device_bytes`` (or, when every stage
    shares one host, ``shared_host``, when their sum does).  The message is one line: the stage, the pass, its
    largest parts, and fixes for the largest part, with numbers from scaling that part linearly (activations and the
    exact workspace with the micro-batch, activations with the micro-batches in flight, factors with the factor
    budget, the row cache off, everything with 1/stages)."""
    usable = device_bytes * fraction
    worst = max(mem.stages, key=lambda s: s.peak)
    if shared_host:
        need = mem.host_total
        where = (f"{len(mem.stages)} stage(s) × {mem.layout.replicas} replica(s) sharing this host need "
                 f"{_gb(need)} at their peaks")
    else:
        need = worst.peak
        where = f"stage {worst.stage} needs {_gb(need)} in the {worst.peak_pass} pass"
    if need <= usable:
        return
    kind = worst.peak_pass
    peak = worst.pass_peaks()[kind]
    parts = worst.components(kind)
    top = sorted(parts.items(), key=lambda kv: -kv[1])
    room = usable * peak / need                   # what the worst stage may hold (its share of a shared host)
    name, part = top[0]
    fixes = []
    if name.startswith("activations") or name == "exact workspace":
        scalable = part + (worst.backward if name.startswith("activations") else 0)
        frac = (room - (peak - scalable)) / scalable
        if workload is not None and math.floor(workload.micro_batch * frac) >= 1:
            fixes.append(f"a smaller micro-batch (data.micro_batch={math.floor(workload.micro_batch * frac)})")
        f = math.floor(worst.held * (room - (peak - part)) / part) if name.startswith("activations") else 0
        if 1 <= f < worst.held:
            fixes.append(f"fewer micro-batches in flight (in_flight={f})")
        if name == "exact workspace":
            fixes.append("fewer directions per exact sweep (exact_chunk), fewer directions (top_k) or fewer "
                         "exact_layers")
    elif name in ("factors", "spectral workspace"):
        both = worst.factors + (parts.get("spectral workspace", 0) if kind == "spectral" else 0)
        target = (factor_budget_gb or 0) * (room - (peak - both)) / both
        fixes.append(f"fewer layers per pass (factor_budget_gb={target:.3g})" if target > 0 else
                     "fewer layers per pass (a smaller factor_budget_gb)")
    if parts.get("row cache") and peak - parts["row cache"] <= room:
        fixes.append("no row cache (row_cache_gb=0: the projections pass streams the batch again)")
    stages = len(mem.stages)
    more = max(stages + 1, math.ceil(stages * need / usable))
    if num_blocks is None or more <= num_blocks:
        fixes.append(f"more stages (stages={more})")
    if not fixes:
        fixes.append("a device with more memory, or a smaller micro-batch")
    listed = ", ".join(f"{n} {_gb(v)}" for n, v in top[:3])
    raise OverMemory(f"{where} ({listed}) but a device has {_gb(device_bytes)}, {fraction:.0%} usable "
                     f"({_gb(usable)}); fix: {' or '.join(fixes)}")
