"""Stage planning and the memory model.  Pure: numbers in, plan out (no ray, no IO).

A *stage* is a contiguous run of blocks held by one actor; the first stage also holds the embedding, the last the
final norm and head.  WorkerPool are balanced by the bytes they hold — parameters plus the dense Kronecker factors of
their layers — with the linear-partition dynamic programme (minimise the largest stage), so that the stage that
bounds a worker's memory is as small as a contiguous split allows.

Factor memory is the wall at scale (LLaMA-7B: ~60 GiB of fp32 factors), so each stage's layers are further grouped
into *passes* whose factors fit ``worker_budget_bytes``; a layer whose own factors exceed the budget is kept alone
and its over-budget factor is skipped (its status says so; sketch mode is the way to measure it).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerCost:
    name: str
    block: int | None
    m: int
    n: int
    side: str | None = None  # block-less layers: "embedding" (first stage) or "head" (last stage); None: by position

    def factor_bytes(self, stat_bytes: int, budget: int | None = None) -> int:
        """G (m·n) plus the dense C_A (n²) and C_δ (m²) that fit ``budget`` each."""
        total = self.m * self.n * stat_bytes
        for d in (self.n, self.m):
            b = d * d * stat_bytes
            if budget is None or b <= budget:
                total += b
        return total


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

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.last_block + 1)

    def as_dict(self) -> dict:
        return {"stage": self.index, "blocks": f"{self.first_block}-{self.last_block}",
                "embedding": self.has_embedding, "head": self.has_head, "param_gb": self.param_bytes / 1e9,
                "factor_gb": self.factor_bytes / 1e9, "layers": len(self.layers), "passes": len(self.passes)}


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
        b = l.factor_bytes(stat_bytes, budget)
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
                factor_budget_bytes: int | None = None, worker_budget_bytes: int | None = None) -> list[StagePlan]:
    """Plan ``n_stages`` contiguous stages over the blocks.

    ``layers`` with ``block=None`` belong to the first stage when ``side="embedding"``, to the last when
    ``side="head"``; without a side, to the first when listed before any block layer, otherwise to the last.
    """
    layers = layers or []
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
    cost = [block_bytes[b] + sum(l.factor_bytes(stat_bytes, factor_budget_bytes) for l in per_block[b])
            for b in range(nb)]
    cost[0] += embed_bytes + sum(l.factor_bytes(stat_bytes, factor_budget_bytes) for l in pre)
    cost[-1] += head_bytes + sum(l.factor_bytes(stat_bytes, factor_budget_bytes) for l in post)
    plans = []
    bounds = partition(cost, n_stages)
    for i, (a, b) in enumerate(bounds):
        first, last = i == 0, i == len(bounds) - 1
        mine = (pre if first else []) + [l for blk in range(a, b + 1) for l in per_block[blk]] + (post if last else [])
        pbytes = sum(block_bytes[a:b + 1]) + (embed_bytes if first else 0) + (head_bytes if last else 0)
        fbytes = sum(l.factor_bytes(stat_bytes, factor_budget_bytes) for l in mine)
        plans.append(StagePlan(i, a, b, first, last, pbytes, fbytes, [l.name for l in mine],
                               group_passes(mine, stat_bytes, worker_budget_bytes)))
    return plans
