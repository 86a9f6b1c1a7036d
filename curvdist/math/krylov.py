"""The block Krylov iteration behind :func:`curvdist.math.spectral.top_eigen` and
:func:`curvdist.math.eigenvalues.top_eigenvalues`: block Lanczos with full re-orthogonalisation and thick restarts (or
subspace iteration, for comparison), under the accuracy contract of :mod:`curvdist.math.spectral`.  Pure math: torch
only (no ray, no IO).

Each step costs one block product C Q_i (memory-bound: most of the time on the CPU), the CGS2 projection of its image
against the basis, a QR of the new block and a small ``eigh`` of the projected matrix T = Qᵀ C Q.  The convergence test
reads the residuals from the block Lanczos relation, C Q = Q T + Q_{i+1} R_{i+1} E_iᵀ (full re-orthogonalisation: only
the newest block's image leaves span(Q), also after a thick restart, whose kept Ritz vectors have their residuals in
the next block), so the residual of a Ritz pair (θ_j, Q s_j) is ‖R_{i+1} s_j[newest block]‖ from b × b numbers, not
two n × L × k products a step.  That identity holds up to rounding, so from the first step whose estimates pass the
test, or are all within the rounding floor's range (100 ν, where the two can differ), the iteration tests the true
residuals ‖C y_j − θ_j y_j‖ = ‖W s_j − θ_j Q s_j‖: it stops on those only.
While the score (max_j r_j / (tol·θ_j + 2ν)) is far above 1 the small ``eigh`` is skipped for as many products as
it cannot fall by (:data:`_RATE` per product); a restart, a breakdown and ``max_iter`` always check.  Measured on the
13 large factors of bench_kronecker.py (float32, one core, a shared machine): 656 → 477 ms for the same products
(188; one factor took one more), against the previous loop, which formed the Ritz vectors and their images every
step and copied each product into a strided buffer.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from curvdist.math.spectral import (
    _BREAKDOWN,
    Operator,
    _floor,
    _gaussian,
    _monitor,
    _orth,
    _project_out,
    _warn_unconverged,
    _zero_below_rank_floor,
)

__all__ = ["default_basis", "krylov"]

# The largest fall of the convergence score (max_j r_j / (tol·θ_j + 2ν)) in one block product assumed when skipping
# the Rayleigh–Ritz check (measured on bench_kronecker.py's factors: at most ~3×): after a check at score s the next
# comes min(⌈log s / log _RATE⌉ − 1, _MAX_SKIP) products later, so a fast fall costs at most a product or two more.
_RATE = 10.0
_MAX_SKIP = 3


def default_basis(n: int, k: int, b: int) -> int:
    """Default ``max_basis``: min(n/2, max(12 b, k + 8 b)), at least k + 2b."""
    return max(min(n // 2, max(12 * b, k + 8 * b)), k + 2 * b)


def krylov(op: Operator, n: int, k: int, b: int, tol: float, seed: int, dt, dev, max_basis: int | None,
           max_iter: int, method: str = "krylov", dense: Tensor | None = None):
    """The iteration of :func:`curvdist.math.spectral.top_eigen` (block Lanczos, or subspace iteration):
    ``(lam (k,), Y (n, k), info)``.  ``dense``: the symmetric matrix behind ``op``, if any (its products are then
    written straight into the basis buffers)."""
    max_basis = max(int(max_basis), k + 2 * b) if max_basis is not None else default_basis(n, k, b)
    # the basis Q, its image W = C Q (both stored transposed: a block is a contiguous run of rows) and T = Qᵀ C Q live
    # in buffers of max_basis columns, filled block by block (no concatenation per step: on one core that was ~15%
    # of a 2048-dim solve, and the transposed layout saves a strided copy of each product)
    QT = torch.empty(max_basis, n, dtype=dt, device=dev)
    WT, Tbuf = torch.empty_like(QT), torch.zeros(max_basis, max_basis, dtype=dt, device=dev)

    def image(rows: slice) -> None:  # WT[rows] = (C Q[:, rows])ᵀ = Q[:, rows]ᵀ C
        if dense is not None:
            torch.mm(QT[rows], dense, out=WT[rows])
        else:
            WT[rows] = op(QT[rows].mT).mT

    QT[:b] = _orth(_gaussian((n, b), seed, dt, dev)).mT
    image(slice(0, b))
    L, products, restarts, scores, skip = b, 1, 0, [], 0
    Tbuf[:b, :b] = QT[:b] @ WT[:b].mT
    last = slice(0, b)        # rows of the newest block
    true_res = method != "krylov"
    while True:
        Qa, Wa, T = QT[:L], WT[:L], Tbuf[:L, :L]
        check = skip == 0 or L + b > max_basis or products >= max_iter or method != "krylov"
        if check:
            theta, S = torch.linalg.eigh((T + T.mT) / 2)
            theta, S = theta.flip(0), S.flip(1)
            nu = _floor(theta[0], n)
        else:
            skip -= 1
        verify = check
        if method == "krylov":
            Wl = WT[last]
            # next block: (I − Q Qᵀ) C Q_last by CGS2, its first pass from T's newest column block (= Qᵀ W_last)
            P = Wl - Tbuf[:L, last].mT @ Qa
            Qn, Rn = torch.linalg.qr((P - (P @ Qa.mT) @ Qa).mT)
            # breakdown (C Q_i nearly inside span(Q), rank(C) < basis): the new block is rounding noise, blown up
            # by the QR; a second CGS2 pass makes it orthogonal to Q again, and the estimate below is void
            breakdown = bool((Rn.diagonal().abs() <= _BREAKDOWN * torch.linalg.vector_norm(Wl, dim=1).max()).any())
            if breakdown:
                Qn = _orth(_project_out(Qn, Qa.mT))
                verify = True
            elif check and not true_res:
                res = torch.linalg.vector_norm(Rn @ S[last, :k], dim=0)
                # true residuals from the first step whose estimates pass, or reach the rounding floor's range
                true_res = (_monitor(res, theta[:k], tol, nu, scores, "eig") == "converged"
                            or bool((res <= 100 * nu).all()))
                verify = true_res or products >= max_iter
                if not true_res:  # no check while the score cannot have reached 1 (it falls < _RATE× a step)
                    skip = min(_MAX_SKIP, max(0, math.ceil(math.log(scores[-1]) / math.log(_RATE)) - 1))
        if verify and not check:   # a breakdown on a skipped step: test it after all
            theta, S = torch.linalg.eigh((T + T.mT) / 2)
            theta, S = theta.flip(0), S.flip(1)
            nu = _floor(theta[0], n)
        if verify:        # the true residuals: to confirm a converged estimate, at a breakdown, at max_iter
            YT = S[:, :k].mT @ Qa
            res = torch.linalg.vector_norm(S[:, :k].mT @ Wa - theta[:k, None] * YT, dim=1)
            stop = _monitor(res, theta[:k], tol, nu, scores, "eig") or ("max_iter" if products >= max_iter else None)
            if stop is not None:
                break
        if method == "subspace":  # Q ← orth(C Q S_b): one power step, then Rayleigh–Ritz on the block
            QT[:b] = _orth((S[:, :b].mT @ Wa).mT).mT
            image(slice(0, b))
            Tbuf[:b, :b] = QT[:b] @ WT[:b].mT
            L = b
        else:
            if L + b > max_basis:  # thick restart: top k + b Ritz vectors, their images, next block
                keep = min(k + b, L)
                QkT, WkT = S[:, :keep].mT @ Qa, S[:, :keep].mT @ Wa
                QT[:keep], WT[:keep] = QkT, WkT
                Tbuf[:keep, :keep] = torch.diag(theta[:keep])
                L, restarts = keep, restarts + 1
            last = slice(L, L + b)
            QT[last] = Qn.mT
            image(last)
            c = QT[:L + b] @ WT[last].mT  # the new column block of T = Qᵀ C Q; the rest is known
            Tbuf[:L + b, last] = c
            Tbuf[last, :L] = c[:L].mT
            L += b
        products += 1
    if stop == "max_iter":
        _warn_unconverged("top_eigen", stop, products, scores[-1], tol)
    lam = _zero_below_rank_floor(theta[:k].clone(), n)
    return lam, YT.mT, {"method": method, "iterations": products, "converged": stop != "max_iter", "stop": stop,
                        "restarts": restarts, "residuals": res}
