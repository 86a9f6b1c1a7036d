"""Per-direction metrics of a layer: Rayleigh quotients of the Kronecker factors along the singular directions and
the columns derived from them (h^Kron, ρ, Φ, Λ, χ, concentration; SPEC §1).  Pure: torch only, tensors in and out."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


def rayleigh(C: Tensor | Operator, X: Tensor) -> Tensor:
    """diag(Xᵀ C X) for X (n, k): Σ_i X_ij (C X)_ij, i.e. x_jᵀ C x_j, without forming the k×k product."""
    if X.ndim != 2:
        raise ValueError(f"rayleigh: X must be (n, k), got shape {tuple(X.shape)}")
    CX = C(X) if callable(C) and not isinstance(C, Tensor) else C.to(X.dtype) @ X
    return (X * CX).sum(dim=0)


def direction_metrics(sigma: Tensor, rayleigh_delta: Tensor, rayleigh_A: Tensor,
                      lambda_delta: Tensor | None = None, lambda_A: Tensor | None = None,
                      h: Tensor | None = None, h_sop: Tensor | None = None) -> dict:
    """Per-direction columns (each (K,)) for directions k = 1..K, K = len(sigma):

        h_kron = (u_kᵀ C_δ u_k)(v_kᵀ C_A v_k) = rayleigh_delta · rayleigh_A
        rho_delta = rayleigh_delta / λ^δ_k,   rho_A = rayleigh_A / λ^A_k,   phi = rho_delta · rho_A
        Lambda = λ^δ_k λ^A_k,   chi = h / h_kron,   concentration = h_sop / h_kron

    The k-th eigenvalue of each factor pairs with the k-th singular direction by index (eigenvalue vectors
    longer than K are cut to K, shorter ones padded with NaN).  A missing input (None) gives NaN in every
    column that needs it, so the caller can write nulls.  The identity h_kron = phi · Lambda holds by
    construction, up to rounding (a few ulp).  Also returned: the inputs, under their own names.
    """
    sigma = torch.as_tensor(sigma)
    dt = sigma.dtype if sigma.is_floating_point() else torch.float64
    sigma = sigma.to(dt)
    K = sigma.shape[0]
    nan = torch.full((K,), float("nan"), dtype=dt, device=sigma.device)

    def col(x, name):
        if x is None:
            return nan
        x = torch.as_tensor(x).to(dtype=dt, device=sigma.device).reshape(-1)
        if name.startswith("lambda"):
            return torch.cat([x[:K], nan[x.shape[0]:]]) if x.shape[0] < K else x[:K]
        if x.shape[0] != K:
            raise ValueError(f"direction_metrics: {name} has {x.shape[0]} entries, sigma has {K}")
        return x

    rd, ra = col(rayleigh_delta, "rayleigh_delta"), col(rayleigh_A, "rayleigh_A")
    ld, la = col(lambda_delta, "lambda_delta"), col(lambda_A, "lambda_A")
    hh, hs = col(h, "h"), col(h_sop, "h_sop")
    h_kron = rd * ra
    rho_delta, rho_A = rd / ld, ra / la
    return {
        "sigma": sigma, "rayleigh_delta": rd, "rayleigh_A": ra, "lambda_delta": ld, "lambda_A": la,
        "h": hh, "h_sop": hs, "h_kron": h_kron, "rho_delta": rho_delta, "rho_A": rho_A,
        "phi": rho_delta * rho_A, "Lambda": ld * la, "chi": hh / h_kron, "concentration": hs / h_kron,
    }
