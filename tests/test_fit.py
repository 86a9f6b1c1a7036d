"""curvdist.math.fit: exact recovery on synthetic power laws, the decomposition identity, bad inputs, rank-model BICs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curvdist.math.fit import LayerSummary, fit_exponents, ols, rank_model_bics, summarize_layer

LAYER_FIELDS = ["alpha", "r2_alpha", "alpha_se", "alpha_se_h", "alpha_kron", "r2_alpha_kron", "beta", "phi", "chi_slope", "gamma", "r2_gamma",
                "s", "r2_s", "n_valid", "n_valid_kron", "pr_h", "pr_grad", "triangle_error", "triangle_rel_error",
                "rank_model", "bic_power_law", "bic_exponential", "bic_lognormal", "status"]


def power_law(K=20, gamma=1.3, alpha=1.7, c=0.3, d=2.0):
    k = np.arange(1, K + 1, dtype=np.float64)
    sigma = c * k ** -gamma
    return sigma, d * sigma ** alpha


def test_ols_line_and_degenerate():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    b, a, r2 = ols(x, 2.5 - 0.75 * x)
    assert b == pytest.approx(-0.75, abs=1e-15) and a == pytest.approx(2.5, abs=1e-15) and r2 == 1.0
    assert all(math.isnan(v) for v in ols([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert all(math.isnan(v) for v in ols([1.0], [2.0]))
    with pytest.raises(ValueError):
        ols([1.0, 2.0], [1.0])


@pytest.mark.parametrize("gamma,alpha", [(1.3, 1.7), (0.2, 2.0), (2.5, 0.8)])
def test_exact_power_laws_recovered(gamma, alpha):
    sigma, h = power_law(gamma=gamma, alpha=alpha)
    e = fit_exponents(sigma, h)
    assert e.status == "ok" and e.n_valid == 20
    assert abs(e.alpha - alpha) < 1e-12 and abs(e.gamma - gamma) < 1e-12
    assert abs(e.s - alpha * gamma) < 1e-12          # h_k ∝ k^(−αγ), already descending
    assert e.r2_alpha == pytest.approx(1, abs=1e-12) and e.r2_gamma == pytest.approx(1, abs=1e-12)
    s = summarize_layer(sigma, h)
    assert s.triangle_error < 1e-11 and s.triangle_rel_error < 1e-11


def test_s_sorts_h_and_gamma_uses_every_direction():
    sigma, h = power_law(K=12)
    h = h.copy()
    h[[2, 7]] = h[[7, 2]]                            # h out of order: s uses the sorted values
    h[-1] = -1e-9                                    # invalid for α and s, still counted by γ
    e = fit_exponents(sigma, h)
    assert e.n_valid == 11 and abs(e.gamma - 1.3) < 1e-12
    ranks = np.arange(1, 12, dtype=np.float64)
    assert abs(e.s + ols(np.log(ranks), np.log(np.sort(h[:-1])[::-1]))[0]) < 1e-15


def test_inputs_numpy_list_torch_agree():
    sigma, h = power_law()
    a = fit_exponents(sigma, h)
    assert fit_exponents(list(sigma), list(h)) == a
    assert fit_exponents(torch.tensor(sigma, dtype=torch.float64), torch.tensor(h, requires_grad=True)) == a


def test_participation_ratios():
    e = fit_exponents(np.ones(8), np.full(8, 3.0))
    assert e.pr_h == pytest.approx(8) and e.pr_grad == pytest.approx(8)
    sigma, h = np.array([3.0, 2.0, 1.0, 0.5]), np.array([4.0, 1.0, -2.0, 1.0])
    e = fit_exponents(sigma, h)
    assert e.pr_h == pytest.approx(36 / 18)          # positive h only
    assert e.pr_grad == pytest.approx((sigma ** 2).sum() ** 2 / (sigma ** 4).sum())


def test_too_few_valid():
    e = fit_exponents([3.0, 2.0, 1.0, 0.5], [1.0, -1.0, 0.0, 0.5])
    assert e.alpha is None and e.r2_alpha is None and e.s is None and e.n_valid == 2
    assert e.status == "too_few_valid: n_valid=2 < 3"
    assert e.gamma is not None                       # γ depends on σ only
    s = summarize_layer([3.0, 2.0, 1.0, 0.5], [1.0, -1.0, 0.0, 0.5])
    assert s.status.startswith("too_few_valid") and s.alpha is None and s.triangle_error is None
    e = fit_exponents([2.0, 1.0], [1.0, 1.0])
    assert e.alpha is None and e.gamma is None and e.status.startswith("too_few_valid")


@pytest.mark.parametrize("sigma,reason", [([0.0] * 5, "zero_gradient"), ([math.nan] * 5, "non_finite_gradient"),
                                          ([math.inf, math.nan, 0, 0, 0], "non_finite_gradient"),
                                          ([], "no_directions")])
def test_zero_or_non_finite_gradient(sigma, reason):
    h = np.ones(len(sigma))
    e = fit_exponents(sigma, h)
    assert e.status.startswith(reason) and e.alpha is None and e.gamma is None and e.pr_grad is None
    s = summarize_layer(sigma, h, h_kron=h)
    assert s.status.startswith(reason) and s.alpha is None and s.alpha_kron is None and s.rank_model is None


def test_nan_zero_and_negative_entries_are_masked():
    sigma, h = power_law(K=15)
    sigma, h = sigma.copy(), h.copy()
    h[3], h[5], h[9], sigma[12] = math.nan, 0.0, -h[9], math.inf
    e = fit_exponents(sigma, h)
    keep = np.ones(15, bool)
    keep[[3, 5, 9, 12]] = False
    assert e.n_valid == 11 and abs(e.alpha - 1.7) < 1e-12 and e.status == "ok"
    assert abs(e.gamma - 1.3) < 1e-12                # γ over the finite positive σ at their own ranks k


def decomposition_inputs(K=20, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    sigma = np.sort(rng.lognormal(-2, 1, K))[::-1]
    Lam = sigma ** 2 * rng.lognormal(0, noise, K)
    Phi = rng.lognormal(0, noise, K)
    chi = sigma ** -0.4 * rng.lognormal(0, noise, K)
    h_kron = Phi * Lam
    return sigma, chi * h_kron, h_kron, Lam, Phi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decomposition_identity(seed):
    sigma, h, h_kron, Lam, Phi = decomposition_inputs(seed=seed)
    s = summarize_layer(sigma, h, h_kron=h_kron, Lambda=Lam, Phi=Phi)
    assert s.status == "ok" and s.n_valid == s.n_valid_kron == 20
    assert abs(s.alpha_kron - (s.beta + s.phi)) < 1e-9
    assert abs(s.alpha - (s.alpha_kron + s.chi_slope)) < 1e-9
    assert s.alpha == fit_exponents(sigma, h).alpha
    assert sorted(s.as_dict()) == sorted(LAYER_FIELDS) and list(s.as_dict()) == LAYER_FIELDS


def test_decomposition_exact_planted():
    """Empirical-Fisher planted case: h^Kron = σ², Λ = σ², Φ = 1  ⇒  α_Kron = β = 2, φ = 0."""
    sigma, h = power_law(alpha=0.6)
    s = summarize_layer(sigma, h, h_kron=sigma ** 2, Lambda=sigma ** 2, Phi=np.ones_like(sigma))
    assert abs(s.alpha_kron - 2) < 1e-12 and abs(s.beta - 2) < 1e-12 and abs(s.phi) < 1e-12
    assert abs(s.chi_slope + 1.4) < 1e-12 and abs(s.alpha - 0.6) < 1e-12


def test_decomposition_common_set():
    sigma, h, h_kron, Lam, Phi = decomposition_inputs(seed=3)
    alpha = fit_exponents(sigma, h).alpha
    # Λ invalid where h is invalid too: the common set is α's set, everything reported
    h2, Lam2 = h.copy(), Lam.copy()
    h2[-1], Lam2[-1] = -1.0, 0.0
    s = summarize_layer(sigma, h2, h_kron=h_kron, Lambda=Lam2, Phi=Phi)
    assert s.status == "ok" and s.n_valid == s.n_valid_kron == 19
    assert abs(s.alpha - (s.alpha_kron + s.chi_slope)) < 1e-9 and abs(s.alpha_kron - (s.beta + s.phi)) < 1e-9
    # Λ invalid at a direction that is valid for α: α stays on its own set, χ-slope is not reported
    Lam3 = Lam.copy()
    Lam3[4] = math.nan
    s = summarize_layer(sigma, h, h_kron=h_kron, Lambda=Lam3, Phi=Phi)
    assert s.alpha == alpha and s.n_valid == 20 and s.n_valid_kron == 19
    assert s.chi_slope is None and s.status.startswith("decomposition_subset")
    assert abs(s.alpha_kron - (s.beta + s.phi)) < 1e-9
    # an all-NaN factor quantity means "not measured": β null, α_Kron still fitted on the rest
    s = summarize_layer(sigma, h, h_kron=h_kron, Lambda=np.full(20, math.nan), Phi=Phi)
    assert s.beta is None and s.phi is not None and s.alpha_kron is not None and s.status == "ok"
    s = summarize_layer(sigma, h, h_kron=np.r_[h_kron[:2], np.zeros(18)])
    assert s.alpha_kron is None and s.status.startswith("too_few_valid_kron") and s.alpha == alpha


def test_summary_without_exact_curvature():
    sigma, _h, h_kron, Lam, Phi = decomposition_inputs(seed=4)
    s = summarize_layer(sigma, h_kron=h_kron, Lambda=Lam, Phi=Phi)
    assert s.status == "ok" and s.n_valid is None and s.n_valid_kron == 20
    assert s.alpha is s.chi_slope is s.s is s.triangle_error is s.triangle_rel_error is s.pr_h is None
    assert s.gamma is not None and s.rank_model is not None and abs(s.alpha_kron - (s.beta + s.phi)) < 1e-9
    s = summarize_layer(sigma)
    assert s.status == "ok" and s.alpha_kron is None and s.n_valid_kron is None and s.gamma is not None


def test_status_override_voids_numbers():
    sigma, h = power_law()
    s = summarize_layer(sigma, h, h_kron=sigma ** 2, status="zero_gradient: G is identically zero")
    assert s == LayerSummary(status="zero_gradient: G is identically zero")
    assert summarize_layer([], status="no_directions").status == "no_directions"
    assert summarize_layer(sigma, h, status="ok").alpha is not None
    assert all(isinstance(v, (int, str)) or v is None or type(v) is float
               for v in summarize_layer(sigma, h, h_kron=sigma ** 2).as_dict().values())


def _profile(kind, K=30, seed=0, noise=0.05):
    k = np.arange(1, K + 1, dtype=np.float64)
    lk = np.log(k)
    y = {"power_law": -1.5 * lk, "exponential": -0.2 * k, "lognormal": -0.4 * lk - 0.35 * lk ** 2}[kind]
    return np.exp(-1.0 + y + np.random.default_rng(seed).normal(0, noise, K))


@pytest.mark.parametrize("kind", ["power_law", "exponential", "lognormal"])
@pytest.mark.parametrize("seed", range(4))
def test_bic_picks_generating_model(kind, seed):
    b = rank_model_bics(_profile(kind, seed=seed))
    assert b["best"] == kind and b["n"] == 30
    assert summarize_layer(_profile(kind, seed=seed)).rank_model == kind


def test_bic_formula_and_coefficients():
    sigma = _profile("lognormal", K=12, noise=0.0)
    b = rank_model_bics(sigma)
    assert b["lognormal"]["a"] == pytest.approx(-0.4, abs=1e-12) and b["lognormal"]["b"] == pytest.approx(-0.35, abs=1e-12)
    assert b["lognormal"]["log_c"] == pytest.approx(-1.0, abs=1e-12)
    rss, n = b["power_law"]["rss"], 12
    assert b["power_law"]["bic"] == pytest.approx(n * math.log(rss / n) + 2 * math.log(n), rel=1e-14)
    assert rank_model_bics(sigma[:3]) == {"n": 3, "best": None, **{m: dict.fromkeys(rank_model_bics(sigma)[m])
                                                                    for m in ("power_law", "exponential", "lognormal")}}
    e = rank_model_bics(np.exp(-0.3 * np.arange(1, 9)))   # exact exponential: RSS = 0 up to rounding
    assert e["best"] == "exponential" and abs(e["exponential"]["b"] - 0.3) < 1e-12


def test_alpha_se_is_the_ols_standard_error():
    """alpha_se against scipy's linregress (slope stderr), on the valid set only; exact data: 0."""
    scipy_stats = pytest.importorskip("scipy.stats")
    sigma, h = power_law(alpha=1.4)
    rng = np.random.default_rng(3)
    h = h * np.exp(rng.normal(0, 0.2, h.size))
    h[4] = -1.0                                   # not valid: dropped from the fit and from the error
    e = fit_exponents(sigma, h)
    keep = h > 0
    ref = scipy_stats.linregress(np.log(sigma[keep]), np.log(h[keep]))
    assert e.alpha == pytest.approx(ref.slope, rel=1e-12) and e.alpha_se == pytest.approx(ref.stderr, rel=1e-10)
    assert summarize_layer(sigma, h).alpha_se == e.alpha_se
    sigma, h = power_law(alpha=1.4)
    assert fit_exponents(sigma, h).alpha_se == pytest.approx(0.0, abs=1e-12)
    assert fit_exponents(sigma[:2], h[:2]).alpha_se is None
