"""The top-k eigenvalues of a Kronecker factor without its eigenvectors: what the spectral step needs, since the
directions D_k come from G (:mod:`curvdist.math.measure`).  Pure math: torch only (no ray, no IO).

Same accuracy contract as :func:`curvdist.math.spectral.top_eigen` (its module docstring): a returned λ_j has a Ritz
residual r_j ≤ tol·λ_j + 2ν, so its relative error is at most tol above the rounding floor.  Cheaper in two ways:
dense ``eigvalsh`` (no eigenvectors, ~0.55× the time of ``eigh``) up to a larger size, and a smaller Lanczos block.
"""
from __future__ import annotations

import torch
from torch import Tensor

from curvdist.math.krylov import krylov
from curvdist.math.spectral import (
    EXACT_BELOW_CUDA,
    Operator,
    _as_operator,
    _check_k,
    _zero_below_rank_floor,
    default_tol,
)

__all__ = ["EXACT_EIGVALS_BELOW", "eigenvalue_block", "top_eigenvalues"]

# Eigenvalues only (top_eigenvalues): dense eigvalsh against Krylov with block eigenvalue_block(20) = 12, one core,
# principal submatrices of bench_kronecker.py's factors (CPU ms, dense/Krylov): fp32 n = 384 3.1/7.4–8.9,
# 512 6.0/9.3–12, 640 10/9.4–13, 768 16/11–15, 1024 44/15–20; fp64 (tol 1e-10) 512 9.4/22–29, 640 17/25–34,
# 768 32/28–39, 1024 83/38–53.
EXACT_EIGVALS_BELOW = {torch.float64: 768, torch.float32: 640}


def eigenvalue_block(k: int) -> int:
    """Block size of :func:`top_eigenvalues`' Krylov solve: ⌈k/2⌉ + 2 (12 for K = 20).  A smaller block than
    ``top_eigen``'s k + 4 costs more (memory-bound) products but fewer flops and a smaller Rayleigh–Ritz problem;
    measured on one core (the factors of bench_kronecker.py, fp32, K = 20), block 8 / 12 / 24: 1152-dim
    11 / 12 / 14 ms, 1536-dim 19–26 / 18–28 / 23–33 ms, 2048-dim 41 / 45 / 59 ms.  It stays above k/2, so an
    eigenvalue repeated up to that many times among the top k is still found (a block Krylov space holds at most b
    vectors of any one eigenspace)."""
    return -(-int(k) // 2) + 2


def top_eigenvalues(C: Tensor | Operator, k: int, *, n: int | None = None, dtype: torch.dtype | None = None,
                    device=None, tol: float | None = None, seed: int = 0, exact_below: int | None = None,
                    block: int | None = None, max_basis: int | None = None, max_iter: int = 300, clip: bool = False,
                    return_info: bool = False):
    """The top-k eigenvalues (k,) of a symmetric PSD factor, descending: :func:`curvdist.math.spectral.top_eigen`
    without its vectors (the spectral step needs λ_k only; the directions come from G), same accuracy contract.

    Dense ``torch.linalg.eigvalsh`` (no eigenvectors: 0.55× the time of ``eigh``) when n ≤ ``exact_below``
    (default :data:`EXACT_EIGVALS_BELOW`, or :data:`EXACT_BELOW_CUDA` on a GPU) or 4(k + b) ≥ n; otherwise
    ``top_eigen``'s block Lanczos with block b = :func:`eigenvalue_block` (k) and the same residual test.
    """
    op, n, dt, dev, dense = _as_operator(C, n, dtype, device)
    k = _check_k(k, n, clip, "top_eigen")
    tol = default_tol(dt) if tol is None else float(tol)
    b = max(1, int(block) if block is not None else eigenvalue_block(k))
    if exact_below is None:
        exact_below = EXACT_BELOW_CUDA if torch.device(dev).type == "cuda" else EXACT_EIGVALS_BELOW[dt]
    if n <= exact_below or 4 * (k + b) >= n:
        if dense is None:
            dense = op(torch.eye(n, dtype=dt, device=dev))
        lam = _zero_below_rank_floor(torch.linalg.eigvalsh((dense + dense.mT) / 2).flip(0)[:k], n)
        return (lam, {"method": "dense", "iterations": 0, "converged": True}) if return_info else lam
    lam, _, info = krylov(op, n, k, b, tol, seed, dt, dev, max_basis, max_iter, dense=dense)
    return (lam, info) if return_info else lam
