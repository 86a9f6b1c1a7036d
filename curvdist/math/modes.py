"""Factor modes: how each Kronecker factor (C_A, C_δ) of a layer is held, and what that costs.  Numbers only (no
torch, no Ray, no IO), shared by the collector (:mod:`curvdist.math.factors`) and the planner
(:mod:`curvdist.runner.plan`), so that both count the same bytes.

    dense    the d×d running sum: d² numbers in stat_dtype
    sketch   a streaming Nyström sketch (:mod:`curvdist.math.sketch`): the running sum Y = C [Ω Ψ] and the test
             matrix [Ω Ψ], 2·d·(l + s) numbers (l = min(sketch_rank, d), s = ERROR_COLUMNS); in the projections
             pass the Rayleigh–Ritz basis V and Z = C V, 2·d·min(2l, d) numbers
    None     not measured: over the budget (status ``factor_too_large``; λ, β and φ of the layer are null)

The config key ``factor_mode`` is the policy (:func:`choose`): ``dense`` (a factor over ``factor_budget_gb`` is not
measured), ``sketch`` (every factor sketched), ``auto`` (dense when it fits the budget, else its sketch; on Ray the
planner also sketches a stage's largest factors, largest first, until its layers need no more passes than with
every factor sketched: :func:`curvdist.runner.plan.assign_modes`).
"""
from __future__ import annotations

FACTOR_MODES = ("dense", "sketch", "auto")   # the policies (config key factor_mode)
ERROR_COLUMNS = 10                           # s: Gaussian columns of the sketch's error estimate


def sketch_rank(rank: int, dim: int) -> int:
    """Nyström columns l used for a d-dimensional factor: min(sketch_rank, d) (l = d reproduces C exactly)."""
    return max(1, min(int(rank), int(dim)))


def dense_bytes(dim: int, itemsize: int) -> int:
    return dim * dim * itemsize


def sketch_bytes(dim: int, rank: int, itemsize: int) -> int:
    """Statistics pass: the running sum Y and the test matrix [Ω Ψ], d·(l + s) numbers each."""
    return 2 * dim * (sketch_rank(rank, dim) + ERROR_COLUMNS) * itemsize


def ritz_bytes(dim: int, rank: int, itemsize: int) -> int:
    """Projections pass: the Rayleigh–Ritz basis V and Z = C V, d·min(2l, d) numbers each."""
    return 2 * dim * min(2 * sketch_rank(rank, dim), dim) * itemsize


def mode_bytes(mode: str | None, dim: int, rank: int, itemsize: int) -> int:
    """Statistics-pass bytes of one factor held in ``mode``."""
    if mode == "dense":
        return dense_bytes(dim, itemsize)
    if mode == "sketch":
        return sketch_bytes(dim, rank, itemsize)
    return 0


def check_policy(policy: str) -> None:
    if policy not in FACTOR_MODES:
        raise ValueError(f"factor_mode={policy!r}; choose one of {', '.join(FACTOR_MODES)}")


def choose(policy: str, dim: int, rank: int, itemsize: int, budget: int | None) -> str | None:
    """The mode of one d×d factor under ``policy`` and a per-factor ``budget`` (bytes; None: unbounded)."""
    check_policy(policy)
    fits = {m: budget is None or mode_bytes(m, dim, rank, itemsize) <= budget for m in ("dense", "sketch")}
    if policy == "auto":
        return "dense" if fits["dense"] else ("sketch" if fits["sketch"] else None)
    return policy if fits[policy] else None


def _size(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def too_large(label: str, dim: int, dtype: str, itemsize: int, rank: int, budget: int, policy: str) -> str:
    """Why a factor is not measured (the reason of status ``factor_too_large``), naming the keys that fix it."""
    dense = f"{label} is {dim}×{dim} {dtype} = {_size(dense_bytes(dim, itemsize))} > budget {_size(budget)}"
    if policy == "dense":
        return f"{dense}; raise factor_budget_gb or set factor_mode=auto (a Nyström sketch of it)"
    l = sketch_rank(rank, dim)
    return (f"{dense}, and its sketch (2 × {dim}×{l + ERROR_COLUMNS}) = {_size(sketch_bytes(dim, rank, itemsize))} "
            f"too; raise factor_budget_gb or lower sketch_rank")
