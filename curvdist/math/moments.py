"""Streaming second-moment accumulators of rows: the storage behind C_A, C_δ and the projected statistics, and
:class:`LayerSums`, every running sum of one layer.

Pure: torch only (no ray, no IO).  Every accumulator keeps a running *sum* over rows (normalised only when read,
``value(norm)``), so accumulators that saw disjoint rows combine by adding their sums (replicas, micro-batches).
Protocol: ``update(rows)``, ``value(norm)``, ``nbytes``, and the attribute ``sum`` (None until the first rows).
A factor is held dense (:class:`DenseSecondMoment`), sketched (:class:`curvdist.math.sketch.NystromSketch`) or not
at all (:mod:`curvdist.math.modes`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from curvdist.math import layers as L
from curvdist.math.sketch import NystromSketch, RangeSketch

# Symmetric accumulation: S is symmetric, so each update adds only the upper block triangle (block rows of
# ⌈d/_SYM_BLOCKS⌉, rounded up to 16): (nb + 1)/(2 nb) of the full product's flops.  Measured (one core, fp32, 4096
# rows, bench_kronecker.py's shapes): d = 384 / 1152 / 1536 / 2048 took 8 / 69 / 128 / 224 ms as one full addmm and
# 5 / 52 / 91 / 151 ms as 8 block rows (4 blocks: 5 / 51 / 92 / 162 ms); below _SYM_MIN_DIM one product is as fast.
_SYM_BLOCKS = 8
_SYM_MIN_DIM = 128
_MIRROR_TILE = 64


def _sym_block(dim: int) -> int:
    return dim if dim < _SYM_MIN_DIM else -(-dim // (16 * _SYM_BLOCKS)) * 16


class DenseSecondMoment:
    """S = Σ_i x_i x_iᵀ over streamed rows x_i ∈ R^d; allocated (d×d) lazily on the first rows' device.

    ``sum`` holds the upper block triangle only (block rows of :func:`_sym_block`; the blocks below the diagonal
    stay zero, so sums of several accumulators still add); :meth:`value` mirrors it into the full matrix."""

    def __init__(self, dim: int, dtype: torch.dtype):
        self.dim, self.dtype, self.sum = dim, dtype, None
        self.block = _sym_block(dim)

    @property
    def nbytes(self) -> int:
        return self.dim * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def update(self, rows: torch.Tensor) -> None:
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=rows.device)
        b = self.block
        for i in range(0, self.dim, b):     # block row i: x[i:i+b] x[i:]ᵀ, summed over rows
            self.sum[i:i + b, i:].addmm_(rows[:, i:i + b].T, rows[:, i:])

    def value(self, norm: float) -> torch.Tensor:
        if self.sum is None:
            return torch.zeros(self.dim, self.dim, dtype=self.dtype)
        s = self.sum / max(norm, 1)
        b, t = self.block, _MIRROR_TILE
        for i in range(b, self.dim, b):     # the blocks below the diagonal from those above it, in square tiles
            for j in range(0, i, t):        # (a whole strided block-transpose copy is 4× slower: 13 vs 3 ms at 2048)
                e = min(j + t, i)           # a tile wider than the block must stop at the diagonal block: the rows
                s[i:i + b, j:e] = s[j:e, i:i + b].T     # below it are not mirrored yet (d = 128: b = 16 < t)
        for i in range(0, self.dim, b):     # a diagonal block is a GEMM, symmetric only to rounding: its upper
            d = s[i:i + b, i:i + b]         # triangle, mirrored, makes the whole value exactly symmetric
            d.copy_(d.triu() + d.triu(1).T)
        return s


class ProjectedSecondMoment:
    """Σ_i (p_kᵀx_i)² for K fixed directions P (K, d): the diagonal of P S Pᵀ without S."""

    def __init__(self, P: torch.Tensor, dtype: torch.dtype):
        self.P, self.dtype, self.sum = P.detach().to(dtype), dtype, None

    @property
    def nbytes(self) -> int:
        return self.P.numel() * self.P.element_size()

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        if self.P.device != rows.device:
            self.P = self.P.to(rows.device)
        return rows @ self.P.T  # (R, K)

    def update_projected(self, c: torch.Tensor) -> None:
        s = (c * c).sum(0)
        self.sum = s if self.sum is None else self.sum + s

    def update(self, rows: torch.Tensor) -> None:
        self.update_projected(self.project(rows))

    def value(self, norm: float) -> torch.Tensor:
        s = self.sum if self.sum is not None else torch.zeros(self.P.shape[0], dtype=self.dtype)
        return s / max(norm, 1)


class LayerSums:
    """The accumulators of one layer and the counts beside them: G, G over half a, Σ_u ‖g_u‖² (dense statistics),
    C_A and C_δ held as ``modes`` says ("dense", "sketch" or None: not measured, ``status`` says why), the
    projections along ``direction`` (U (K, m), V (K, n)), and the Rayleigh–Ritz products Z = C V of sketched
    factors along ``bases`` ({"A": V (n, p), "delta": V (m, p)}, projections pass).  :meth:`sums` registers every
    running sum by attribute path, so that ``StatisticsCollector.state()`` carries (and all-reduces) each one."""

    def __init__(self, name: str, module: nn.Module, *, dense: bool, dtype: torch.dtype,
                 modes: tuple[str | None, str | None], status: list[str], sketch_rank: int, seed: int,
                 direction: tuple[torch.Tensor, torch.Tensor] | None = None,
                 bases: Mapping[str, torch.Tensor] | None = None):
        self.name, self.module, self.dense = name, module, dense
        self.m, self.n = L.shape(module)
        self.rows, self.status, self.seen_error = 0, list(status), False
        self.G = self.G_a = self.unit_sq = None   # Σ g, Σ g over half a, Σ_u ‖g_u‖² (curvdist.math.factors)
        self.units = 0
        self.modes = tuple(modes) if dense else (None, None)
        self.cov_A = self.cov_delta = None
        for attr, factor, d, mode in (("cov_A", "A", self.n, self.modes[0]), ("cov_delta", "delta", self.m,
                                                                              self.modes[1])):
            if mode == "dense":
                setattr(self, attr, DenseSecondMoment(d, dtype))
            elif mode == "sketch":
                setattr(self, attr, NystromSketch(d, sketch_rank, dtype, seed=seed, layer=name, factor=factor))
        self.proj_A = self.proj_delta = self.sop = None
        if direction is not None:
            U, V = direction
            if U.shape[-1] != self.m or V.shape[-1] != self.n or U.shape[0] != V.shape[0]:
                raise ValueError(f"layer {name}: directions need U (K, {self.m}) and V (K, {self.n}), "
                                 f"got {tuple(U.shape)} and {tuple(V.shape)}")
            self.proj_A, self.proj_delta = ProjectedSecondMoment(V, dtype), ProjectedSecondMoment(U, dtype)
        self.ritz_A = self.ritz_delta = None
        for attr, factor, d in (("ritz_A", "A", self.n), ("ritz_delta", "delta", self.m)):
            V = (bases or {}).get(factor)
            if V is None:
                continue
            if V.ndim != 2 or V.shape[0] != d:
                raise ValueError(f"layer {name}: the Ritz basis of C_{factor} must be ({d}, p), got {tuple(V.shape)}")
            setattr(self, attr, RangeSketch(V, dtype))

    def sums(self) -> dict[str, tuple[int, ...]]:
        """The running sums this layer keeps (by attribute path) and their shapes; fixed at construction."""
        K = self.proj_A.P.shape[0] if self.proj_A is not None else 0
        out: dict[str, tuple[int, ...]] = {}
        if self.dense:
            out.update({"G": (self.m, self.n), "G_a": (self.m, self.n), "unit_sq": (1,)})
        for attr in ("cov_A", "cov_delta", "ritz_A", "ritz_delta"):
            acc = getattr(self, attr)
            if isinstance(acc, DenseSecondMoment):
                out[f"{attr}.sum"] = (acc.dim, acc.dim)
            elif acc is not None:
                out[f"{attr}.sum"] = (acc.dim, acc.cols)
        if self.proj_A is not None:
            out.update({"proj_A.sum": (K,), "proj_delta.sum": (K,), "sop": (K,)})
        return out

    def get(self, path: str) -> torch.Tensor | None:
        obj, _, attr = path.rpartition(".")
        return getattr(getattr(self, obj) if obj else self, attr)

    def put(self, path: str, value: torch.Tensor) -> None:
        obj, _, attr = path.rpartition(".")
        setattr(getattr(self, obj) if obj else self, attr, value)

    def update_A(self, a: torch.Tensor) -> None:
        """Input rows a (R, n) into C_A (dense or sketched) and its Ritz product."""
        for acc in (self.cov_A, self.ritz_A):
            if acc is not None:
                acc.update(a)

    def update_delta(self, d: torch.Tensor) -> None:
        """Fisher error rows δ (R, m) into C_δ (dense or sketched) and its Ritz product."""
        for acc in (self.cov_delta, self.ritz_delta):
            if acc is not None:
                acc.update(d)

    def add_input_rows(self, a: torch.Tensor) -> torch.Tensor | None:
        """Valid input rows a (R, n) of one call: R, C_A and its Ritz product, the projections v_kᵀa_i (returned,
        (R, K), for :meth:`add_fisher_rows`; None without directions)."""
        self.rows += a.shape[0]
        self.update_A(a)
        if self.proj_A is None:
            return None
        cA = self.proj_A.project(a)
        self.proj_A.update_projected(cA)
        return cA

    def add_fisher_rows(self, d: torch.Tensor, cA: torch.Tensor | None) -> None:
        """Fisher error rows δ (R, m) of the call whose input projections are ``cA``: C_δ, its Ritz product, the
        projections u_kᵀδ_i and h^SoP's Σ_i (u_kᵀδ_i)² (v_kᵀa_i)²."""
        self.seen_error = True
        self.update_delta(d)
        if self.proj_delta is not None:
            cd = self.proj_delta.project(d)
            self.proj_delta.update_projected(cd)
            s = (cd * cd * cA * cA).sum(0)
            self.sop = s if self.sop is None else self.sop + s
