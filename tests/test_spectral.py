"""curvdist.math.spectral (and curvdist.math.metrics) against dense truth (full SVD / eigh) in float64, on planted and realistic spectra."""
import math
import warnings

import pytest
import torch

from curvdist.math.metrics import direction_metrics, rayleigh
from curvdist.math.spectral import (
    dense_top_eigen,
    dense_top_singular,
    top_eigen,
    top_singular,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Small BLAS calls run faster (and time more steadily) on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orthonormal(n, r, seed):
    return torch.linalg.qr(torch.randn(n, r, generator=_gen(seed), dtype=F64))[0]


def planted_matrix(m, n, s, seed=0):
    """G = U diag(s) Vᵀ with Haar-like U, V: the singular values are exactly s."""
    U, V = _orthonormal(m, len(s), seed), _orthonormal(n, len(s), seed + 1)
    return (U * s) @ V.T


def planted_psd(n, lam, seed=0):
    Q = _orthonormal(n, len(lam), seed)
    return (Q * lam) @ Q.T


def power_law(r, gamma):
    return torch.arange(1, r + 1, dtype=F64) ** (-gamma)


def max_rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


def sin_angle(X, Y):
    """sin of the largest principal angle between span(X) and span(Y) (orthonormal columns)."""
    s = torch.linalg.svdvals(X.T @ Y).clamp(max=1.0)
    return float(torch.sqrt((1 - s.min() ** 2).clamp(min=0)))


def vec_err(X, Y):
    """max_j ‖x_j − ±y_j‖ after aligning signs (per-vector accuracy; the sign convention is tested separately)."""
    s = torch.sign((X * Y).sum(0))
    return float(torch.linalg.vector_norm(X * s - Y, dim=0).max())


# --------------------------------------------------------------------------------------------- top_singular
@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(300, 200), (180, 320)])
def test_top_singular_planted_power_law(gamma, shape):
    m, n = shape
    r = min(m, n)
    G = planted_matrix(m, n, power_law(r, gamma), seed=3)
    sig0, U0, V0 = dense_top_singular(G, 20)
    sig, U, V, info = top_singular(G, 20, exact_below=0, return_info=True)
    assert info["method"] == "randomized" and info["converged"]
    assert max_rel(sig, power_law(20, gamma)) <= 1e-8
    assert max_rel(sig, sig0) <= 1e-8
    assert vec_err(U, U0) <= 1e-6 and vec_err(V, V0) <= 1e-6
    assert sin_angle(U, U0) <= 1e-6 and sin_angle(V, V0) <= 1e-6
    # exact triplets: G v = σ u, orthonormal columns, σ descending
    assert torch.allclose(G @ V, U * sig, atol=1e-9 * float(sig[0]))
    assert torch.allclose(U.T @ U, torch.eye(20, dtype=F64), atol=1e-12)
    assert bool((sig[:-1] >= sig[1:]).all())
    # the same sign convention as the dense truth: no alignment needed
    assert float((U - U0).abs().max()) <= 1e-6 and float((V - V0).abs().max()) <= 1e-6


def test_top_singular_gap_free_cluster():
    """σ_13 = … = σ_27 (no gap at k = 20): values stay exact, vectors are only defined up to the cluster's span."""
    s = torch.cat([power_law(12, 1.0), torch.full((15,), 0.05, dtype=F64), 0.04 * power_law(373, 0.5)])
    G = planted_matrix(450, 400, s, seed=5)
    sig, U, _ = top_singular(G, 20, exact_below=0)
    assert max_rel(sig, s[:20]) <= 1e-8
    _, U0, _ = dense_top_singular(G, 27)
    assert sin_angle(U[:, :12], U0[:, :12]) <= 1e-6  # the separated top 12
    # the 8 cluster vectors lie inside the 15-dimensional cluster subspace
    C = U0[:, 12:27]
    assert float(torch.linalg.matrix_norm(U[:, 12:] - C @ (C.T @ U[:, 12:]))) <= 1e-6


def test_top_singular_realistic_gradient_tall_and_wide():
    """G = (1/N) Σ δ_i a_iᵀ from a random linear model on correlated inputs (low-rank-ish, fast decay)."""
    g = _gen(11)
    N, n, m = 1500, 400, 300
    mix = torch.randn(n, n, generator=g, dtype=F64) * power_law(n, 1.0)  # correlated features
    A = torch.randn(N, n, generator=g, dtype=F64) @ mix.T
    E = torch.randn(m, n, generator=g, dtype=F64) / math.sqrt(n)
    D = A @ E.T + 0.1 * torch.randn(N, m, generator=g, dtype=F64)
    G = D.T @ A / N
    for M in (G, G.T):
        sig0, U0, V0 = dense_top_singular(M, 20)
        sig, U, V = top_singular(M, 20, exact_below=0)
        assert max_rel(sig, sig0) <= 1e-8
        assert vec_err(U, U0) <= 1e-6 and vec_err(V, V0) <= 1e-6


def test_top_singular_dense_path_and_fixed_iterations():
    G = planted_matrix(120, 90, power_law(90, 1.0), seed=2)
    sig, U, _, info = top_singular(G, 10, return_info=True)
    assert info["method"] == "dense"
    sig0, U0, _ = dense_top_singular(G, 10)
    assert torch.equal(sig, sig0) and torch.equal(U, U0)
    G = planted_matrix(400, 300, power_law(300, 2.0), seed=2)
    sig, _, _, info = top_singular(G, 5, n_iter=3, exact_below=0, return_info=True)
    assert info["iterations"] == 3 and info["converged"] is None
    assert max_rel(sig, power_law(5, 2.0)) <= 1e-6


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_float32_dense_path_is_the_float64_gram_route(shape):
    """float32 G on the CPU's dense path: σ_k from the float64 Gram matrix, within float64-level error of the dense
    float64 SVD of the same float32 numbers (a float32 SVD is only ~1e-6 relative); vectors orthonormal; a
    rank-deficient G gives exact zeros with an orthonormal completion."""
    G = planted_matrix(*shape, power_law(120, 1.0), seed=3).float()
    sig, U, V, info = top_singular(G, 20, return_info=True)
    assert info["method"] == "gram" and sig.dtype == U.dtype == V.dtype == torch.float32
    sig0, U0, V0 = dense_top_singular(G.double(), 20)
    assert max_rel(sig.double(), sig0) <= 1e-7
    assert vec_err(U.double(), U0) <= 1e-5 and vec_err(V.double(), V0) <= 1e-5
    G64 = G.double()
    assert float((G64 @ V.double() - U.double() * sig.double()).norm(dim=0).max()) <= 1e-5 * float(sig[0])
    low = (planted_matrix(shape[0], 6, power_law(6, 1.0), seed=4) @ planted_matrix(6, shape[1], power_law(6, 0.0),
                                                                                       seed=5)).float()
    sig, U, V = top_singular(low, 10)
    assert bool((sig[6:] == 0).all()) and bool((sig[:6] > 0).all())
    for X in (U, V):
        assert float((X.T @ X - torch.eye(10)).abs().max()) <= 1e-5


@pytest.mark.parametrize("refine", [2, -1])
def test_gram_route_refines_or_falls_back(monkeypatch, refine):
    """The float32 eigh basis of the Gram route: without oversampling, on a steep spectrum (σ_20 = 0.011 σ_1, where
    float32's rounding of σ_1² is large against the contract's σ_20 (tol σ_20 + ν)), the first Rayleigh–Ritz step and
    one subspace step miss the residual test and a second meets it (refine=2); with none allowed (-1) the full float64
    eigh takes over.  Either way σ_k within 1e-7 of the dense float64 SVD and the residual test met."""
    from curvdist.math import spectral
    G = planted_matrix(400, 200, power_law(200, 1.5), seed=6).float()
    monkeypatch.setattr(spectral, "_GRAM_OVERSAMPLE", 0)
    monkeypatch.setattr(spectral, "_GRAM_REFINE", 1)
    assert spectral._gram_ritz(G, G.double(), 20, 1e-5) is None
    monkeypatch.setattr(spectral, "_GRAM_OVERSAMPLE", 0)
    monkeypatch.setattr(spectral, "_GRAM_REFINE", refine)
    calls = []
    ritz = spectral._gram_ritz
    monkeypatch.setattr(spectral, "_gram_ritz", lambda *a: calls.append(ritz(*a)) or calls[-1])
    sig, U, V = top_singular(G, 20)
    sig0, _, _ = dense_top_singular(G.double(), 20)
    assert max_rel(sig.double(), sig0) <= 1e-7
    G64, s64 = G.double(), sig.double()
    r = (G64.T @ U.double() - V.double() * s64).norm(dim=0)
    assert bool((r <= 1e-5 * s64 + 2 * 400 ** 0.25 * 1.2e-7 * s64[0]).all())
    assert (calls[0] is None) == (refine < 0)


def test_top_singular_sign_determinism():
    G = planted_matrix(400, 300, power_law(300, 0.7), seed=4)
    a = top_singular(G, 15, exact_below=0, seed=0)
    b = top_singular(G, 15, exact_below=0, seed=0)
    c = top_singular(G, 15, exact_below=0, seed=123)
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # same seed: bitwise identical
    for x, y in zip(a[1:], c[1:]):
        assert float((x - y).abs().max()) <= 1e-7  # other start block: same signs, no alignment
    U = a[1]
    idx = U.abs().argmax(0)
    assert bool((U[idx, torch.arange(15)] > 0).all())
    # float32 input: same signs as float64
    s32, U32, _ = top_singular(G.float(), 15, exact_below=0)
    assert s32.dtype == torch.float32
    assert float((U32.double() - U).abs().max()) <= 1e-3
    assert max_rel(s32.double(), a[0]) <= 1e-4


def test_top_singular_k_handling_and_rank_deficiency():
    G = planted_matrix(300, 280, power_law(280, 1.0))
    with pytest.raises(ValueError, match=r"k=300 exceeds min\(m, n\)=280"):
        top_singular(G, 300)
    with pytest.raises(ValueError, match="k=0"):
        top_singular(G, 0)
    sig, U, V = top_singular(G[:, :8], 20, clip=True)
    assert sig.shape == (8,) and U.shape == (300, 8) and V.shape == (8, 8)
    # rank 5 < k = 12 with the randomized path: trailing σ are exact zeros, vectors still orthonormal
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=F64)
    G = planted_matrix(400, 350, s, seed=9)
    sig, U, V, info = top_singular(G, 12, exact_below=0, return_info=True)
    assert info["converged"]
    assert max_rel(sig[:5], s) <= 1e-10 and bool((sig[5:] == 0).all())
    assert torch.allclose(U.T @ U, torch.eye(12, dtype=F64), atol=1e-10)


def test_top_singular_reports_non_convergence():
    G = planted_matrix(400, 300, power_law(300, 0.1), seed=1)
    with pytest.warns(RuntimeWarning, match="not converged"):
        sig, _, _, info = top_singular(G, 20, exact_below=0, max_iter=2, return_info=True)
    assert info["converged"] is False and sig.shape == (20,)


def test_stop_at_the_rounding_floor(monkeypatch):
    """With no floor and tol = 0 the residuals bottom out at rounding: both solvers must notice and stop early."""
    import curvdist.math.spectral as sp

    monkeypatch.setattr(sp, "_FLOORC", {"svd": 0.0, "eig": 0.0})
    G = planted_matrix(300, 200, power_law(200, 2.0), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sig, _, _, info = top_singular(G, 10, exact_below=0, tol=0.0, return_info=True)
        assert info["stop"] == "floor" and info["converged"] and info["iterations"] < 100
        assert max_rel(sig, power_law(10, 2.0)) <= 1e-12
        C = planted_psd(400, power_law(400, 1.0), seed=2)
        lam, _, info = top_eigen(C, 10, exact_below=0, tol=0.0, return_info=True)
        assert info["stop"] == "floor" and info["converged"] and info["iterations"] < 100
        assert max_rel(lam, power_law(10, 1.0)) <= 1e-12


def test_top_singular_rejects_non_matrix():
    with pytest.raises(ValueError, match="matrix"):
        top_singular(torch.zeros(3, 4, 5), 2)


# --------------------------------------------------------------------------------------------- top_eigen
@pytest.mark.parametrize("gamma,method", [(0.3, "krylov"), (1.0, "krylov"), (2.0, "krylov"), (1.0, "subspace")])
def test_top_eigen_planted_power_law(gamma, method):
    n = 400
    lam_true = power_law(n, gamma)
    C = planted_psd(n, lam_true, seed=7)
    _, Q0 = dense_top_eigen(C, 20)
    lam, Q, info = top_eigen(C, 20, exact_below=0, method=method, return_info=True)
    assert info["method"] == method and info["converged"]
    assert max_rel(lam, lam_true[:20]) <= 1e-8
    assert vec_err(Q, Q0) <= 1e-6 and sin_angle(Q, Q0) <= 1e-6
    assert float((Q - Q0).abs().max()) <= 1e-6  # same sign convention as dense
    assert torch.allclose(C @ Q, Q * lam, atol=1e-9)


def test_top_eigen_gap_free_cluster():
    """λ_9 = … = λ_24 straddles k = 20: values exact, vectors inside the cluster's eigenspace."""
    lam_true = torch.cat([power_law(8, 1.0), torch.full((16,), 0.1, dtype=F64), 0.09 * power_law(476, 0.3)])
    C = planted_psd(500, lam_true, seed=6)
    lam, Q = top_eigen(C, 20, exact_below=0)
    assert max_rel(lam, lam_true[:20]) <= 1e-8
    _, Q0 = dense_top_eigen(C, 24)
    assert sin_angle(Q[:, :8], Q0[:, :8]) <= 1e-6
    B = Q0[:, 8:24]
    assert float(torch.linalg.matrix_norm(Q[:, 8:] - B @ (B.T @ Q[:, 8:]))) <= 1e-6


def test_top_eigen_krylov_restarts():
    """A tiny max_basis forces thick restarts; the answer must not change."""
    C = planted_psd(500, power_law(500, 0.5), seed=8)
    lam0, Q0 = dense_top_eigen(C, 10)
    lam, Q, info = top_eigen(C, 10, exact_below=0, block=6, max_basis=36, return_info=True)
    assert info["converged"] and info["restarts"] >= 1
    assert max_rel(lam, lam0) <= 1e-8 and vec_err(Q, Q0) <= 1e-6


def test_top_eigen_realistic_covariance():
    """C = AᵀA/N of correlated activations (slowly decaying spectrum plus a few outlier directions)."""
    g = _gen(21)
    N, n = 3000, 500
    mix = torch.randn(n, n, generator=g, dtype=F64) * power_law(n, 0.5)
    A = torch.randn(N, n, generator=g, dtype=F64) @ mix.T
    A[:, :3] *= 8.0  # "massive activation" channels
    A += 0.5  # a non-zero mean: one dominant direction
    C = A.T @ A / N
    lam0, Q0 = dense_top_eigen(C, 20)
    for method in ("krylov", "lobpcg"):
        lam, Q = top_eigen(C, 20, exact_below=0, method=method, tol=1e-11)
        assert max_rel(lam, lam0) <= 1e-8, method
        assert vec_err(Q, Q0) <= 1e-5, method
    lam, Q = top_eigen(C.float(), 20, exact_below=0)  # float32: accuracy relative to λ_1
    assert lam.dtype == torch.float32
    assert float(((lam.double() - lam0).abs() / lam0[0]).max()) <= 1e-5


def test_top_eigen_operator_form_low_rank():
    """An operator (e.g. a Nyström sketch) of rank 50 < the Krylov basis: breakdown must be handled."""
    n, r = 800, 50
    B = _orthonormal(n, r, 12) * power_law(r, 0.5).sqrt()
    C = B @ B.T
    lam0, Q0 = dense_top_eigen(C, 20)
    lam, Q, info = top_eigen(lambda X: B @ (B.T @ X), 20, n=n, dtype=F64, exact_below=0, return_info=True)
    assert info["converged"]
    assert max_rel(lam, lam0) <= 1e-8 and vec_err(Q, Q0) <= 1e-6
    dense = top_eigen(C, 20, exact_below=0)
    assert float((dense[1] - Q).abs().max()) <= 1e-6
    # operator below the dense threshold: materialised and solved by eigh
    Cs = planted_psd(100, power_law(100, 1.0))
    lam, Q, info = top_eigen(lambda X: Cs @ X, 5, n=100, dtype=F64, return_info=True)
    assert info["method"] == "dense" and max_rel(lam, power_law(5, 1.0)) <= 1e-12
    with pytest.raises(ValueError, match="n="):
        top_eigen(lambda X: X, 3)


def test_top_eigen_rank_deficient_and_k_handling():
    C = planted_psd(600, power_law(10, 1.0), seed=4)  # rank 10
    lam, Q = top_eigen(C, 20, exact_below=0)
    assert max_rel(lam[:10], power_law(10, 1.0)) <= 1e-10 and bool((lam[10:] == 0).all())
    assert torch.allclose(Q.T @ Q, torch.eye(20, dtype=F64), atol=1e-10)
    with pytest.raises(ValueError, match="k=601 exceeds the dimension n=600"):
        top_eigen(C, 601)
    lam, Q = top_eigen(C[:30, :30], 50, clip=True)
    assert lam.shape == (30,) and Q.shape == (30, 30)
    with pytest.raises(ValueError, match="square"):
        top_eigen(torch.zeros(3, 4), 2)


def test_top_eigen_sign_determinism():
    C = planted_psd(500, power_law(500, 1.0), seed=2)
    a = top_eigen(C, 10, exact_below=0, seed=0)
    b = top_eigen(C, 10, exact_below=0, seed=0)
    c = top_eigen(C, 10, exact_below=0, seed=99)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert float((a[1] - c[1]).abs().max()) <= 1e-7


# --------------------------------------------------------------------------------------------- rayleigh, metrics
def test_rayleigh_matches_quadratic_form():
    C = planted_psd(50, power_law(50, 1.0), seed=1)
    X = torch.randn(50, 7, generator=_gen(3), dtype=F64)
    want = torch.diagonal(X.T @ C @ X)
    assert torch.allclose(rayleigh(C, X), want, rtol=1e-12)
    assert torch.allclose(rayleigh(lambda Y: C @ Y, X), want, rtol=1e-12)
    with pytest.raises(ValueError):
        rayleigh(C, X[:, 0])


def test_direction_metrics_identity_and_nulls():
    g = _gen(5)
    K = 20
    sigma = power_law(K, 1.0)
    rd, ra = torch.rand(K, generator=g, dtype=F64) + 0.1, torch.rand(K, generator=g, dtype=F64) * 1e3
    ld, la = power_law(K, 0.5) * 2.0, power_law(K, 1.5) * 1e4
    h, hs = torch.rand(K, generator=g, dtype=F64), torch.rand(K, generator=g, dtype=F64)
    d = direction_metrics(sigma, rd, ra, ld, la, h=h, h_sop=hs)
    assert torch.allclose(d["h_kron"], d["phi"] * d["Lambda"], rtol=1e-12, atol=0)
    assert torch.allclose(d["h_kron"], rd * ra, rtol=0, atol=0)
    assert torch.allclose(d["rho_delta"], rd / ld) and torch.allclose(d["rho_A"], ra / la)
    assert torch.allclose(d["chi"], h / (rd * ra)) and torch.allclose(d["concentration"], hs / (rd * ra))
    assert all(v.shape == (K,) for v in d.values())
    # missing inputs -> NaN columns, the rest intact
    d = direction_metrics(sigma, rd, ra)
    for name in ("rho_delta", "rho_A", "phi", "Lambda", "chi", "concentration", "h", "h_sop"):
        assert bool(torch.isnan(d[name]).all()), name
    assert torch.equal(d["h_kron"], rd * ra)
    # eigenvalues pair by index: longer cut to K, shorter padded with NaN
    d = direction_metrics(sigma, rd, ra, torch.cat([ld, ld]), la[:15])
    assert torch.equal(d["lambda_delta"], ld)
    assert bool(torch.isnan(d["rho_A"][15:]).all()) and not bool(torch.isnan(d["rho_A"][:15]).any())
    with pytest.raises(ValueError, match="rayleigh_A"):
        direction_metrics(sigma, rd, ra[:5])


def test_end_to_end_on_a_linear_layer():
    """Pipeline glue: directions from G, factor eigenpairs, Rayleigh quotients -> h_kron = Φ Λ."""
    g = _gen(8)
    N, n, m = 2000, 400, 300
    A = torch.randn(N, n, generator=g, dtype=F64) @ (torch.randn(n, n, generator=g, dtype=F64) * power_law(n, 1.0))
    D = A @ torch.randn(n, m, generator=g, dtype=F64) / 20 + torch.randn(N, m, generator=g, dtype=F64)
    G, CA, Cd = D.T @ A / N, A.T @ A / N, D.T @ D / N
    sig, U, V = top_singular(G, 20, exact_below=0)
    (lA, _), (ld, _) = top_eigen(CA, 20, exact_below=0), top_eigen(Cd, 20, exact_below=0)
    d = direction_metrics(sig, rayleigh(Cd, U), rayleigh(CA, V), ld, lA)
    assert torch.allclose(d["h_kron"], d["phi"] * d["Lambda"], rtol=1e-12, atol=0)
    assert bool(torch.isfinite(d["phi"]).all())
    assert max_rel(lA, dense_top_eigen(CA, 20)[0]) <= 1e-8
