"""Signal or noise: per-unit gradient statistics and split halves of the evaluation batch.  Pure: torch only.

Units.  The evaluation batch is a sample of *units*: the items of the leading axis of a layer's input — a sequence
of a language model (its tokens are not independent draws), an image of a CNN, a sample of an MLP.  Unit u holds
the rows i ∈ u; with the summed-loss errors δ_i of the true-label seed (:mod:`curvdist.math.factors`) its gradient
is g_u = Σ_{i∈u} δ_i a_iᵀ, and G = (1/N) Σ_u g_u.  With U units and x_u = (U/N) g_u, G = (1/U) Σ_u x_u: the x_u
are read as U independent draws with mean μ = E G and per-unit covariance Σ (exact for units of equal loss-term
counts; otherwise the usual ratio estimate).

Gradient noise (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", App. A).
From S = (1/U) Σ_u ‖x_u‖²_F (E S = ‖μ‖² + tr Σ) and ‖G‖²_F (E ‖G‖² = ‖μ‖² + tr Σ / U), both unbiased:

    grad_trace_cov  tr Σ^   = U/(U−1) · (S − ‖G‖²)
    grad_mean_sq    ‖μ‖²^  = (U ‖G‖² − S) / (U−1)
    grad_snr                = ‖G‖² / (tr Σ^ / U)      ≈ 1 for pure sampling noise (μ = 0), 1 + U‖μ‖²/tr Σ otherwise
    noise_scale     B_simple = tr Σ^ / ‖μ‖²^         in units; null unless ‖μ‖²^ > 0

so grad_snr = 1 + U / noise_scale exactly.  The ratios are consistent, with an O(1/U) bias; their numerator and
denominator are unbiased.  grad_snr is a Frobenius-norm (all m·n entries) statement: noise spread over all
directions can hide a low-rank signal in the leading ones, which the split halves below see directly.

Per-unit norms without forming g_u: ‖Σ_{i∈u} δ_i a_iᵀ‖²_F = Σ_{i,j∈u} (δ_i·δ_j)(a_i·a_j), from the row Gram
matrices of the unit (T²(m+n) for T rows), or from g_u itself (T·m·n) when that is cheaper (convolutions: many
positions, small m·n).  Either way at most the cost of the G update itself.

Split halves.  Micro-batch ``key`` belongs to half :func:`half_of` (key mod 2 for integer keys: the in-process
route numbers micro-batches 0, 1, 2, … in data order, the Ray stages by their global index), so the halves do
not depend on the order in which micro-batches are processed, on pipelining or on replicas.  With G_a, G_b the
gradients of the two halves (each the mean over its own loss terms) and (σ^a_j, u^a_j, v^a_j) the top singular
triplets of G_a (likewise b):

    stability_k = clip(min(u^aₖᵀ G_b v^aₖ / σ^bₖ,  u^bₖᵀ G_a v^bₖ / σ^aₖ), 0, 1)

how much of the other half's k-th singular value each half's k-th direction carries: 1 when the halves agree on
the k-th pair (identical halves, a noise-free gradient), ≈ 0 when they are independent noise (a random direction
carries ~1/(√m + √n) of a top singular value).  A pair whose σ are nearly tied may swap or rotate between the halves
without losing stability (the other half's gradient still acts on it with ≈ σ_k).  ``stable_directions`` counts
the leading directions k = 1, 2, … up to the first with stability < 0.5.  Along the full-batch directions
(u_k, v_k) each half also gives σ^{(a)}_k = u_kᵀ G_a v_k and, from the same exact pass, h^{(a)}_k (the N_b·h_b
of its micro-batches over its own loss terms): ``alpha_half_a`` / ``alpha_half_b`` are α fitted on those.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch

STABLE = 0.5           # stability at or above which a direction counts as reproduced by both halves
HALF_SVD_ITERS = 12    # subspace iterations of the halves' SVDs: stability needs the directions to ~1e-2, not 1e-10


def half_of(key: Any) -> int:
    """Half (0 = a, 1 = b) of micro-batch ``key``: key mod 2 for integers, a stable hash bit otherwise."""
    if isinstance(key, bool) or not isinstance(key, int):
        try:
            key = int(key)          # numpy integers, 0-d tensors
        except (TypeError, ValueError):
            return zlib.crc32(repr(key).encode()) & 1
    return key % 2


def row_units(x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) unit of each of the ``n_rows`` rows of a layer input ``x``: its item on the leading axis (rows are
    flattened item-major, :func:`curvdist.math.layers.input_rows`); one unit when the rows do not split that way."""
    items = x.shape[0] if x.dim() > 1 else 1
    if items <= 0 or n_rows % items:
        return torch.zeros(n_rows, dtype=torch.long, device=x.device)
    return torch.arange(items, device=x.device).repeat_interleave(n_rows // items)


def unit_sq_norms(d: torch.Tensor, a: torch.Tensor, units: torch.Tensor, n_units: int | None = None,
                  max_elements: int = 2 ** 24) -> torch.Tensor:
    """‖Σ_{i∈u} d_i a_iᵀ‖²_F for every unit u = 0..n_units−1 (default: up to the largest id) → (n_units,).

    ``d`` (R, m), ``a`` (R, n), ``units`` (R,) unit ids (rows of several calls of the layer may interleave).  Rows are padded into (U, T, ·) blocks and
    the cheaper of the Gram form (T²(m+n) per unit) and the explicit one (T·m·n) is taken, ``max_elements`` bounding
    the work tensor of one chunk of units."""
    m, n = d.shape[1], a.shape[1]
    if n_units is None:
        n_units = int(units.max()) + 1 if units.numel() else 0
    out = torch.zeros(n_units, dtype=d.dtype, device=d.device)
    if d.shape[0] == 0:
        return out
    if bool((units[1:] < units[:-1]).any()):
        order = torch.argsort(units, stable=True)
        d, a, units = d[order], a[order], units[order]
    counts = torch.bincount(units, minlength=n_units)
    T = int(counts.max())
    if bool((counts == T).all()):          # equal blocks (no padding): views, no copy
        D, A = d.reshape(n_units, T, m), a.reshape(n_units, T, n)
    else:
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(units.shape[0], device=d.device) - start[units]
        D = d.new_zeros(n_units, T, m)
        A = a.new_zeros(n_units, T, n)
        D[units, pos] = d
        A[units, pos] = a
    gram = T * (m + n) <= m * n
    per_unit = T * T if gram else m * n
    step = max(1, max_elements // max(per_unit, 1))
    for s in range(0, n_units, step):
        Dc, Ac = D[s:s + step], A[s:s + step]
        if gram:                              # Σ_ij (δ_i·δ_j)(a_i·a_j)
            out[s:s + step] = ((Dc @ Dc.mT) * (Ac @ Ac.mT)).sum((1, 2))
        else:                                 # ‖g_u‖² with g_u = Σ_i δ_i a_iᵀ
            out[s:s + step] = (Dc.mT @ Ac).square().sum((1, 2))
    return out


@dataclass(frozen=True)
class GradientNoise:
    """The layer's gradient signal and noise (module docstring); None where undefined (fewer than 2 units)."""

    n_units: int
    grad_mean_sq: float | None = None
    grad_trace_cov: float | None = None
    grad_snr: float | None = None
    noise_scale: float | None = None

    def as_dict(self) -> dict:
        return {"n_units": self.n_units, "grad_mean_sq": self.grad_mean_sq, "grad_trace_cov": self.grad_trace_cov,
                "grad_snr": self.grad_snr, "noise_scale": self.noise_scale}


def gradient_noise(G_sq: float, unit_sq_sum: float, n_units: int, n_terms: int) -> GradientNoise:
    """Estimates from ‖G‖²_F (G normalised by the N loss terms), Σ_u ‖g_u‖² (summed-loss unit gradients) and U."""
    U = int(n_units)
    if U < 2 or n_terms <= 0:
        return GradientNoise(U)
    S = (U / n_terms) ** 2 * float(unit_sq_sum) / U
    G_sq = float(G_sq)
    tr = U / (U - 1) * (S - G_sq)
    mean_sq = (U * G_sq - S) / (U - 1)
    snr = G_sq * U / tr if tr > 0 else None
    scale = tr / mean_sq if mean_sq > 0 and tr > 0 else None
    return GradientNoise(U, mean_sq, tr, snr, scale)


def halves(G_sum: torch.Tensor, G_a_sum: torch.Tensor | None, n_terms: int, n_terms_a: int):
    """``(G_a, G_b)``, each the mean over its own loss terms, from the sums Σ g over all and over half a; None when
    a half is empty."""
    n_b = n_terms - n_terms_a
    if G_a_sum is None or n_terms_a <= 0 or n_b <= 0:
        return None
    return G_a_sum / n_terms_a, (G_sum - G_a_sum) / n_b


def half_means(sums: torch.Tensor, n_terms: list[int]) -> torch.Tensor | None:
    """(2, K) per-half means from per-half sums Σ_b N_b·x_b (2, K) and loss terms (N_a, N_b); None if a half is
    empty."""
    if min(n_terms) <= 0:
        return None
    return sums / torch.tensor([[float(n_terms[0])], [float(n_terms[1])]], dtype=sums.dtype)


def split_half_stability(G_a: torch.Tensor, G_b: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """stability_k, k = 1..K (module docstring) → (K,) in [0, 1]; NaN where a half's σ_k is 0."""
    from curvdist.math.spectral import top_singular

    sa, Ua, Va = top_singular(G_a, k, seed=seed, n_iter=HALF_SVD_ITERS)
    sb, Ub, Vb = top_singular(G_b, k, seed=seed + 1, n_iter=HALF_SVD_ITERS)
    A, B = G_a.to(Ua.dtype), G_b.to(Ub.dtype)
    a_in_b = (Ua * (B @ Va)).sum(0)           # u^aₖᵀ G_b v^aₖ
    b_in_a = (Ub * (A @ Vb)).sum(0)
    r = torch.minimum(a_in_b / sb, b_in_a / sa)
    r = torch.where((sa > 0) & (sb > 0), r.clamp(0.0, 1.0), torch.full_like(r, float("nan")))
    return r


def half_sigma(G_half: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """σ^{(half)}_k = u_kᵀ G_half v_k along the full-batch directions, U (K, m), V (K, n) → (K,)."""
    return ((U.to(G_half.dtype) @ G_half) * V.to(G_half.dtype)).sum(1)


def stable_directions(stability) -> int | None:
    """Leading directions with stability ≥ :data:`STABLE` (k = 1, 2, … up to the first below it); None if unknown."""
    if stability is None:
        return None
    vals = [float(x) for x in stability]
    if not vals or math.isnan(vals[0]):
        return None
    n = 0
    for x in vals:
        if not x >= STABLE:       # NaN ends the run too
            break
        n += 1
    return n
