"""Streaming sketches of Kronecker factors too large to form (``factor_mode: sketch``).  Pure: torch only.

A factor C = (1/norm) Σ_i r_i r_iᵀ (d×d: C_A from input rows, C_δ from error rows) is never allocated.  Instead
the rows are multiplied into a seeded Gaussian test matrix as they stream past, in the statistics pass itself:

    Y = Σ_i r_i (r_iᵀ T) = (Σ_i r_i r_iᵀ) T,        T = [Ω Ψ]  (d × (l + s)),  memory d·(l + s) for Y and for T

Ω (d×l) is the Nyström test matrix, Ψ (d×s, s = ``ERROR_COLUMNS``) an independent block for the error estimate.
T is a function of (seed, layer, factor, d) alone (:func:`test_matrix`), so every replica and every micro-batch
multiplies into the same T and sketches combine by adding Y: :class:`NystromSketch` keeps the running sum like
every accumulator of :mod:`curvdist.math.moments`.

**One pass: the Nyström sketch** (Tropp, Yurtsever, Udell & Cevher 2017, "Fixed-rank approximation of a
positive-semidefinite matrix from streaming data", NeurIPS; their Algorithm 3):

    B = Ωᵀ Y_Ω = Ωᵀ C Ω,   Ĉ = Y_Ω B⁺ Y_Ωᵀ = U diag(λ̂) Uᵀ

with the pseudo-inverse B⁺ from an eigendecomposition of the l×l core, dropping its eigenvalues below
l · eps · β_max (eps of the sketch's dtype, its rounding level).  Tropp et al. stabilise a Cholesky factor with a
shift ν = √d · eps · ‖Y‖ instead; for a Gaussian Ω (not orthonormal, so that T need not be orthonormalised
identically on every device) that shift adds a flat tail ν·(d − l) which biased λ̂ by 8 % at rank 40 in float32,
against 4e-7 for the pseudo-inverse.  Their Theorem 4.1 bounds the error in expectation:
E ‖C − [[Ĉ]]_r‖_* ≤ (1 + r/(l − r − 1)) ‖C − [[C]]_r‖_* for every r < l − 1 (nuclear norm, [[·]]_r the best rank-r
part).  Ĉ = C^½ P C^½ with P a projector, so 0 ≼ Ĉ ≼ C and (Weyl) 0 ≤ λ_j − λ̂_j ≤ ‖C − Ĉ‖ for every j.
**A-posteriori estimate (one pass):** Ψ's columns are standard Gaussian and independent of Ĉ, so by Halko,
Martinsson & Tropp (2011, SIAM Review, Lemma 4.1 / eq. 4.3)

    ‖C − Ĉ‖ ≤ 10 √(2/π) · max_i ‖(C − Ĉ) ψ_i‖          except with probability 10^{-s},

computable from the sketch ((C − Ĉ)Ψ = Y_Ψ − Ĉ Ψ).  :func:`nystrom_eigen` returns that number as the error
estimate of every λ̂_j: an upper bound on λ_j − λ̂_j (≥ 0) that holds with probability ≥ 1 − 10^{-s}; the
eigenvectors' Rayleigh quotients q̂_jᵀ C q̂_j lie in [λ̂_j, λ̂_j + ‖C − Ĉ‖] too.

**Accuracy, and the Rayleigh–Ritz step.**  No one-pass sketch of d×l numbers resolves the K-th eigenvalue of a
slowly decaying spectrum to high relative accuracy: the error scales with the tail the sketch cannot hold
(Ghashami, Liberty, Phillips & Woodruff 2016: a streaming covariance sketch with error ε‖A − A_K‖²_F needs
Ω(d·K/ε) numbers).  Measured at d = 4096, K = 20, l = 256 (tests/test_sketch.py): λ_j ∝ j^-1 leaves the Nyström
λ̂_K ~25 % low, j^-0.5 ~55 %.
Every layer with directions goes through the projections pass anyway (Rayleigh quotients and h^SoP), so the
sketch adds one more product there: Z = C V for the orthonormal basis V of span[Y_Ω, Ω] (p = 2l columns, a block
Krylov space of degree one), and :func:`ritz_eigen` returns the Rayleigh–Ritz pairs of C on span V (Saad,
Numerical Methods for Large Eigenvalue Problems, ch. 4; on a randomized basis, Halko, Martinsson & Tropp 2011):

    T = Vᵀ C V = S Θ Sᵀ,   x_j = V s_j,   θ_j = x_jᵀ C x_j ≤ λ_j  (Cauchy interlacing),
    error estimate e_j = ‖C x_j − θ_j x_j‖ (exact: C x_j = Z s_j)

By Weyl's (Bauer–Fike's) theorem for symmetric matrices some eigenvalue of C lies within e_j of θ_j; it is λ_j
whenever the Ritz values are resolved to within their gaps (then the error is ~e_j²/gap, far below e_j).  So e_j
estimates λ_j − θ_j from above without a guarantee; the smallest measured margin is 3× (j^-0.5, l = 256), 20–30×
on j^-1.

**Power step.**  The same V and Z give a better estimate than θ_j for free: the Nyström approximation with test
matrix V, Ĉ_V = Z (Vᵀ Z)⁺ Zᵀ = C^½ P C^½ (P the projector on span C^½ V), whose range is span C V ⊇ C² Ω — one
power iteration beyond the one-pass sketch (Halko, Martinsson & Tropp 2011, §4.5; Tropp et al. 2017, §6).  Its
eigenvalues λ̂_j satisfy θ_j ≤ λ̂_j ≤ λ_j (Ĉ_V ≼ C, and Vᵀ Ĉ_V V = Vᵀ C V: interlacing), so e_j still bounds
λ_j − λ̂_j.  :func:`refined_eigenvalues` reports them.  Largest relative error of λ_1..λ_20 at d = 4096
(tests/test_sketch.py, benchmarks/bench_sketch.py): j^-1 4.5e-4 at l = 256 (Ritz θ: 9.5e-3), 2.1e-5 at l = 512
(θ: 9.2e-4); j^-0.5 1.6e-2 at l = 256 (θ: 6.6e-2), 2.0e-3 at l = 512 (θ: 1.3e-2); exact to rounding when
rank(C) ≤ l.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvdist.math.modes import ERROR_COLUMNS, sketch_rank

HMT_FACTOR = 10.0 * math.sqrt(2.0 / math.pi)
_CHUNK = 8192                             # rows of T drawn at a time (bounded float64 temporaries)


def test_matrix(seed: int, layer: str, factor: str, dim: int, cols: int, dtype: torch.dtype,
                device=None) -> Tensor:
    """T (dim, cols), i.i.d. N(0, 1): a function of (seed, layer, factor, dim, cols) only, drawn on the CPU in
    float64 and cast, so that every replica, stage and device multiplies into the same matrix."""
    key = hashlib.sha256(f"curvdist-sketch|{int(seed)}|{layer}|{factor}|{int(dim)}|{int(cols)}".encode()).digest()
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(key[:8], "little") >> 1)
    out = torch.empty(dim, cols, dtype=dtype, device=device)
    for a in range(0, dim, _CHUNK):
        b = min(dim, a + _CHUNK)
        out[a:b] = torch.randn(b - a, cols, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return out


class RangeSketch:
    """S = Σ_i r_i (r_iᵀ T) = (Σ_i r_i r_iᵀ) T for a fixed test matrix T (d, c): the accumulator protocol of
    :mod:`curvdist.math.moments` (``update``, ``value``, ``nbytes``, ``sum``) for a factor that is never formed."""

    def __init__(self, test: Tensor, dtype: torch.dtype):
        self.dtype, self.sum = dtype, None
        self.test = test.to(dtype)
        self.dim, self.cols = self.test.shape

    @property
    def nbytes(self) -> int:
        return 2 * self.dim * self.cols * torch.empty((), dtype=self.dtype).element_size()

    def _test_on(self, device) -> Tensor:
        if self.test.device != torch.device(device):
            self.test = self.test.to(device)
        return self.test

    def update(self, rows: Tensor) -> None:
        T = self._test_on(rows.device)
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.cols, dtype=self.dtype, device=rows.device)
        self.sum.addmm_(rows.T, rows @ T)    # (d, R) @ (R, c): never d×d

    def value(self, norm: float) -> Tensor:
        """C T = S / norm (zeros before any rows)."""
        s = self.sum if self.sum is not None else torch.zeros(self.dim, self.cols, dtype=self.dtype)
        return s / max(norm, 1)


@dataclass
class SketchedFactor:
    """A factor known through its sketch: ``Y`` = C [Ω Ψ] (d, l + s) for the test matrix ``test`` = [Ω Ψ]."""
    Y: Tensor
    test: Tensor
    rank: int                          # l (Ω's columns); Ψ is the rest

    @property
    def dim(self) -> int:
        return self.Y.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.Y.numel() * self.Y.element_size()


class NystromSketch(RangeSketch):
    """The statistics-pass accumulator of a sketched factor: :class:`RangeSketch` into the seeded
    T = [Ω Ψ] of :func:`test_matrix` (d × (l + s), l = min(``rank``, d)); ``value`` gives a :class:`SketchedFactor`.
    T is drawn on the first rows' device (or on the CPU when read before any rows)."""

    def __init__(self, dim: int, rank: int, dtype: torch.dtype, *, seed: int, layer: str, factor: str):
        self.dim, self.dtype, self.sum = dim, dtype, None
        self.rank = sketch_rank(rank, dim)
        self.cols = self.rank + ERROR_COLUMNS
        self._key = (int(seed), layer, factor)
        self.test = None

    def _test_on(self, device) -> Tensor:
        if self.test is None:
            self.test = test_matrix(*self._key, self.dim, self.cols, self.dtype, device)
        return super()._test_on(device)

    def value(self, norm: float) -> SketchedFactor:
        T = self._test_on(self.sum.device if self.sum is not None else "cpu")
        return SketchedFactor(super().value(norm).to(T.device), T, self.rank)


# ------------------------------------------------------------------------------------------------- eigenpairs
def _signs(Q: Tensor) -> Tensor:
    """Each column's largest-|entry| positive (the sign convention of :mod:`curvdist.math.spectral`)."""
    idx = Q.abs().argmax(dim=0)
    s = torch.sign(Q.gather(0, idx[None, :]))[0]
    return Q * torch.where(s == 0, torch.ones_like(s), s)


def _complete(U: Tensor, Om: Tensor) -> Tensor:
    """Orthonormal columns completing U (d, r) to l = Om.shape[1] columns: from the QR of [U Ω]."""
    r, l = U.shape[1], Om.shape[1]
    return torch.linalg.qr(torch.cat([U, Om], dim=1))[0][:, r:l]


def nystrom(f: SketchedFactor) -> tuple[Tensor, Tensor, float]:
    """The Nyström approximation Ĉ = U diag(λ̂) Uᵀ of the sketched factor (module docstring), in float64:
    ``(lam (l,), U (d, l), err)`` with ``err`` the one-pass estimate of ‖C − Ĉ‖ from the error columns Ψ."""
    l = f.rank
    Y, T = f.Y.double(), f.test.to(device=f.Y.device, dtype=torch.float64)
    Om, Yo = T[:, :l], Y[:, :l]
    B = Om.T @ Yo
    beta, W = torch.linalg.eigh((B + B.T) / 2)
    keep = beta > beta.max().clamp_min(0.0) * l * torch.finfo(f.Y.dtype).eps
    if not bool(keep.any()):                           # C = 0 (no rows, or all rows zero)
        return torch.zeros(l, dtype=torch.float64, device=Y.device), torch.linalg.qr(Om)[0], 0.0
    E = Yo @ (W[:, keep] / beta[keep].sqrt())          # E Eᵀ = Y B⁺ Yᵀ
    U, S, _ = torch.linalg.svd(E, full_matrices=False)
    lam = S * S
    if U.shape[1] < l:                                 # rank(B) < l: exact zeros, vectors completing U
        U = torch.cat([U, _complete(U, Om)], dim=1)
        lam = torch.cat([lam, lam.new_zeros(l - lam.shape[0])])
    Psi, Yp = T[:, l:], Y[:, l:]
    err = 0.0
    if Psi.shape[1]:
        resid = Yp - U @ (lam[:, None] * (U.T @ Psi))  # (C − Ĉ) Ψ
        err = HMT_FACTOR * float(torch.linalg.vector_norm(resid, dim=0).max())
    return lam, U, err


def nystrom_eigen(f: SketchedFactor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k eigenpairs of the Nyström approximation: ``(lam (k,), Q (d, k), err (k,))``, float64, λ descending;
    ``err`` bounds λ_j − λ̂_j ≥ 0 with probability ≥ 1 − 10^{-s} (module docstring)."""
    lam, U, err = nystrom(f)          # singular values come descending, so λ̂ does
    k = min(int(k), lam.shape[0])
    return lam[:k], _signs(U[:, :k]), torch.full((k,), err, dtype=torch.float64, device=lam.device)


def ritz_basis(f: SketchedFactor, dtype: torch.dtype | None = None) -> Tensor:
    """Orthonormal basis V (d, p), p = min(2l, d), of span[Y_Ω, Ω] (a degree-one block Krylov space of C), cast to
    ``dtype`` (default: the sketch's) for the projections pass to multiply into."""
    l = f.rank
    X = torch.cat([f.Y[:, :l].double(), f.test[:, :l].to(device=f.Y.device, dtype=torch.float64)], dim=1)
    X = X / torch.linalg.vector_norm(X, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    V = torch.linalg.qr(X)[0][:, :min(2 * l, f.dim)]
    return V.to(dtype or f.Y.dtype)


def ritz_eigen(V: Tensor, Z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh–Ritz pairs of C on span V from Z = C V (module docstring): ``(theta (k,), X (d, k), err (k,))`` in
    float64, θ descending, ``err`` the residual norms ‖C x_j − θ_j x_j‖.  V need not be exactly orthonormal (a
    float32 copy of an orthonormal basis): the pencil (Vᵀ Z, Vᵀ V) is solved through the Cholesky factor of the
    Gram matrix Vᵀ V = L Lᵀ, i.e. on the orthonormal basis V L⁻ᵀ, and C x_j = Z s_j for x_j = V s_j."""
    Vd, Zd = V.double(), Z.to(device=V.device, dtype=torch.float64)
    Lc = torch.linalg.cholesky(Vd.T @ Vd)
    Tm = Vd.T @ Zd
    Li = torch.linalg.solve_triangular(Lc, torch.eye(Lc.shape[0], dtype=torch.float64, device=Lc.device),
                                       upper=False)                       # L⁻¹
    A = Li @ ((Tm + Tm.T) / 2) @ Li.T
    theta, W = torch.linalg.eigh((A + A.T) / 2)
    k = min(int(k), theta.shape[0])
    theta, S = theta.flip(0)[:k], Li.T @ W.flip(1)[:, :k]                 # s_j = L⁻ᵀ w_j
    X = Vd @ S
    err = torch.linalg.vector_norm(Zd @ S - X * theta, dim=0)
    return theta.clamp_min(0.0), _signs(X), err


def refined_eigenvalues(V: Tensor, Z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The reported λ_1..λ_k of a sketched factor after the projections pass, and their error estimates, float64.

    The eigenvalues of the Nyström approximation of C with test matrix V (module docstring, "power step"):
    Ĉ_V = Z (Vᵀ Z)⁺ Zᵀ with Z = C V, computed as the eigenvalues of Fᵀ F for F = Z Q W^-½ (Vᵀ Z = Q W Qᵀ, its
    eigenvalues below √eps of the largest dropped, eps of Z's dtype: rounding δ in Z reaches F as δ/√w, so a
    smaller w would let the summation order of the rows (replicas, micro-batches) change λ̂; dropping makes Ĉ_V
    smaller, never larger than C).  The error estimate is the Rayleigh–Ritz residual e_j of
    :func:`ritz_eigen`: θ_j ≤ λ̂_j ≤ λ_j, so λ_j − λ̂_j ≤ λ_j − θ_j ≤ e_j."""
    theta, _, err = ritz_eigen(V, Z, k)
    Vd, Zd = V.double(), Z.to(device=V.device, dtype=torch.float64)
    B = Vd.T @ Zd
    w, Q = torch.linalg.eigh((B + B.T) / 2)
    keep = w > w.max() * math.sqrt(torch.finfo(Z.dtype).eps)   # rounding in Z grows by at most eps^-¼ in F
    Wq = Q[:, keep] / w[keep].sqrt()
    M = Wq.T @ (Zd.T @ Zd) @ Wq
    lam = torch.linalg.eigvalsh((M + M.T) / 2).flip(0)[:theta.shape[0]]
    return torch.maximum(lam.clamp_min(0.0), theta), err
