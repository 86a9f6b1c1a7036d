"""FLOPs, bytes moved and time of a run, estimated per pass and stage from sizes alone.  Pure: numbers in, numbers
out (no torch, no Ray, no IO).  An estimate, labelled as such wherever it is printed.

    cost = estimate_cost(plan, layout, workload, throughput)   # plan: curvdist.runner.planning.Plan
    cost.total_s("pipelined"), cost.passes[0].stages[3].flops

Per token of the evaluation batch, stage j with blocks b, h hidden, q = heads·head_dim, T seq_len, W logit width:

    forward        F_j = Σ_b (2·P_b + 4·T·q) + 2·h·W (head)   P_b: the block's parameters; 4·T·q: QKᵀ and AV over
                   the full T×T (the MATH kernel computes every score, causal or not)
    backward       B_j = F_j + Σ_b 4·T·q   input gradients only (curvdist asks autograd for the layer-output and
                   stage-input gradients, never the weights'); attention backward is twice its forward
    statistics     g·(F_j + n_b·B_j) + Σ_l (2mn + 2n² + n_f·2m²)   in stat dtype for the second part: G = Σ δaᵀ,
                   C_A = Σ aaᵀ, C_δ = Σ δδᵀ per row (a factor over budget is skipped); g pass groups, n_b backward
                   passes per micro-batch (1 empirical, 1 + mc_samples, 1 + W for type2), n_f fisher seeds
    projections    g·(F_j + n_f·B_j) + Σ_l 2K(n + n_f·m); replayed from the statistics pass's kept rows (every
                   stage's fit row_cache_gb, :func:`curvdist.runner.memory.kept_rows`): the second part only, every
                   stage at once, nothing sent between stages
    spectral       per layer: SVD of G, dense 6·M·N² + 20·N³ (R-SVD, M ≥ N) or randomized i·(4mnl + 4(m+n)l²)
                   (i = 5 iterations fp32, 25 fp64; l = K + 10); eigensolves of C_A, C_δ, dense 9d³ or block
                   Lanczos ~20 products of 2d²b + 4d·basis·b (b = K + 4); per layer, not per token
    exact          Taylor mode (second-order forward): every exact layer owned by stage j < S−1 sends K rows of
                   first and second derivatives through stages j..S−1, each costing (1 + 2K)·F_i (the primal and
                   two products per linear map per direction; only (h, h^GN) come back, 2K numbers);
                   the last stage measures its own layers in-process: 3·F (forward and create_graph backward) plus
                   per direction two products per downstream linear map, 2·F_down(l), and the directional output
                   2K(m + n).  Products only: the jet's elementwise rules (GELU, softmax, norms on K-row
                   tensors) are memory-bound on top (docs/design.md, "Exact pass")

Bytes: hidden states travel between stages as float32 (t·h·4 per micro-batch and hop, and per seed backward); in the
exact pass K first and K second derivatives forward per hop; replicas all-reduce G and the factors, a ring sending
2(R−1)/R of them per participant.  Transfer time is not part of the time estimate.

Time: products at ``utilization`` × the device's dense peak for their dtype, dense factorisations (SVD, eigh) at
SOLVER_EFFICIENCY of the stat dtype's peak (an assumption: they run far from GEMM speed).  A pass takes, pipelined,
its slowest stage × (M + S − 1)/M (fill and drain of M micro-batches per replica over S stages), or, one stage at a
time, the sum over stages; the spectral step runs on every stage at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from curvdist.math import modes as M
from curvdist.runner.memory import kept_rows
from curvdist.runner.plan import ITEMSIZE, Layout, Workload

SOLVER_EFFICIENCY = 0.1
SVD_ITERATIONS = {"float32": 5, "float64": 25}
KRYLOV_PRODUCTS = 20
DENSE_BELOW = {"cuda": 8192, "cpu": 512}
EIGVALS_DENSE_BELOW = {"cuda": 8192, "cpu": 640}   # curvdist.math.eigenvalues.EXACT_EIGVALS_BELOW (float32)
PASSES = ("statistics", "spectral", "projections", "exact")
SCHEDULES = ("pipelined", "sequential")


@dataclass(frozen=True)
class Throughput:
    """Dense peak TFLOP/s of one device for the forward dtype and the stat dtype, and the assumed utilisation."""
    source: str                 # what the figures are: a GPU model, or "hardware.device_tflops"
    forward_tflops: float
    stat_tflops: float
    utilization: float
    solver_efficiency: float = SOLVER_EFFICIENCY
    exact_tflops: float | None = None   # the exact pass's dtype (exact_dtype; None: the forward's)


@dataclass(frozen=True)
class Work:
    """One stage in one pass: FLOPs by the rate they run at, and bytes it sends."""
    forward: float = 0.0        # matrix products in the forward dtype
    stat: float = 0.0           # products in stat dtype (factor updates, projections, iterative solvers)
    solver: float = 0.0         # dense factorisations (SVD, eigh) in stat dtype
    exact: float = 0.0          # the exact pass's products, in exact_dtype
    sent: float = 0.0           # bytes to other stages
    reduced: float = 0.0        # bytes all-reduced with the other replicas, per participant

    @property
    def flops(self) -> float:
        return self.forward + self.stat + self.solver + self.exact

    def seconds(self, rate: Throughput) -> float:
        u = rate.utilization * 1e12
        return (self.forward / (rate.forward_tflops * u) + self.stat / (rate.stat_tflops * u)
                + self.exact / ((rate.exact_tflops or rate.forward_tflops) * u)
                + self.solver / (rate.stat_tflops * rate.solver_efficiency * 1e12))


@dataclass(frozen=True)
class PassCost:
    name: str
    stages: list[Work]          # one replica's stages (every replica does the same work on its micro-batches)
    steps: int                  # micro-batches one replica streams (1 for the spectral step)
    replayed: bool = False      # the projections pass replays kept rows: no stream, every stage at once

    @property
    def flops(self) -> float:
        return sum(w.flops for w in self.stages)

    @property
    def sent(self) -> float:
        return sum(w.sent for w in self.stages)

    def seconds(self, rate: Throughput, schedule: str) -> float:
        t = [w.seconds(rate) for w in self.stages]
        if self.name == "spectral" or self.replayed:
            return max(t)
        if schedule == "sequential":
            return sum(t)
        if self.name == "exact":
            return max(t)
        return max(t) * (self.steps + len(t) - 1) / self.steps


@dataclass(frozen=True)
class CostPlan:
    layout: Layout
    passes: list[PassCost]
    throughput: Throughput | None

    def total_flops(self) -> float:
        """Every replica's FLOPs; the spectral step counted once per stage (after the all-reduce every replica holds
        the same sums, so one of them, or each for a share of the layers, solves them)."""
        return sum(p.flops * (1 if p.name == "spectral" else self.layout.replicas) for p in self.passes)

    def total_s(self, schedule: str) -> float | None:
        if self.throughput is None:
            return None
        return sum(p.seconds(self.throughput, schedule) for p in self.passes)


# ------------------------------------------------------------------------------------------------------ pieces
def svd_flops(m: int, n: int, k: int, stat_dtype: str, device: str) -> tuple[float, float]:
    """(dense solver FLOPs, product FLOPs) of the top-K SVD of an m×n G (:func:`curvdist.math.spectral.top_singular`)."""
    M, N = max(m, n), min(m, n)
    l = min(N, k + 10)
    if N <= DENSE_BELOW.get(device, 512) or 4 * l >= N:
        return 6.0 * M * N * N + 20.0 * N ** 3, 0.0
    return 0.0, SVD_ITERATIONS.get(stat_dtype, 5) * (4.0 * m * n * l + 4.0 * (m + n) * l * l)


def eig_flops(d: int, k: int, device: str) -> tuple[float, float]:
    """(dense solver FLOPs, product FLOPs) of the top-K eigenvalues of a d×d factor (``top_eigenvalues``: dense
    ``eigvalsh``, a tridiagonal reduction of ~(4/3)d³, or block Lanczos with blocks of ``eigenvalue_block(k)``)."""
    b = -(-k // 2) + 2
    if d <= EIGVALS_DENSE_BELOW.get(device, 640) or 4 * (k + b) >= d:
        return 4.0 / 3.0 * d ** 3, 0.0
    basis = max(min(d // 2, max(12 * b, k + 8 * b)), k + 2 * b)
    return 0.0, KRYLOV_PRODUCTS * (2.0 * d * d * b + 4.0 * d * basis * b)


def sketch_flops(d: int, rank: int) -> tuple[float, float]:
    """(solver FLOPs, 0) of one sketched factor's spectral step (:func:`curvdist.math.sketch.nystrom` and the Ritz
    basis: the l×l core, the SVD of E (d×l) and the QR of [Y Ω] (d×2l), each ~2·d·c² FLOPs)."""
    l = M.sketch_rank(rank, d)
    return 2.0 * d * l * l * 2 + 2.0 * d * (2 * l) ** 2, 0.0


def factor_row_flops(d: int, mode: str | None, rank: int) -> float:
    """FLOPs per row that accumulate one factor: 2d² dense (Σ r rᵀ), 4·d·(l + s) sketched (r (rᵀ T))."""
    if mode == "dense":
        return 2.0 * d * d
    if mode == "sketch":
        return 4.0 * d * (M.sketch_rank(rank, d) + M.ERROR_COLUMNS)
    return 0.0


def stage_forward_flops(plan, stage, seq_len: int) -> tuple[float, list[float]]:
    """(F_j per token, per-block F per token of the stage's blocks in order)."""
    arch, item = plan.arch, ITEMSIZE[plan.dtype]
    blocks = [2.0 * plan.block_bytes[b] / item + 4.0 * seq_len * arch.attn_dim for b in stage.blocks]
    head = 0.0
    if stage.has_head and not arch.logits_per_sequence:
        head = 2.0 * arch.hidden * arch.logit_width
    return sum(blocks) + head, blocks


# ------------------------------------------------------------------------------------------------------- model
def estimate_cost(plan, layout: Layout, workload: Workload, throughput: Throughput | None,
                  device: str = "cuda") -> CostPlan:
    """FLOPs and bytes of every pass and stage (``plan``: :class:`curvdist.runner.planning.Plan` with its arch)."""
    arch = plan.arch
    if arch is None:
        raise ValueError(f"no cost model for family {plan.family!r}")
    S, R = len(plan.stages), layout.replicas
    mb = math.ceil(workload.microbatches / R)
    t = workload.tokens_per_microbatch
    tokens = mb * t                                   # one replica's tokens
    mb_x = math.ceil(workload.exact_microbatches / R)  # the exact pass may measure a sample (data.exact_sequences)
    tokens_x = mb_x * t
    K, T, r = workload.top_k, workload.seq_len, ITEMSIZE[plan.stat_dtype]
    hop = t * arch.hidden * max(4, ITEMSIZE[plan.dtype])  # one micro-batch's hidden states between stages
    n_bwd, n_f = workload.seeds(arch.logit_width)
    groups = max(len(s.passes) for s in plan.stages) or 1
    by_name = {l.name: l for l in plan.layers}
    fwd = [stage_forward_flops(plan, s, T) for s in plan.stages]
    F = [f for f, _ in fwd]
    Bk = [f + 4.0 * T * arch.attn_dim * len(s.blocks) for f, s in zip(F, plan.stages)]
    ring = 2.0 * (R - 1) / R if R > 1 else 0.0
    replayed = kept_rows(plan, workload, R)[1]       # the projections pass needs no forward and backward

    stats, proj, spec, exact = [], [], [], []
    owner = {n: s.index for s in plan.stages for n in s.layers}
    exact_layers = [by_name[n] for n in owner if workload.is_exact(n)]
    for j, st in enumerate(plan.stages):
        mine = [by_name[n] for n in st.layers]
        first, last = j == 0, j == S - 1
        factor = sum(2.0 * l.m * l.n + factor_row_flops(l.n, l.modes[0], l.rank)
                     + n_f * factor_row_flops(l.m, l.modes[1], l.rank) for l in mine)
        stats.append(Work(forward=tokens * groups * (F[j] + n_bwd * Bk[j]), stat=tokens * factor,
                          sent=groups * mb * hop * ((0 if last else 1) + (0 if first else n_bwd)),
                          reduced=ring * sum(l.factor_bytes(r) for l in mine)))
        # sketched factors: Z = C V in the projections pass, 4·d·p FLOPs per row, d·p numbers reduced
        ritz = [(w, d * min(2 * M.sketch_rank(l.rank, d), d)) for l in mine
                for d, w, mode in zip((l.n, l.m), (1, n_f), l.modes) if mode == "sketch"]
        proj.append(Work(forward=0.0 if replayed else tokens * groups * (F[j] + n_f * Bk[j]),
                         stat=tokens * (sum(2.0 * K * (l.n + n_f * l.m) for l in mine)
                                        + sum(4.0 * w * dp for w, dp in ritz)),
                         sent=0.0 if replayed else groups * mb * hop * ((0 if last else 1) + (0 if first else n_f)),
                         reduced=ring * (sum(3 * K * r for _ in mine) + sum(dp * r for _, dp in ritz))))
        solver = prods = 0.0
        for l in mine:
            k = min(K, l.m, l.n)
            for a, b in [svd_flops(l.m, l.n, k, plan.stat_dtype, device)] + \
                        [eig_flops(d, k, device) if mode == "dense" else sketch_flops(d, l.rank)
                         for d, mode in zip((l.n, l.m), l.modes) if mode is not None]:
                solver, prods = solver + a, prods + b
        spec.append(Work(stat=prods, solver=solver))
        # exact: tangents of upstream layers (and this stage's own, unless it is the last) pass through here
        through = [l for l in exact_layers if owner[l.name] < j or (owner[l.name] == j and not last)]
        fl = tokens_x * len(through) * (1.0 + 2.0 * K) * F[j]
        sent = mb_x * hop * sum(0 if last else 2 * K for l in through)
        if last:
            local = [l for l in exact_layers if owner[l.name] == j]
            if local:
                down = [_downstream(fwd[j], F[j], st.first_block, l) for l in local]
                fl += tokens_x * (3.0 * F[j] + sum(K * (2.0 * d + 2.0 * (l.m + l.n)) for d, l in zip(down, local)))
        exact.append(Work(exact=fl, sent=sent, reduced=ring * 2 * K * 8 * len([l for l in exact_layers
                                                                                   if owner[l.name] == j])))
    passes = [PassCost("statistics", stats, mb), PassCost("spectral", spec, 1),
              PassCost("projections", proj, mb, replayed)]
    if workload.exact:
        passes.append(PassCost("exact", exact, mb_x))
    return CostPlan(layout, passes, throughput)


def _downstream(stage_fwd: tuple[float, list[float]], total: float, first_block: int, layer) -> float:
    """Forward FLOPs per token from ``layer``'s block to the logits within its (last) stage; 0 for the head."""
    if layer.block is None:
        return 0.0
    _, per_block = stage_fwd
    return sum(per_block[layer.block - first_block:]) + total - sum(per_block)
