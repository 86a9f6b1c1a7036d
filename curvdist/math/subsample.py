"""Exact curvature from a subsample of the evaluation batch, with standard errors.  Pure: torch only.

Why.  The directions D_k = u_k v_kᵀ need a batch much larger than the gradient noise scale, but along *fixed*
directions h_k is linear in the data: with micro-batch b holding N_b loss terms and mean-loss curvature h_b,

    h_k = Σ_b N_b h_{b,k} / Σ_b N_b                                     (the full batch: b = 1..M)

so the same ratio over a simple random sample of B of the M micro-batches (:func:`curvdist.math.sequence.
exact_microbatches`, seeded) estimates it without bias to first order (a ratio estimator; exactly unbiased when
the N_b are equal).  Units are micro-batches: the Ray stages measure h per micro-batch (a stage-chained sweep sums
over a micro-batch's sequences), and both routes must report the same numbers.

Standard error (the ratio estimator of survey sampling, Cochran 1977, §6.3, with the finite-population correction,
because the target is the full-batch h along the full-batch directions):

    R̂_k      = Σ_b N_b h_{b,k} / Σ_b N_b
    Ĉ_{kl}   = (1 − B/M) · B/(B−1) · Σ_b N_b² (h_{b,k} − R̂_k)(h_{b,l} − R̂_l) / (Σ_b N_b)²
    h_se_k   = √Ĉ_kk

Ĉ is the covariance of the estimates across directions (one micro-batch moves every h_k at once), which the α fit
needs (:func:`curvdist.math.fit.alpha_se_from_h`).  With B = M (no subsampling) Ĉ = 0: h *is* the full-batch value;
the batch's own sampling noise is what :mod:`curvdist.math.noise` measures.  ``unit_rel_sd_k`` is the
per-micro-batch relative standard deviation √(B·Ĉ_kk/(1 − B/M)) / |R̂_k| (no correction): the figure the planner
turns into a sample size n for a target relative error e, n₀ = unit_rel_sd²/e², n = n₀ / (1 + n₀/M).

Everything accumulates as sums (:class:`ExactMoments`), so replicas add theirs before anything is divided, and the
in-process route and the Ray stages give the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_F64 = torch.float64


@dataclass(frozen=True)
class ExactMoments:
    """Additive sums over the measured micro-batches b (each with N_b loss terms, h_b (K,), h^GN_b (K,)):
    ``units`` B, ``n`` Σ N_b, ``w2`` Σ N_b², ``h1`` Σ N_b h_b, ``h2`` Σ N_b² h_b, ``hh`` Σ N_b² h_b h_bᵀ (K, K),
    and the same for h^GN (diagonal only: ``gn1``, ``gn2``, ``gngn``).  float64 on the CPU."""

    units: float
    n: float
    w2: float
    h1: Tensor
    h2: Tensor
    hh: Tensor
    gn1: Tensor
    gn2: Tensor
    gngn: Tensor

    @staticmethod
    def zeros(K: int) -> ExactMoments:
        z = torch.zeros(K, dtype=_F64)
        return ExactMoments(0.0, 0.0, 0.0, z, z, torch.zeros(K, K, dtype=_F64), z, z, z)

    @staticmethod
    def of_unit(n_b: float, h_b: Tensor | None, gn_b: Tensor | None, K: int) -> ExactMoments:
        """The moments of one micro-batch (None: not measured, counted as zeros)."""
        n_b = float(n_b)
        h = torch.zeros(K, dtype=_F64) if h_b is None else h_b.detach().double().cpu().reshape(K)
        g = torch.zeros(K, dtype=_F64) if gn_b is None else gn_b.detach().double().cpu().reshape(K)
        w2 = n_b * n_b
        return ExactMoments(1.0, n_b, w2, n_b * h, w2 * h, w2 * torch.outer(h, h), n_b * g, w2 * g, w2 * g * g)

    def __add__(self, other: ExactMoments) -> ExactMoments:
        return ExactMoments.from_tensors([a + b for a, b in zip(self.to_tensors(), other.to_tensors())])

    def to_tensors(self) -> list[Tensor]:
        """The sums as tensors (for an all-reduce over replicas): [units, n, w2] then the K-vectors and hh."""
        return [torch.tensor([self.units, self.n, self.w2], dtype=_F64), self.h1, self.h2, self.hh, self.gn1,
                self.gn2, self.gngn]

    @staticmethod
    def from_tensors(ts: list[Tensor]) -> ExactMoments:
        s = ts[0].double().cpu()
        return ExactMoments(float(s[0]), float(s[1]), float(s[2]), *[t.double().cpu() for t in ts[1:]])


@dataclass(frozen=True)
class SubsetEstimate:
    """h and h^GN (K,) from the measured micro-batches, their standard errors as estimates of the full-batch values
    (module docstring), the covariance of the h estimates (K, K), the per-micro-batch relative SD of h, and the
    micro-batches measured (``units``) out of ``population``.  Standard errors are NaN with fewer than 2 units."""

    h: Tensor
    h_gn: Tensor
    h_se: Tensor
    h_gn_se: Tensor
    h_cov: Tensor
    unit_rel_sd: Tensor
    units: int
    population: int


def _centered(w2: float, x1: Tensor, x2: Tensor, xx: Tensor, n: float) -> Tensor:
    """Σ_b N_b² (x_b − R)(x_b − R)ᵀ from the sums, R = x1/n (xx may be the (K, K) matrix or its diagonal)."""
    R = x1 / n
    if xx.dim() == 2:
        return xx - torch.outer(R, x2) - torch.outer(x2, R) + w2 * torch.outer(R, R)
    return xx - 2 * R * x2 + w2 * R * R


def estimate(mom: ExactMoments, population: int) -> SubsetEstimate:
    """:class:`SubsetEstimate` of the sums ``mom`` over B of the ``population`` (M) micro-batches of the batch."""
    B, M = int(round(mom.units)), int(population)
    if B < 1 or mom.n <= 0:
        raise ValueError("no micro-batch with loss terms was measured: nothing to estimate h from")
    if B > M:
        raise ValueError(f"{B} micro-batches measured but the batch has only population={M}")
    h, gn = mom.h1 / mom.n, mom.gn1 / mom.n
    K = h.shape[0]
    if B < 2:
        nan = torch.full((K,), math.nan, dtype=_F64)
        return SubsetEstimate(h, gn, nan, nan.clone(), torch.full((K, K), math.nan, dtype=_F64), nan.clone(), B, M)
    scale = B / (B - 1) / (mom.n * mom.n)          # the with-replacement variance of the ratio
    fpc = 1.0 - B / M
    cov0 = _centered(mom.w2, mom.h1, mom.h2, mom.hh, mom.n) * scale
    cov0 = (cov0 + cov0.T) / 2
    var_gn0 = _centered(mom.w2, mom.gn1, mom.gn2, mom.gngn, mom.n) * scale
    d0 = cov0.diagonal().clamp_min(0)
    with torch.no_grad():
        rel = torch.where(h != 0, (B * d0).sqrt() / h.abs(), torch.full_like(h, math.nan))
    return SubsetEstimate(h, gn, (fpc * d0).sqrt(), (fpc * var_gn0.clamp_min(0)).sqrt(), fpc * cov0, rel, B, M)


def units_for(unit_rel_sd: float, target_rel_err: float, population: int | None = None) -> int:
    """Micro-batches (units) whose subsample gives h to the relative standard error ``target_rel_err``, from the
    per-unit relative SD: n₀ = ⌈(unit_rel_sd / target)²⌉, with the finite-population correction n₀/(1 + n₀/M)
    when the batch holds ``population`` = M units; at least 2 (a standard error needs two)."""
    if not target_rel_err > 0:
        raise ValueError(f"target relative error {target_rel_err} must be > 0")
    n0 = (float(unit_rel_sd) / target_rel_err) ** 2
    n = n0 if population is None else n0 / (1 + n0 / population)
    return max(2, math.ceil(n - 1e-9))
