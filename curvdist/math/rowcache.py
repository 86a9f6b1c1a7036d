"""Rows kept from the statistics pass, so that the projections pass needs no second forward and backward.

Pure: torch only (no ray, no IO).  The projected statistics along the directions D_k = u_k v_kᵀ
(:mod:`curvdist.math.factors`: Rayleigh quotients, h^SoP, Rayleigh–Ritz products of sketched factors) are sums over
the same rows a_i and fisher errors δ_i that the statistics pass already saw: the projections pass draws the same
seeds (:mod:`curvdist.math.sequence`), so its rows equal those.  When every layer's rows fit ``budget_bytes`` the
:class:`RowCache` keeps them (masked, in the accumulation dtype, on their device) and :meth:`RowCache.replay` feeds
them to a projections collector, which then returns exactly what a second pass would (same rows, same order).
Over the budget the cache empties itself and says so (``complete`` is False): the caller runs the second pass.

    cache = RowCache(2**30)
    stats = collect_statistics(..., row_cache=cache)
    proj = collect_projections(..., rows=cache)       # replayed when cache.complete, else a second pass

Cost: one (R, K) projection per row block instead of a forward and backward of the whole batch (measured in
benchmarks/bench_kronecker.py, through the Ray runner in benchmarks/bench_pipeline.py --projections, and in
docs/design.md).  Memory: 4 · R · Σ_layers (m + n) bytes in float32.  Every Ray stage worker keeps one for its
layers (``row_cache_gb``, :mod:`curvdist.runner.worker`).
"""
from __future__ import annotations

import torch

ROW_CACHE_BYTES = 2 ** 30   # analyze's default: the rows of a few-hundred-million-number batch


class RowCache:
    """Per layer, the input rows a of every module call and the fisher error rows δ of every backward, each δ block
    with the index of the a block of its call."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.nbytes = 0
        self.n_terms = 0
        self.overflowed = self.budget <= 0
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.errors: dict[str, list[tuple[int, torch.Tensor]]] = {}

    @property
    def complete(self) -> bool:
        """Whether every row of the pass is held (no overflow and at least one micro-batch closed)."""
        return not self.overflowed and self.n_terms > 0

    def _fits(self, x: torch.Tensor) -> bool:
        if self.overflowed:
            return False
        self.nbytes += x.numel() * x.element_size()
        if self.nbytes > self.budget:
            self.overflowed = True
            self.inputs, self.errors, self.nbytes = {}, {}, 0
            return False
        return True

    def add_inputs(self, layer: str, a: torch.Tensor) -> int:
        """Keep input rows a (R, n) of one call of ``layer``; returns the block's index (-1 once overflowed)."""
        if not self._fits(a):
            return -1
        blocks = self.inputs.setdefault(layer, [])
        blocks.append(a)
        return len(blocks) - 1

    def add_errors(self, layer: str, block: int, d: torch.Tensor) -> None:
        """Keep fisher error rows δ (R, m) whose input rows are block ``block`` of ``layer``."""
        if block >= 0 and self._fits(d):
            self.errors.setdefault(layer, []).append((block, d))

    def add_terms(self, n_terms: int) -> None:
        self.n_terms += int(n_terms)

    def replay(self, collector) -> None:
        """Feed the kept rows to ``collector`` (a :class:`curvdist.math.factors.StatisticsCollector` of some of the
        cached layers), as its own forward and backward hooks would have, and set its loss-term count."""
        if not self.complete:
            raise RuntimeError("the row cache is incomplete (over its budget): run the projections pass instead")
        for name, st in collector.layers.items():
            blocks = self.inputs.get(name, [])
            projected = [st.add_input_rows(a) for a in blocks]
            for block, d in self.errors.get(name, []):
                st.add_fisher_rows(d, projected[block])
        collector.n_terms = self.n_terms
