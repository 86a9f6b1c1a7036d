"""curvdist.math.eigenvalues.top_eigenvalues (eigenvalues only, what the spectral step runs) against dense float64
eigvalsh / eigh: the same accuracy contract as top_eigen, on planted, clustered, low-rank and realistic spectra."""
import pytest
import torch
from test_spectral import _gen, _orthonormal, max_rel, planted_psd, power_law

from curvdist.math.eigenvalues import EXACT_EIGVALS_BELOW, eigenvalue_block, top_eigenvalues
from curvdist.math.spectral import dense_top_eigen, top_eigen

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.0])
def test_planted_power_law(gamma):
    n = 400
    lam_true = power_law(n, gamma)
    C = planted_psd(n, lam_true, seed=7)
    lam, info = top_eigenvalues(C, 20, exact_below=0, return_info=True)
    assert info["method"] == "krylov" and info["converged"]
    assert lam.shape == (20,) and lam.dtype == F64
    assert max_rel(lam, lam_true[:20]) <= 1e-8


def test_gap_free_cluster_of_the_block_size():
    """λ_9 = … = λ_24: twelve copies among the top 20, as many as the block (12 for k = 20) can hold."""
    assert eigenvalue_block(20) == 12
    lam_true = torch.cat([power_law(8, 1.0), torch.full((16,), 0.1, dtype=F64), 0.09 * power_law(476, 0.3)])
    C = planted_psd(500, lam_true, seed=6)
    assert max_rel(top_eigenvalues(C, 20, exact_below=0), lam_true[:20]) <= 1e-8


def test_restarts_and_block_choice():
    C = planted_psd(500, power_law(500, 0.5), seed=8)
    lam0 = dense_top_eigen(C, 10)[0]
    lam, info = top_eigenvalues(C, 10, exact_below=0, block=6, max_basis=36, return_info=True)
    assert info["converged"] and info["restarts"] >= 1
    assert max_rel(lam, lam0) <= 1e-8


def test_realistic_covariance_both_dtypes():
    """C = AᵀA/N of correlated activations with outlier channels and a mean direction; equal to top_eigen's λ."""
    g = _gen(21)
    N, n = 3000, 900
    mix = torch.randn(n, n, generator=g, dtype=F64) * power_law(n, 0.5)
    A = torch.randn(N, n, generator=g, dtype=F64) @ mix.T
    A[:, :3] *= 8.0
    A += 0.5
    C = A.T @ A / N
    lam0 = torch.linalg.eigvalsh(C).flip(0)[:20]
    lam, info = top_eigenvalues(C, 20, return_info=True)          # n = 900 > 768: Krylov in float64
    assert info["method"] == "krylov" and max_rel(lam, lam0) <= 1e-9
    assert max_rel(lam, top_eigen(C, 20)[0]) <= 1e-9
    lam32, info = top_eigenvalues(C.float(), 20, return_info=True)   # float32: the fp32 contract (tol 1e-5)
    assert info["method"] == "krylov" and lam32.dtype == torch.float32
    assert max_rel(lam32.double(), lam0) <= 1e-5


def test_dense_path_is_eigvalsh():
    C = planted_psd(300, power_law(300, 1.0), seed=3)
    lam, info = top_eigenvalues(C, 20, return_info=True)
    assert info["method"] == "dense" and max_rel(lam, power_law(20, 1.0)) <= 1e-12
    assert torch.equal(lam, torch.linalg.eigvalsh((C + C.T) / 2).flip(0)[:20])
    C32 = planted_psd(EXACT_EIGVALS_BELOW[torch.float32], power_law(640, 1.0), seed=3).float()
    assert top_eigenvalues(C32, 20, return_info=True)[1]["method"] == "dense"


def test_operator_low_rank_and_k_handling():
    n, r = 800, 50
    B = _orthonormal(n, r, 12) * power_law(r, 0.5).sqrt()
    lam0 = dense_top_eigen(B @ B.T, 20)[0]
    lam, info = top_eigenvalues(lambda X: B @ (B.T @ X), 20, n=n, dtype=F64, exact_below=0, return_info=True)
    assert info["converged"] and max_rel(lam, lam0) <= 1e-8
    C = planted_psd(600, power_law(10, 1.0), seed=4)       # rank 10: exact zeros after λ_10
    lam = top_eigenvalues(C, 20, exact_below=0)
    assert max_rel(lam[:10], power_law(10, 1.0)) <= 1e-10 and bool((lam[10:] == 0).all())
    with pytest.raises(ValueError, match="k=601 exceeds the dimension n=600"):
        top_eigenvalues(C, 601)
    assert top_eigenvalues(C[:30, :30], 50, clip=True).shape == (30,)
