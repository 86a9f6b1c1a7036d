"""Benchmark curvdist.math.spectral against dense torch.linalg.svd / eigh.  A script, not a test:

    .venv/bin/python benchmarks/bench_spectral.py [--repeats 3] [--threads N] [--k 20] [--quick]

Test matrices (all built in float64 from a fixed seed, then cast):

- ``grad WxH``: a realistic layer gradient from a random linear model.  N = 4096 rows of correlated inputs
  a_i = M z_i (z_i ~ N(0, I_n), M = Q diag(j^-1/2) Rᵀ with Haar Q, R, so C_A has eigenvalues ∝ j^-1, like
  real activations' slowly decaying covariance), plus a shared mean (one outlier direction).  Errors of a
  squared loss with a random teacher mismatch: δ_i = E a_i + ε_i, E ~ N(0, 1/n)^{m×n}, ε_i ~ N(0, 0.1² I_m).
  G = (1/N) Σ_i δ_i a_iᵀ  (m×n).  Its spectrum decays fast at the top, then flattens into the noise floor.
- ``slow WxH``: planted σ_j = j^-0.3 (slow decay: the hard case for subspace iteration).
- factors: ``C_A`` = (1/N) Σ a_i a_iᵀ of the inputs above (n = 3072), and a planted PSD factor with λ_j = j^-0.3.

Errors are against float64 dense truth: max_{k≤K} |σ̂_k − σ_k|/σ_k (or λ), and max_k ‖û_k − u_k‖ (vectors).
Times: medians over the repeats of wall-clock and process CPU seconds.  The default is one BLAS thread: on a
shared machine its CPU time is the stable figure (with more threads, CPU time adds up over threads).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curvdist.math.spectral import dense_top_eigen, dense_top_singular, top_eigen, top_singular

F64 = torch.float64


def haar(n, r, g):
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0]


def activations(N, n, g):
    M = haar(n, n, g) * torch.arange(1, n + 1, dtype=F64) ** -0.5
    A = torch.randn(N, n, generator=g, dtype=F64) @ M.T
    return A + 0.3 * torch.randn(n, generator=g, dtype=F64)  # shared mean: one outlier direction


def gradient(m, n, N, g):
    A = activations(N, n, g)
    E = torch.randn(m, n, generator=g, dtype=F64) / n ** 0.5
    D = A @ E.T + 0.1 * torch.randn(N, m, generator=g, dtype=F64)
    return D.T @ A / N, A


def planted(m, n, s, g):
    r = len(s)
    return (haar(m, r, g) * s) @ haar(n, r, g).T


def planted_psd(n, lam, g):
    Q = haar(n, len(lam), g)
    return (Q * lam) @ Q.T


def timed(fn, repeats):
    """(median wall-clock s / median process CPU s, last output)."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return f"{statistics.median(wall):.3f}/{statistics.median(cpu):.3f}", out


def vec_err(X, Y):
    X, Y = X.double(), Y.double()
    s = torch.sign((X * Y).sum(0))
    return float(torch.linalg.vector_norm(X * s - Y, dim=0).max())


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs()).max())


def row(cols, widths):
    print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths))))


def bench_svd(cases, k, repeats):
    W = (14, 7, 16, 15, 6, 10, 8, 8)
    print(f"\n## top-{k} singular triplets: randomized (oversample 10, adaptive) vs torch.linalg.svd")
    row(["matrix", "dtype", "method", "wall/cpu s", "iters", "max σ rel", "max vec", "σ1/σ20"], W)
    for name, G in cases:
        s_true, U_true, _ = dense_top_singular(G, k)
        spread = f"{float(s_true[0] / s_true[-1]):.3g}"
        for dt in (F64, torch.float32):
            Gd = G.to(dt)
            t, (s, U, _) = timed(lambda Gd=Gd: dense_top_singular(Gd, k), max(1, repeats - 1))
            row([name, str(dt)[6:], "full svd", t, "-", f"{rel_err(s, s_true):.1e}",
                 f"{vec_err(U, U_true):.1e}", spread], W)
            t, (s, U, _, info) = timed(lambda Gd=Gd: top_singular(Gd, k, exact_below=0, return_info=True), repeats)
            row([name, str(dt)[6:], "randomized", t, info["iterations"], f"{rel_err(s, s_true):.1e}",
                 f"{vec_err(U, U_true):.1e}", spread], W)


def bench_eigen(cases, k, repeats):
    W = (14, 7, 16, 15, 6, 10, 8, 8)
    print(f"\n## top-{k} eigenpairs of a factor: block Krylov / subspace iteration / torch.lobpcg vs torch.linalg.eigh")
    row(["factor", "dtype", "method", "wall/cpu s", "prods", "max λ rel", "max vec", "λ1/λ20"], W)
    for name, C in cases:
        l_true, Q_true = dense_top_eigen(C, k)
        spread = f"{float(l_true[0] / l_true[-1]):.3g}"
        for dt in (F64, torch.float32):
            Cd = C.to(dt)
            t, (lam, Q) = timed(lambda Cd=Cd: dense_top_eigen(Cd, k), max(1, repeats - 1))
            row([name, str(dt)[6:], "full eigh", t, "-", f"{rel_err(lam, l_true):.1e}",
                 f"{vec_err(Q, Q_true):.1e}", spread], W)
            for method in ("krylov", "subspace", "lobpcg"):
                kw = {"max_iter": 150} if method == "subspace" else {}
                try:
                    t, out = timed(lambda Cd=Cd, method=method, kw=kw: top_eigen(
                        Cd, k, exact_below=0, method=method, return_info=True, **kw), repeats)
                except (RuntimeError, ValueError) as e:  # torch.lobpcg can fail in fp32
                    row([name, str(dt)[6:], method, "failed", "-", type(e).__name__, "-", spread], W)
                    continue
                lam, Q, info = out
                prods = info["iterations"] if info["iterations"] is not None else "-"
                flag = "" if info["converged"] in (True, None) else " (cap)"
                row([name, str(dt)[6:], method + flag, t, prods, f"{rel_err(lam, l_true):.1e}",
                     f"{vec_err(Q, Q_true):.1e}", spread], W)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="768-wide matrices only (no 3072×3072 SVD)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K = {args.k}, medians of {args.repeats}")
    g = torch.Generator().manual_seed(0)
    N = 4096
    G1, A = gradient(768, 3072, N, g)
    svd_cases = [("grad 768x3072", G1)]
    if not args.quick:
        svd_cases.append(("grad 3072²", gradient(3072, 3072, N, g)[0]))
    svd_cases.append(("slow 768x3072", planted(768, 3072, torch.arange(1, 769, dtype=F64) ** -0.3, g)))
    bench_svd(svd_cases, args.k, args.repeats)
    n = 3072
    eig_cases = [("C_A 3072", A.T @ A / N),
                 ("slow 3072", planted_psd(n, torch.arange(1, n + 1, dtype=F64) ** -0.3, g))]
    bench_eigen(eig_cases, args.k, args.repeats)


if __name__ == "__main__":
    main()
