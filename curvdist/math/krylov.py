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
"""
from __future__ import annotations

import torch

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


def default_basis(n: int, k: int, b: int) -> int:
    """Default ``max_basis``: min(n/2, max(12 b, k + 8 b)), at least k + 2b."""
    return max(min(n // 2, max(12 * b, k + 8 * b)), k + 2 * b)


def krylov(op: Operator, n: int, k: int, b: int, tol: float, seed: int, dt, dev, max_basis: int | None,
           max_iter: int, method: str = "krylov"):
    """The iteration of :func:`curvdist.math.spectral.top_eigen` (block Lanczos, or subspace iteration):
    ``(lam (k,), Y (n, k), info)``."""
    max_basis = max(int(max_basis), k + 2 * b) if max_basis is not None else default_basis(n, k, b)
    # the basis Q, its image W = C Q and T = Qᵀ C Q live in buffers of max_basis columns, filled block by block
    # (no concatenation per step: on one core that was ~15% of a 2048-dim solve)
    Qbuf = torch.empty(n, max_basis, dtype=dt, device=dev)
    Wbuf, Tbuf = torch.empty_like(Qbuf), torch.zeros(max_basis, max_basis, dtype=dt, device=dev)
    Qbuf[:, :b] = _orth(_gaussian((n, b), seed, dt, dev))
    Wbuf[:, :b] = op(Qbuf[:, :b])
    L, products, restarts, scores = b, 1, 0, []
    Tbuf[:b, :b] = Qbuf[:, :b].mT @ Wbuf[:, :b]
    last = slice(0, b)        # columns of the newest block
    true_res = method != "krylov"
    while True:
        Qa, Wa, T = Qbuf[:, :L], Wbuf[:, :L], Tbuf[:L, :L]
        theta, S = torch.linalg.eigh((T + T.mT) / 2)
        theta, S = theta.flip(0), S.flip(1)
        nu = _floor(theta[0], n)
        verify = True
        if method == "krylov":
            Wl = Wbuf[:, last]
            # next block: (I − Q Qᵀ) C Q_last by CGS2, its first pass from T's newest column block (= Qᵀ W_last)
            Qn, Rn = torch.linalg.qr(_project_out(Wl, Qa, Tbuf[:L, last]))
            # breakdown (C Q_i nearly inside span(Q), rank(C) < basis): the new block is rounding noise, blown up
            # by the QR; a second CGS2 pass makes it orthogonal to Q again, and the estimate below is void
            breakdown = bool((Rn.diagonal().abs() <= _BREAKDOWN * torch.linalg.vector_norm(Wl, dim=0).max()).any())
            if breakdown:
                Qn = _orth(_project_out(Qn, Qa))
            elif not true_res:
                res = torch.linalg.vector_norm(Rn @ S[last, :k], dim=0)
                # true residuals from the first step whose estimates pass, or reach the rounding floor's range
                true_res = (_monitor(res, theta[:k], tol, nu, scores, "eig") == "converged"
                            or bool((res <= 100 * nu).all()))
                verify = true_res or products >= max_iter
        if verify:        # the true residuals: to confirm a converged estimate, at a breakdown, at max_iter
            Y = Qa @ S[:, :k]
            res = torch.linalg.vector_norm(Wa @ S[:, :k] - Y * theta[:k], dim=0)
            stop = _monitor(res, theta[:k], tol, nu, scores, "eig") or ("max_iter" if products >= max_iter else None)
            if stop is not None:
                break
        if method == "subspace":  # Q ← orth(C Q S_b): one power step, then Rayleigh–Ritz on the block
            Qbuf[:, :b] = _orth(Wa @ S[:, :b])
            Wbuf[:, :b] = op(Qbuf[:, :b])
            Tbuf[:b, :b] = Qbuf[:, :b].mT @ Wbuf[:, :b]
            L = b
        else:
            if L + b > max_basis:  # thick restart: top k + b Ritz vectors, their images, next block
                keep = min(k + b, L)
                Qk, Wk = Qa @ S[:, :keep], Wa @ S[:, :keep]
                Qbuf[:, :keep], Wbuf[:, :keep] = Qk, Wk
                Tbuf[:keep, :keep] = torch.diag(theta[:keep])
                L, restarts = keep, restarts + 1
            last = slice(L, L + b)
            Qbuf[:, last] = Qn
            Wbuf[:, last] = op(Qn)
            c = Qbuf[:, :L + b].mT @ Wbuf[:, last]  # the new column block of T = Qᵀ C Q; the rest is known
            Tbuf[:L + b, last] = c
            Tbuf[last, :L] = c[:L].mT
            L += b
        products += 1
    if stop == "max_iter":
        _warn_unconverged("top_eigen", stop, products, scores[-1], tol)
    lam = _zero_below_rank_floor(theta[:k].clone(), n)
    return lam, Y, {"method": method, "iterations": products, "converged": stop != "max_iter", "stop": stop,
                    "restarts": restarts, "residuals": res}
