"""The memory one stage needs in each pass, estimated from sizes alone.  Pure: numbers in, numbers out (no torch,
no Ray, no IO).

    mem = memory_plan(plan, layout, workload, device="cuda")   # plan: curvdist.runner.planning.Plan
    mem.stages[0].peak, mem.stages[0].pass_peaks()             # bytes
    check_memory(mem, device_bytes=80e9, fraction=0.9)         # curvdist.runner.memcheck: OverMemory, the fix

Per stage j, with B micro_batch, T seq_len, t = B·T tokens per micro-batch, M_r micro-batches per replica, F in flight:

    weights      the stage's parameters in the forward dtype (the plan's param_bytes: its checkpoint tensors)
    factors      G (m·n), C_A (n²), C_δ (m²) in stat dtype of the largest pass group (LayerCost.factor_bytes); a
                 sketched factor 2·d·(l + s) instead of d² (curvdist.math.modes)
    ritz         projections pass, sketched factors: the Rayleigh–Ritz basis V and Z = C V (2·d·min(2l, d) each,
                 LayerCost.ritz_bytes) of the largest group, plus the float64 Rayleigh–Ritz solve of the largest
                 (5·d·p·8: V, Z, Q, C Q and the Ritz vectors)
    activations  per micro-batch: t · [blocks · (E_fwd · s + E_up · max(4, s)) + stage extras] + layer outputs
                 + recorded rows, held min(F − j, M_r) at once (1F1B)           (s: the forward dtype's itemsize)
    backward     one micro-batch's backward: gradients of about half a block's saved tensors at once and the
                 stage's input and output gradients, t · (E · s / 2 + 2h · s), plus the collector's largest error
                 rows and G update, t · m · r + m · n · r  (r: stat itemsize)
    cached       every micro-batch's stage input, t · h · max(4, s) each (hidden states travel between stages as
                 float32 numpy arrays and are kept as received, in host memory), M_r of them, for the exact pass
    rows         the row cache (``row_cache_gb``, :mod:`curvdist.math.rowcache`): the statistics pass's input and
                 fisher error rows of the largest group on the device, r · R · Σ_l (n + f·m) with R = M_r · t rows
                 and f fisher seeds per micro-batch (1 for empirical: 4·R·Σ(m+n) in float32, :func:`kept_rows`),
                 kept to the projections pass when they fit the budget; over it, at most the budget until the cache
                 empties itself
    replay       the projections pass replayed from the rows (only when every stage's fit: the driver replays when
                 every worker holds all of its rows, else streams): a layer's projected input rows, R · K · r
    finalize     G, C_A, C_δ again: ``finalize`` normalises into new tensors while the running sums are alive
    spectral     the largest layer's SVD of G and eigensolve workspace (:func:`spectral_workspace`)
    exact        a sweep's jet (r rows of first and second derivatives, :func:`jet_rows`) through the stage for one
                 micro-batch (:func:`exact_route_bytes`; the last stage's own layers, by the double backward:
                 :func:`exact_local_bytes`)

    pass peaks   statistics  = weights + factors + held · activations + backward + rows
                 spectral    = weights + factors + max(finalize, spectral) + rows          (the stage's rows fit)
                 projections = weights + ritz + rows + replay                               (replayed)
                             = weights + ritz + held · activations(projections) + backward  (streamed)
                 exact       = weights + exact                                              (the rows are freed)
                 (+ cached in every pass when the stage's device is the host, i.e. device=cpu)

Activations: elements autograd saves per token and block (transformers' blocks, sdpa through the MATH kernel, which
upcasts half-precision q, k, v to float32 and keeps the softmax output B·heads·T²), h hidden, f intermediate,
q = heads·head_dim, a heads:

    family     E_fwd (forward dtype)      E_up (float32, or the forward dtype when wider)
    llama      4h + q + 4f                2h + 2 + 3q + a·T
    gpt2       4h + q + 5f + 4            3q + a·T
    gpt_neox   3h + q + 2f + 4            3q + a·T
    bert       4h + q + 2f + 4            3q + a·T

Where they come from: the inputs of the linear maps (2h + q + f; NeoX's two parallel norms share one input), the MLP
nonlinearity (Llama: the gate output, its SiLU and the up output, 3f; GPT-2's tanh GELU keeps 4 f-sized tensors;
erf GELU 1), the norms (RMSNorm: the normalised input in the forward dtype, its float32 input and rsqrt; LayerNorm:
the input and mean/rstd), and attention (q, k after the GQA repeat, v, and the scores).  Counted with
``torch.autograd.graph.saved_tensors_hooks`` on transformers 5 blocks (torch 2.13, CPU); the test
``tests/test_memory.py::test_saved_activations_match_autograd`` recounts them for every family and dtype.  Layer
outputs that autograd does not keep (q/k/v/o and down projections: their consumers save other tensors) are kept
alive by the statistics collector until the micro-batch ends; the collector also records each analysed layer's
masked input rows in stat dtype (t·n·r per layer) in the statistics pass and their K projections in the projections
pass.  All of this is an estimate: allocator rounding, fragmentation and short-lived temporaries are not counted
(``hardware.memory_fraction`` leaves room for them).  ``tests/probe_memory.py`` measures a Llama stage's resident
memory on the CPU (every allocation of 64 kB or more mmap'd): activations of a micro-batch matched within 5 %, the
backward's peak and the exact workspace over-estimated by 1.2–1.3×, the spectral workspaces within 6 %
(tests/test_memory.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from curvdist.math import modes as M
from curvdist.math.curvature import CHUNK_BUDGET
from curvdist.math.stage_tangents import JET_BUDGET
from curvdist.runner.plan import ITEMSIZE, Arch, Layout, Workload

PASSES = ("statistics", "spectral", "projections", "exact")
# dense SVD / eigh at or below these sizes (curvdist.math.spectral.EXACT_*_BELOW, EXACT_BELOW_CUDA)
DENSE_BELOW = {"cuda": {"svd": 8192, "eig": 8192}, "cpu": {"svd": 384, "eig": 512}}
DENSE_BELOW_FP64_CPU = 768
EIGVALS_DENSE_BELOW_CPU = 640   # eigenvalues.EXACT_EIGVALS_BELOW (float32; float64: DENSE_BELOW_FP64_CPU)
# layer types whose output autograd keeps anyway (it feeds the MLP nonlinearity), and the head (its output is the
# logits, counted with the stage's output)
_OUTPUT_SAVED = ("mlp_up", "mlp_gate", "head")


@dataclass(frozen=True)
class BlockSaved:
    """Elements autograd saves per token for one block: ``fwd`` in the forward dtype, ``up`` in float32 (or wider),
    of which ``scores`` (heads · T) are the attention probabilities."""
    fwd: int
    up: int
    scores: int

    def bytes_per_token(self, itemsize: int) -> int:
        return self.fwd * itemsize + self.up * max(4, itemsize)


def block_saved(arch: Arch, seq_len: int) -> BlockSaved:
    """Per-token elements autograd keeps for one block of ``arch`` (module docstring table)."""
    h, f, q, a = arch.hidden, arch.intermediate, arch.attn_dim, arch.heads
    scores = a * seq_len
    attn = 3 * q + scores
    if arch.family == "llama":
        return BlockSaved(4 * h + q + 4 * f, 2 * h + 2 + attn, scores)
    if arch.family == "gpt2":
        return BlockSaved(4 * h + q + 5 * f + 4, attn, scores)
    if arch.family == "gpt_neox":
        return BlockSaved(3 * h + q + 2 * f + 4, attn, scores)
    if arch.family == "bert":
        return BlockSaved(4 * h + q + 2 * f + 4, attn, scores)
    raise ValueError(f"no activation model for family {arch.family!r}")


@dataclass(frozen=True)
class StageMemory:
    """Bytes of one stage (see the module docstring); ``held``: micro-batches it holds at once."""
    stage: int
    held: int
    weights: int
    factors: int
    activations_autograd: int      # one micro-batch: what autograd keeps (the stage's blocks, inputs and outputs)
    activations: int               # one micro-batch in the statistics pass: autograd's + the collector's
    activations_projections: int   # one micro-batch in the projections pass
    backward: int
    cached: int
    cached_on_device: bool
    finalize: int
    spectral: int
    exact: int
    ritz: int = 0                  # projections pass: Rayleigh–Ritz bases and products of sketched factors
    rows: int = 0                  # the row cache at its largest (at most row_cache_gb)
    replay: int = 0                # projections replayed from the kept rows: their workspace (0: streamed)
    kept: bool = False             # the stage's rows fit: held through the spectral step

    def pass_peaks(self) -> dict[str, int]:
        c = self.cached if self.cached_on_device else 0
        kept = self.rows if self.kept else 0
        proj = self.rows + self.replay if self.replay else self.held * self.activations_projections + self.backward
        return {"statistics": self.weights + self.factors + self.held * self.activations + self.backward
                + self.rows + c,
                "spectral": self.weights + self.factors + max(self.finalize, self.spectral) + kept + c,
                "projections": self.weights + self.ritz + proj + c,
                "exact": self.weights + self.exact + c}

    @property
    def peak(self) -> int:
        return max(self.pass_peaks().values())

    @property
    def peak_pass(self) -> str:
        p = self.pass_peaks()
        return max(p, key=p.get)

    def components(self, kind: str) -> dict[str, int]:
        """What the peak of pass ``kind`` is made of."""
        c = {"cached inputs": self.cached} if self.cached_on_device else {}
        rows = {"row cache": self.rows} if self.rows else {}
        if kind == "statistics":
            return {"weights": self.weights, "factors": self.factors,
                    f"activations ({self.held} in flight)": self.held * self.activations, "backward": self.backward,
                    **rows, **c}
        if kind == "spectral":
            return {"weights": self.weights, "factors": self.factors,
                    "spectral workspace": max(self.finalize, self.spectral), **(rows if self.kept else {}), **c}
        if kind == "projections":
            ritz = {"sketch Rayleigh-Ritz": self.ritz} if self.ritz else {}
            if self.replay:
                return {"weights": self.weights, **rows, "replay": self.replay, **ritz, **c}
            return {"weights": self.weights, f"activations ({self.held} in flight)":
                    self.held * self.activations_projections, "backward": self.backward, **ritz, **c}
        return {"weights": self.weights, "exact workspace": self.exact, **c}


@dataclass(frozen=True)
class MemoryPlan:
    layout: Layout
    device: str                    # "cuda" or "cpu"
    stages: list[StageMemory]

    @property
    def peak(self) -> int:
        """The largest stage peak: what one device must hold."""
        return max(s.peak for s in self.stages)

    @property
    def host_total(self) -> int:
        """Every stage of every replica at its peak at once: what one host holds when the stages share it."""
        return sum(s.peak for s in self.stages) * self.layout.replicas


# ------------------------------------------------------------------------------------------------- components
def sketch_workspace(dim: int, rank: int) -> int:
    """Bytes of the spectral step of one sketched factor (:func:`curvdist.math.sketch.nystrom`, float64): copies of
    Y and [Ω Ψ], Y_ν, E and U, and the residual of the error columns, 8·d·(5l + 3s)."""
    return 8 * dim * (5 * M.sketch_rank(rank, dim) + 3 * M.ERROR_COLUMNS)


def ritz_solve_bytes(dim: int, rank: int) -> int:
    """Bytes of :func:`curvdist.math.sketch.ritz_eigen` for one factor (float64 V, Z, Q, C Q, Ritz vectors)."""
    return 8 * 5 * dim * min(2 * M.sketch_rank(rank, dim), dim)


def spectral_workspace(m: int, n: int, k: int, stat_dtype: str, device: str, *, factors: tuple = (True, True),
                       oversample: int = 10, rank: int = 1) -> int:
    """Bytes :mod:`curvdist.math.spectral` allocates for one layer beyond G and the factors themselves.

    SVD of G (m×n, r = min(m, n), l = k + oversample): dense (r at most the dense size, or 4l >= r) copies G for
    LAPACK/cuSOLVER and returns U (m×r), Vᵀ (r×n) with ~2r² of work arrays: m·n + (m + n)·r + 2r² (float32 on the
    CPU: the Gram route, 4 bytes × (2m·n + 4r² + 4(max(m, n) + r)·l + 2(m + n)·k)); randomized:
    Ω, the blocks Q, P, Y and a product, about (2m + 3n)·l.  Eigenvalues of C (d×d, ``top_eigenvalues``): dense
    eigvalsh symmetrises ((C + Cᵀ)/2, a d² copy) and needs no eigenvectors: ~2d²; block Lanczos keeps a basis and
    its images in two buffers of max_basis = min(d/2, max(12b, k + 8b)) columns, 2·d·max_basis, plus the Ritz
    vectors and their images at a restart, 2·d·(k + b), and a few blocks of b = ⌈k/2⌉ + 2 columns (≈ 5·d·b).  The factors are
    solved one after the other; the peak is the larger.  Checked against the CPU allocator in tests/test_memory.py.
    ``factors``: per factor (C_A, C_δ) True or "dense" (eigensolve), "sketch" (:func:`sketch_workspace` with
    ``rank`` columns) or False/None (nothing).
    """
    w = ITEMSIZE[stat_dtype]
    r, l = min(m, n), min(min(m, n), k + oversample)
    dense = DENSE_BELOW.get(device, DENSE_BELOW["cpu"])
    svd_below = DENSE_BELOW_FP64_CPU if (device != "cuda" and stat_dtype == "float64") else dense["svd"]
    eig_below = (dense["eig"] if device == "cuda" else
                 DENSE_BELOW_FP64_CPU if stat_dtype == "float64" else EIGVALS_DENSE_BELOW_CPU)
    if (r <= svd_below or 4 * l >= r) and device != "cuda" and w < 8:
        # float32 on the CPU: the Gram route (spectral.gram_top_singular): G in float64, the float32 r×r Gram
        # matrix, its eigenvectors and eigh's work array, the float64 blocks X Q and Xᵀ X Q of l columns, the k
        # vectors of each side; in float32 units (its rare fallback, the float64 Gram matrix's eigh, ~2m·n + 6r²)
        svd = 2 * m * n + 4 * r * r + 4 * (max(m, n) + r) * l + 2 * (m + n) * k
    elif r <= svd_below or 4 * l >= r:
        svd = m * n + (m + n) * r + 2 * r * r
    else:
        svd = (2 * m + 3 * n) * l
    eig = 0
    b = -(-k // 2) + 2          # eigenvalues.eigenvalue_block(k)
    for d, on in ((n, factors[0]), (m, factors[1])):
        if on == "sketch":
            eig = max(eig, sketch_workspace(d, rank) // w)
            continue
        if not on:
            continue
        if d <= eig_below or 4 * (k + b) >= d:
            eig = max(eig, 2 * d * d)       # the symmetrised copy and eigvalsh's work array (no eigenvectors)
        else:
            basis = max(min(d // 2, max(12 * b, k + 8 * b)), k + 2 * b)
            eig = max(eig, 2 * d * basis + 2 * d * (k + b) + 5 * d * b)
    return max(svd, eig) * w


def exact_itemsize(exact_dtype: str, itemsize: int) -> int:
    """Bytes per number in the exact pass: float32 at least (``exact_dtype: float32``; a wider model dtype is
    kept), float64, or the model's (``model``)."""
    return {"float32": max(4, itemsize), "float64": 8, "model": itemsize}[exact_dtype]


def jet_rows(k: int, tokens: int, seq_len: int, arch: Arch, device: str, chunk: int | None = None) -> int:
    """Rows of one jet (directions carried together) as :func:`curvdist.math.stage_tangents.jet_slices` cuts them:
    at most ``k``, ``chunk`` (exact_chunk), :data:`JET_BUDGET` // (t · the widest tensor of a block per token:
    max(intermediate, hidden, attn_dim, heads·T), the last the MATH kernel's attention scores) and 4 · JET_BUDGET //
    (t · logit width): the jets' size is bounded by the budget, not by K."""
    budget = JET_BUDGET.get(device, JET_BUDGET["cuda"])
    widest = max(arch.intermediate, arch.hidden, arch.attn_dim, arch.heads * seq_len)
    rows = min(k, chunk or k, budget // max(1, tokens * widest))
    if not arch.logits_per_sequence:
        rows = min(rows, 4 * budget // max(1, tokens * arch.logit_width))
    return max(1, rows)


def exact_route_bytes(act_block: int, tokens: int, arch: Arch, k: int, itemsize: int, *, last: bool,
                      seq_len: int, device: str = "cuda") -> int:
    """Workspace of a sweep's jets through one stage for one micro-batch, K tangents in jets of
    :func:`jet_rows` rows (``act_block``: the saved tensors of one block's forward with its input and output, the
    scale of what one op of the stage computes).

    ``stage_jet`` runs the stage's forward on (x, ẋ, ẍ) with r rows under no_grad: nothing is kept from one block to
    the next, the peak is the residual stream and one op's first and second derivatives with their transients, so
    it does not grow with the stage's blocks: measured (peak resident memory with every allocation of 64 kB or more
    mmap'd, a one-block Llama stage, r = 1, 4, 8) (0.4 + 1.25·r)·act in float32, (0.5 + 1.8·r)·act in bfloat16
    (RMSNorm's float32 transients), taken here as (0.75 + 1.5r)·act; plus the derivatives that arrive, ẋ and ẍ,
    2·r·t·h·s; the last stage adds the logits' ż and a temporary at the loss, 2·r·t·W·s, and the logits, their
    softmax and ∇_z L, 3·t·W·s.
    """
    rows = jet_rows(k, tokens, seq_len, arch, device)
    out = int((0.75 + 1.5 * rows) * act_block) + 2 * rows * tokens * arch.hidden * itemsize
    if last and not arch.logits_per_sequence:   # ż and a temporary per row; the logits, softmax and ∇_z L once
        out += (2 * rows + 3) * tokens * arch.logit_width * itemsize
    return out


def exact_local_bytes(act_autograd: int, tokens: int, k: int, device: str, min_m: int, cached_all: int) -> int:
    """Workspace of the last stage measuring its own layers in-process (:func:`curvdist.math.curvature.
    exact_curvature`'s default, the double backward): a forward and a create_graph backward (≈ 3 × act of the whole
    stage), a chunk of c = min(K, CHUNK_BUDGET / (t·m)) directions of the batched double backward (≈ c × act; the
    narrowest layer, ``min_m``, has the largest chunk and bounds the peak), and every cached input moved to the
    device (measured on a one-block Llama, fp32: 4.0·act for K = 1, 6.8·act for K = 8 in chunks of 4)."""
    chunk = max(1, min(k, CHUNK_BUDGET.get(device, CHUNK_BUDGET["cuda"]) // max(1, tokens * min_m)))
    return (3 + chunk) * act_autograd + cached_all


def sweep_tangents(plan, workload: Workload, stage: int) -> int:
    """The most tangents one exact sweep carries through ``stage``: a sweep of source stage j < S−1 carries the
    directions of j's exact layers (Σ min(K, m, n)), at most ``exact_chunk`` of them; 0 when no sweep passes."""
    last = len(plan.stages) - 1
    by_name = {l.name: l for l in plan.layers}
    most = 0
    for st in plan.stages[:min(stage, last - 1) + 1]:
        T = sum(min(workload.top_k, by_name[n].m, by_name[n].n) for n in st.layers if workload.is_exact(n))
        most = max(most, min(T, workload.exact_chunk) if workload.exact_chunk else T)
    return most


def kept_rows(plan, workload: Workload, replicas: int) -> tuple[list[int], bool]:
    """Per stage, the bytes of the statistics pass's rows one worker keeps for the projections pass (its largest
    group's r·R·Σ_l (n + f·m), R = M_r·t rows per replica, f fisher seeds), and whether the projections pass replays
    them: every stage's fit ``row_cache_bytes`` (the driver replays only when every worker holds all of its rows)."""
    f = workload.seeds(plan.arch.logit_width)[1]
    R = math.ceil(workload.microbatches / replicas) * workload.tokens_per_microbatch
    by_name = {l.name: l for l in plan.layers}
    per_row = [max((sum(by_name[n].n + f * by_name[n].m for n in p) for p in st.passes), default=0)
               for st in plan.stages]
    full = [R * ITEMSIZE[plan.stat_dtype] * x for x in per_row]
    return full, workload.row_cache_bytes > 0 and all(b <= workload.row_cache_bytes for b in full)


# ------------------------------------------------------------------------------------------------------- model
def memory_plan(plan, layout: Layout, workload: Workload, device: str) -> MemoryPlan:
    """Every stage's memory (``plan``: :class:`curvdist.runner.planning.Plan`, with its ``arch``)."""
    arch: Arch = plan.arch
    if arch is None:
        raise ValueError(f"no memory model for family {plan.family!r}")
    s, r = ITEMSIZE[plan.dtype], ITEMSIZE[plan.stat_dtype]
    up, wire = max(4, s), max(4, s)
    t, T, h, k = workload.tokens_per_microbatch, workload.seq_len, arch.hidden, workload.top_k
    mb = math.ceil(workload.microbatches / layout.replicas)
    blk = block_saved(arch, T)
    per_block = blk.bytes_per_token(s)
    width = 0 if arch.logits_per_sequence else arch.logit_width
    by_name = {l.name: l for l in plan.layers}
    last_index = len(plan.stages) - 1
    rows_all, replayed = kept_rows(plan, workload, layout.replicas)
    out = []
    for st in plan.stages:
        nblocks = st.last_block - st.first_block + 1
        per_token = nblocks * per_block + h * s            # blocks and the output y kept for the backward
        if st.has_embedding:
            per_token += 16                                 # input ids and mask
        else:
            per_token += h * s                              # the cast stage input
        if st.has_head:                                     # final norm, head input, logits, seed and loss temporaries
            norm_up = (h + 1) * up if arch.family == "llama" else 0
            per_token += 2 * h * s + norm_up + 3 * width * s - h * s
        act_autograd = t * per_token
        groups = [[by_name[n] for n in p] for p in st.passes] or [[]]
        factors = max(sum(l.factor_bytes(r) for l in g) for g in groups)
        ritz = max(sum(l.ritz_bytes(r) for l in g) + max((ritz_solve_bytes(d, l.rank) for l in g
                                                           for d, mode in zip((l.n, l.m), l.modes) if mode == "sketch"),
                                                          default=0) for g in groups)
        held_out = max(sum(l.m for l in g if plan.layer_types.get(l.name) not in _OUTPUT_SAVED) for g in groups)
        rows_stats = max(sum(l.n for l in g) for g in groups) * r
        rows = min(rows_all[st.index], workload.row_cache_bytes)
        kept = 0 < workload.row_cache_bytes and rows_all[st.index] <= workload.row_cache_bytes
        replay = mb * t * k * r if replayed else 0
        rows_proj = max(len(g) for g in groups) * k * r
        stats_act = act_autograd + t * (held_out * s + rows_stats)
        proj_act = act_autograd + t * (held_out * s + rows_proj)
        mine = [by_name[n] for n in st.layers]
        big = max(mine, key=lambda l: l.m * l.n, default=None)
        backward = t * (per_block // 2 + 2 * h * s) + (0 if big is None else
                                                        (t * max(l.m for l in mine) + big.m * big.n) * r)
        # input ids or hidden states, the attention mask, and on the last stage the targets
        cached = mb * t * ((8 if st.has_embedding else h * wire) + 8 + (8 if st.has_head else 0))
        spectral = max((spectral_workspace(l.m, l.n, k, plan.stat_dtype, device, factors=l.modes, rank=l.rank)
                        for l in mine), default=0)
        exact_mine = [l for l in mine if workload.is_exact(l.name)]
        is_last = st.index == last_index
        through = sweep_tangents(plan, workload, st.index)
        # the exact pass computes in exact_dtype: parameters upcast in place (the model-dtype copy is freed),
        # activations and tangents in that dtype
        xs = exact_itemsize(workload.exact_dtype, s)
        act_jet = t * (per_block + 2 * h * s) * xs // s     # one block with its input and output (exact dtype)
        exact = 0
        if through:   # stacked sweeps through this stage: jets of jet_rows rows (seeded on the source stage)
            exact = exact_route_bytes(act_jet, t, arch, through, xs, last=is_last, seq_len=T, device=device)
        if exact_mine and is_last:                   # the last stage's own layers: in-process route
            mb_x = math.ceil(workload.exact_microbatches / layout.replicas)   # the inputs the exact pass measures
            exact = max(exact, exact_local_bytes(act_autograd * xs // s, t, k, device, min(l.m for l in exact_mine),
                                                 mb_x * t * h * xs))
        if exact:
            exact += st.param_bytes * (xs - s) // s
        out.append(StageMemory(st.index, layout.held(st.index, mb), st.param_bytes, factors, act_autograd, stats_act,
                               proj_act,
                               backward, cached, device != "cuda", factors, spectral, exact, ritz, rows, replay,
                               kept))
    return MemoryPlan(layout, device, out)
