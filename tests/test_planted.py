"""Planted spectra (SPEC §4.3): a linear layer with squared loss and designed covariances has closed-form answers.

Inputs with sample covariance exactly C_A = P Λ Pᵀ and an error W − W* = U S Pᵀ with s_k ∝ λ_k^g give, for the
mean-over-elements squared loss of an m-output layer,
    σ_k = (2/m) s_k λ_k,   exact h_k = (2/m) λ_k   ⇒  α = 1/(1+g);
    empirical Fisher:  h^Kron_k = σ_k²             ⇒  α_Kron = 2, φ = 0, β = 2;
    type2:             h^Kron_k = h_k              ⇒  α_Kron = α.
"""
import math

import pytest
import torch
from torch import nn

import curvdist

M, N, S, K = 24, 32, 96, 12


def planted(g: float, seed: int = 0, micro_batches: int = 3, exact_blocks: int = 0):
    """The planted layer and its data: one exact design of S rows cut into ``micro_batches``, or, with
    ``exact_blocks`` > 0, that many micro-batches each an exact design of its own (S rows each)."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    P, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=dt))
    U, _ = torch.linalg.qr(torch.randn(M, M, generator=gen, dtype=dt))
    lam = torch.logspace(0, -2, N, dtype=dt)                      # λ_1 > … > λ_N
    Q, _ = torch.linalg.qr(torch.randn(S, N, generator=gen, dtype=dt))
    A = math.sqrt(S) * Q @ torch.diag(lam.sqrt()) @ P.T          # AᵀA/S = P Λ Pᵀ exactly
    s = lam[:M] ** g
    E = U @ torch.diag(s) @ P[:, :M].T                            # W − W* = U S Pᵀ (rank M)
    W_star = torch.randn(M, N, generator=gen, dtype=dt)
    layer = nn.Linear(N, M, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(W_star + E)
    Y = A @ W_star.T
    data = [(a, y) for a, y in zip(A.chunk(micro_batches), Y.chunk(micro_batches))]
    if exact_blocks:
        blocks = [math.sqrt(S) * torch.linalg.qr(torch.randn(S, N, generator=gen, dtype=dt))[0]
                  @ torch.diag(lam.sqrt()) @ P.T for _ in range(exact_blocks)]
        data = [(a, a @ W_star.T) for a in blocks]
    return nn.Sequential(layer), data, lam, s


@pytest.mark.parametrize("g", [0.0, 0.5, 1.5])
def test_planted_empirical(g):
    model, data, lam, s = planted(g)
    res = curvdist.analyze(model, data, loss="mse", top_k=K, fisher="empirical", dtype=torch.float64)
    row = res.layers.to_pylist()[0]
    d = res.directions.to_pydict()
    sigma = torch.tensor(d["sigma"], dtype=torch.float64)
    h = torch.tensor(d["h"], dtype=torch.float64)
    torch.testing.assert_close(sigma, (2 / M) * s[:K] * lam[:K], rtol=1e-9, atol=0)
    torch.testing.assert_close(h, (2 / M) * lam[:K], rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(d["h_kron"], dtype=torch.float64), sigma ** 2, rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(d["h_gn"], dtype=torch.float64), h, rtol=1e-9, atol=0)
    assert row["status"] == "ok"
    assert abs(row["alpha"] - 1 / (1 + g)) < 1e-6
    assert abs(row["alpha_kron"] - 2) < 1e-6
    assert abs(row["phi"]) < 1e-6
    assert abs(row["beta"] - 2) < 1e-6
    assert abs(row["alpha_kron"] - (row["beta"] + row["phi"])) < 1e-9
    assert abs(row["alpha"] - (row["alpha_kron"] + row["chi_slope"])) < 1e-9


@pytest.mark.parametrize("g", [0.5, 1.0])
def test_planted_type2(g):
    model, data, lam, s = planted(g, seed=1)
    res = curvdist.analyze(model, data, loss="mse", top_k=K, fisher="type2", dtype=torch.float64)
    row = res.layers.to_pylist()[0]
    d = res.directions.to_pydict()
    torch.testing.assert_close(torch.tensor(d["h_kron"]), torch.tensor(d["h"]), rtol=1e-9, atol=0)
    assert abs(row["alpha"] - 1 / (1 + g)) < 1e-6
    assert abs(row["alpha_kron"] - row["alpha"]) < 1e-6
    assert abs(row["chi_slope"]) < 1e-6
    assert abs(row["alpha_kron"] - (row["beta"] + row["phi"])) < 1e-9


def test_planted_mc_kron_close_to_exact():
    """mc: C_δ is a sampled estimate of (2/m) I, so h^Kron ≈ h within sampling error (not exactly)."""
    model, data, lam, s = planted(1.0, seed=2)
    res = curvdist.analyze(model, data, loss="mse", top_k=K, fisher="mc", mc_samples=64, dtype=torch.float64)
    d = res.directions.to_pydict()
    ratio = torch.tensor(d["h_kron"]) / torch.tensor(d["h"])
    assert (ratio - 1).abs().max() < 0.25
    row = res.layers.to_pylist()[0]
    assert abs(row["alpha_kron"] - (row["beta"] + row["phi"])) < 1e-9



def test_planted_is_stable_and_on_the_kronecker_floor():
    """Noise-free planted layer (every micro-batch an exact design, so every half has the planted gradient): stability
    1 for every direction, alpha_half_a = alpha_half_b = α = 1/(1+g); empirical errors sit exactly on the
    Cauchy–Schwarz floor h^Kron = (N/R)σ² (δ_i and a_i project on the same P-coordinate: ratio 1); null for type2."""
    g = 0.5
    model, data, lam, s = planted(g, exact_blocks=4)
    res = curvdist.analyze(model, data, loss="mse", top_k=K, fisher="empirical", dtype=torch.float64)
    row = res.layers.to_pylist()[0]
    d = res.directions.to_pydict()
    torch.testing.assert_close(torch.tensor(d["sigma"], dtype=torch.float64), (2 / M) * s[:K] * lam[:K], rtol=1e-9,
                               atol=0)
    assert abs(row["alpha"] - 1 / (1 + g)) < 1e-6
    assert max(abs(x - 1) for x in d["stability"]) < 1e-6 and row["stable_directions"] == K
    assert abs(row["alpha_half_a"] - row["alpha"]) < 1e-6 and abs(row["alpha_half_b"] - row["alpha"]) < 1e-6
    assert max(abs(x - 1) for x in d["kron_floor_ratio"]) < 1e-9
    t2 = curvdist.analyze(model, data, loss="mse", top_k=K, fisher="type2", dtype=torch.float64)
    assert all(x is None for x in t2.directions.column("kron_floor_ratio").to_pylist())
