"""Stage planning, the layout (stages × replicas) and the sizes of the architecture.  Pure: numbers in, plan out (no
ray, no IO).  The memory a stage needs is :mod:`curvdist.runner.memory`, the FLOPs and time :mod:`curvdist.runner.cost`.

A *stage* is a contiguous run of blocks held by one actor; the first stage also holds the embedding, the last the
final norm and head.  WorkerPool are balanced by the bytes they hold — parameters plus the dense Kronecker factors of
their layers — with the linear-partition dynamic programme (minimise the largest stage), so that the stage that
bounds a worker's memory is as small as a contiguous split allows.

Factor memory is the wall at scale (LLaMA-7B: ~60 GiB of fp32 factors), so each stage's layers are further grouped
into *passes* whose statistics fit ``worker_budget_bytes``.  Each factor is held as its mode says
(:mod:`curvdist.math.modes`, :func:`assign_modes`): ``factor_mode=dense`` skips a factor over the budget (its
layer's status says so), ``sketch`` holds every factor as a streaming Nyström sketch (2·d·(l + 10) numbers instead of
d²), and ``auto`` keeps factors dense where they fit, sketches those that do not, and then, stage by stage,
sketches the largest dense factors until the stage needs no more passes than if every factor were sketched
(:func:`fit_passes`): every extra pass re-streams the evaluation batch through the whole pipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from curvdist.math import modes as M
from curvdist.vocab import matches

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float64": 8, "float16": 2}


@dataclass
class LayerCost:
    name: str
    block: int | None
    m: int
    n: int
    side: str | None = None  # block-less layers: "embedding" (first stage) or "head" (last stage); None: by position
    modes: tuple[str | None, str | None] = ("dense", "dense")   # (C_A, C_δ): dense, sketch, None (not measured)
    rank: int = 1            # sketch_rank of sketched factors (set with the modes by assign_modes)

    def factor_bytes(self, stat_bytes: int) -> int:
        """Statistics-pass bytes: G (m·n) plus C_A (n) and C_δ (m) as their modes hold them."""
        return self.m * self.n * stat_bytes + sum(M.mode_bytes(mode, d, self.rank, stat_bytes)
                                                  for mode, d in zip(self.modes, (self.n, self.m)))

    def ritz_bytes(self, stat_bytes: int) -> int:
        """Projections-pass bytes of the Rayleigh–Ritz step of its sketched factors."""
        return sum(M.ritz_bytes(d, self.rank, stat_bytes) for mode, d in zip(self.modes, (self.n, self.m))
                   if mode == "sketch")

    @property
    def sketched(self) -> bool:
        return "sketch" in self.modes


def assign_modes(layers: list[LayerCost], stat_bytes: int, budget: int | None, policy: str, rank: int) -> None:
    """Each factor's mode under ``policy`` and the per-factor ``budget`` (:func:`curvdist.math.modes.choose`)."""
    for l in layers:
        l.rank = rank
        l.modes = tuple(M.choose(policy, d, rank, stat_bytes, budget) for d in (l.n, l.m))


def fit_passes(layers: list[LayerCost], stat_bytes: int, budget: int | None) -> None:
    """``factor_mode=auto`` on one stage: sketch its largest dense factors (largest first, only where the sketch is
    smaller) until its layers need as few passes as with every such factor sketched."""
    if budget is None:
        return
    convertible = sorted(((d, i, l) for l in layers for i, (mode, d) in enumerate(zip(l.modes, (l.n, l.m)))
                          if mode == "dense" and M.sketch_bytes(d, l.rank, stat_bytes) < M.dense_bytes(d, stat_bytes)),
                         key=lambda x: -x[0])
    dense = {id(l): l.modes for l in layers}
    for _, i, l in convertible:
        l.modes = tuple("sketch" if j == i else m for j, m in enumerate(l.modes))
    target = len(group_passes(layers, stat_bytes, budget))
    for l in layers:
        l.modes = dense[id(l)]
    for _, i, l in convertible:
        if len(group_passes(layers, stat_bytes, budget)) <= target:
            break
        l.modes = tuple("sketch" if j == i else m for j, m in enumerate(l.modes))


@dataclass
class StagePlan:
    index: int
    first_block: int
    last_block: int                 # inclusive
    has_embedding: bool
    has_head: bool
    param_bytes: int
    factor_bytes: int
    layers: list[str] = field(default_factory=list)
    passes: list[list[str]] = field(default_factory=list)
    modes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)   # layer → (C_A, C_δ) modes

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.last_block + 1)

    def as_dict(self) -> dict:
        return {"stage": self.index, "blocks": f"{self.first_block}-{self.last_block}",
                "embedding": self.has_embedding, "head": self.has_head, "param_gb": self.param_bytes / 1e9,
                "factor_gb": self.factor_bytes / 1e9, "layers": len(self.layers), "passes": len(self.passes),
                "sketched": sum(m == "sketch" for v in self.modes.values() for m in v)}


def partition(costs: list[float], n_parts: int) -> list[tuple[int, int]]:
    """Split ``costs`` into ``n_parts`` contiguous non-empty runs minimising the largest run's sum.

    Returns inclusive ``(first, last)`` index pairs.  O(n_parts · n²), fine for hundreds of blocks.
    """
    n = len(costs)
    if not 1 <= n_parts <= n:
        raise ValueError(f"stages={n_parts} must be between 1 and the number of blocks ({n})")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(n_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(n_parts + 1)]
    best[0][0] = 0.0
    for p in range(1, n_parts + 1):
        for j in range(p, n + 1):
            for i in range(p - 1, j):
                v = max(best[p - 1][i], prefix[j] - prefix[i])
                if v < best[p][j]:
                    best[p][j], cut[p][j] = v, i
    bounds, j = [], n
    for p in range(n_parts, 0, -1):
        i = cut[p][j]
        bounds.append((i, j - 1))
        j = i
    return bounds[::-1]


def group_passes(layers: list[LayerCost], stat_bytes: int, budget: int | None) -> list[list[str]]:
    """Greedy grouping of a stage's layers (in order) into passes whose factor bytes fit ``budget``."""
    if budget is None:
        return [[l.name for l in layers]] if layers else []
    passes, cur, used = [], [], 0
    for l in layers:
        b = l.factor_bytes(stat_bytes)
        if cur and used + b > budget:
            passes.append(cur)
            cur, used = [], 0
        cur.append(l.name)
        used += b
    if cur:
        passes.append(cur)
    return passes


def plan_stages(block_bytes: list[int], n_stages: int, *, embed_bytes: int = 0, head_bytes: int = 0,
                layers: list[LayerCost] | None = None, stat_bytes: int = 4,
                factor_budget_bytes: int | None = None, worker_budget_bytes: int | None = None,
                factor_mode: str = "dense", sketch_rank: int = 1) -> list[StagePlan]:
    """Plan ``n_stages`` contiguous stages over the blocks, and the mode of every factor (:func:`assign_modes`
    with ``factor_budget_bytes``, then :func:`fit_passes` per stage for ``auto``).

    ``layers`` with ``block=None`` belong to the first stage when ``side="embedding"``, to the last when
    ``side="head"``; without a side, to the first when listed before any block layer, otherwise to the last.
    """
    layers = layers or []
    assign_modes(layers, stat_bytes, factor_budget_bytes, factor_mode, sketch_rank)
    nb = len(block_bytes)
    per_block: list[list[LayerCost]] = [[] for _ in range(nb)]
    pre, post = [], []
    seen_block = False
    for l in layers:
        if l.block is None:
            first = l.side == "embedding" if l.side else not seen_block
            (pre if first else post).append(l)
        else:
            seen_block = True
            per_block[l.block].append(l)
    cost = [block_bytes[b] + sum(l.factor_bytes(stat_bytes) for l in per_block[b]) for b in range(nb)]
    cost[0] += embed_bytes + sum(l.factor_bytes(stat_bytes) for l in pre)
    cost[-1] += head_bytes + sum(l.factor_bytes(stat_bytes) for l in post)
    plans = []
    bounds = partition(cost, n_stages)
    for i, (a, b) in enumerate(bounds):
        first, last = i == 0, i == len(bounds) - 1
        mine = (pre if first else []) + [l for blk in range(a, b + 1) for l in per_block[blk]] + (post if last else [])
        pbytes = sum(block_bytes[a:b + 1]) + (embed_bytes if first else 0) + (head_bytes if last else 0)
        if factor_mode == "auto":
            fit_passes(mine, stat_bytes, worker_budget_bytes)
        fbytes = sum(l.factor_bytes(stat_bytes) for l in mine)
        plans.append(StagePlan(i, a, b, first, last, pbytes, fbytes, [l.name for l in mine],
                               group_passes(mine, stat_bytes, worker_budget_bytes), {l.name: l.modes for l in mine}))
    return plans


# ------------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    """Stages × replicas: ``replicas`` copies of a ``stages``-stage pipeline over disjoint micro-batches, each
    pipeline keeping at most ``in_flight`` micro-batches in flight (1F1B: stage j holds at most in_flight − j);
    ``gpus_per_stage`` GPUs per stage actor (0 on CPU)."""
    stages: int
    replicas: int
    in_flight: int
    gpus_per_stage: float

    @property
    def gpus(self) -> float:
        """GPUs the layout uses."""
        return self.stages * self.replicas * self.gpus_per_stage

    def held(self, stage: int, microbatches: int) -> int:
        """Micro-batches stage ``stage`` holds at once: in_flight − stage under 1F1B, at least 1, at most the
        micro-batches one replica streams."""
        return max(1, min(self.in_flight - stage, microbatches))


def resolve_layout(cfg_stages: int, cfg_replicas: int | None, cfg_in_flight: int | None, gpus_available: float,
                   gpus_per_stage: float) -> Layout:
    """The layout of a run: ``replicas`` = ``cfg_replicas`` if set, else as many as the GPUs allow after the
    stages, floor(gpus_available / (stages · gpus_per_stage)), at least 1 (1 on CPU: no GPUs, or 0 per stage);
    ``in_flight`` = ``cfg_in_flight`` if set, else the number of stages (enough to keep every stage busy)."""
    if cfg_stages < 1:
        raise ValueError(f"stages={cfg_stages} must be >= 1")
    if cfg_replicas is not None:
        replicas = int(cfg_replicas)
    elif gpus_available > 0 and gpus_per_stage > 0:
        replicas = max(1, math.floor(gpus_available / (cfg_stages * gpus_per_stage) + 1e-9))
    else:
        replicas = 1
    return Layout(cfg_stages, replicas, int(cfg_in_flight or cfg_stages), float(gpus_per_stage))


# ---------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Arch:
    """The sizes of a transformer that set its activation memory and FLOPs (from its config.json).

    ``attn_dim`` = heads × head_dim (the width of q and of the attention output; equals ``hidden`` unless the config
    sets head_dim), ``kv_dim`` = kv_heads × head_dim; ``logit_width``: what the last stage outputs per token
    (vocabulary, labels, or hidden for a base model), or per sequence when ``logits_per_sequence``."""
    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    attn_dim: int
    vocab: int
    logit_width: int
    logits_per_sequence: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.attn_dim // self.heads)


@dataclass(frozen=True)
class Workload:
    """What one run streams and measures, as far as memory and FLOPs go (built from the run config)."""
    sequences: int
    seq_len: int
    micro_batch: int
    top_k: int
    fisher: str = "empirical"
    mc_samples: int = 1
    exact: bool = True
    exact_layers: tuple[str, ...] | None = None
    exact_chunk: int | None = None       # directions per exact sweep (None: all of a source stage's)
    exact_sequences: int | None = None   # sequences of the exact pass (None: all), whole micro-batches
    exact_dtype: str = "float32"         # precision of the exact HVPs (config exact_dtype: float32, float64, model)
    row_cache_bytes: int = 0             # the statistics pass's rows kept per worker for the projections pass

    @property
    def microbatches(self) -> int:
        return math.ceil(self.sequences / self.micro_batch)

    @property
    def exact_microbatches(self) -> int:
        """Micro-batches the exact pass measures (data.exact_sequences rounded up; all of them by default)."""
        if self.exact_sequences is None:
            return self.microbatches
        return min(self.microbatches, math.ceil(self.exact_sequences / self.micro_batch))

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch * self.seq_len

    def is_exact(self, layer: str) -> bool:
        """Whether ``layer`` gets exact h and h^GN (K HVPs through its downstream network)."""
        return self.exact and matches(layer, self.exact_layers)

    def seeds(self, logit_width: int) -> tuple[int, int]:
        """(backward passes per micro-batch in the statistics pass, fisher seeds among them): empirical 1 (the true
        seed is the fisher seed), mc 1 + mc_samples, type2 1 + logit_width (one per column of the Hessian root)."""
        fisher = {"empirical": 1, "mc": self.mc_samples, "type2": logit_width}[self.fisher]
        return (1 if self.fisher == "empirical" else 1 + fisher), fisher
