"""Streaming second-moment accumulators of rows: the storage behind C_A, C_δ and the projected statistics.

Pure: torch only (no ray, no IO).  Every accumulator keeps a running *sum* over rows (normalised only when read,
``value(norm)``), so accumulators that saw disjoint rows combine by adding their sums (replicas, micro-batches).
Protocol: ``update(rows)``, ``value(norm)``, ``nbytes``, and the attribute ``sum`` (None until the first rows).
"""
from __future__ import annotations

import torch


class DenseSecondMoment:
    """S = Σ_i x_i x_iᵀ over streamed rows x_i ∈ R^d; allocated (d×d) lazily on the first rows' device."""

    def __init__(self, dim: int, dtype: torch.dtype):
        self.dim, self.dtype, self.sum = dim, dtype, None

    @property
    def nbytes(self) -> int:
        return self.dim * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def update(self, rows: torch.Tensor) -> None:
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=rows.device)
        self.sum.addmm_(rows.T, rows)

    def value(self, norm: float) -> torch.Tensor:
        s = self.sum if self.sum is not None else torch.zeros(self.dim, self.dim, dtype=self.dtype)
        return s / max(norm, 1)


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
