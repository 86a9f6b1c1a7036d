"""Benchmark sketch mode (curvdist.math.sketch) against the dense path, per factor of dimension d.  A script:

    .venv/bin/python benchmarks/bench_sketch.py [--dims 4096 11008 28672] [--rank 512] [--threads 2] [--device cpu]

For each d, in the statistics dtype (float32 unless --float64), with the default sketch_rank l:

- accumulation per row (µs): dense ``C += Rᵀ R`` (DenseSecondMoment: 2d² FLOPs per row) against the sketch
  ``Y += Rᵀ (R T)`` (NystromSketch, T = [Ω Ψ] of l + 10 columns: 4·d·(l + 10)) and the projections pass's
  Rayleigh–Ritz product ``Z += Rᵀ (R V)`` (V of min(2l, d) columns), on a chunk of random rows;
- eigensolve (s): the dense path's ``top_eigen(C, K)`` (block Krylov on the dense factor) against the sketch's
  spectral step (``nystrom_eigen`` and ``ritz_basis``) plus ``ritz_eigen`` at the end of the projections pass.  The
  factor is planted, C = diag(λ) with λ_j = j^-1 stored dense (Krylov with a Gaussian start, and the sketch, see
  only the spectrum, so a diagonal costs what any dense factor costs), and its sketches are formed exactly
  (Y = C T, Z = C V) rather than from rows;
- memory: the dense factor d² against the sketch 2·d·(l + 10) (statistics pass) and the Ritz step 2·d·min(2l, d);
- accuracy of the sketch on that spectrum: max_k |λ̂_k − λ_k| / λ_k over k ≤ K, and the smallest ratio of the stored
  error estimate to the true error (≥ 1: the estimate is never smaller).

Ratios are sketch / dense ("× dense").  A d whose dense factor (and Krylov workspace) would not fit in the
available memory is skipped with a note.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curvdist.math import sketch
from curvdist.math.modes import ERROR_COLUMNS, ritz_bytes, sketch_bytes
from curvdist.math.moments import DenseSecondMoment
from curvdist.math.spectral import top_eigen


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(d: int, rank: int, k: int, rows: int, dtype, device, decay: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(d)
    R = torch.randn(rows, d, generator=g).to(device=device, dtype=dtype)
    dense = DenseSecondMoment(d, dtype)
    dense.update(R[:1])                                   # allocate outside the timing
    t_dense, _ = timed(lambda: dense.update(R), device, 2)
    sk = sketch.NystromSketch(d, rank, dtype, seed=0, layer="bench", factor="A")
    sk.update(R[:1])
    t_sketch, _ = timed(lambda: sk.update(R), device, 2)
    l = sk.rank
    p = min(2 * l, d)
    V = torch.linalg.qr(torch.randn(d, p, generator=g, dtype=torch.float64))[0].to(device=device, dtype=dtype)
    ritz = sketch.RangeSketch(V, dtype)
    ritz.update(R[:1])
    t_ritz, _ = timed(lambda: ritz.update(R), device, 2)
    dense = R = None                                      # free the rows and the dense factor
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    C = torch.zeros(d, d, dtype=dtype, device=device)
    C.diagonal().copy_(lam)
    t_eig, (lam_dense, _) = timed(lambda: top_eigen(C, k, seed=0), device)
    C = None
    T = sketch.test_matrix(0, "bench", "A", d, l + ERROR_COLUMNS, dtype, device)
    f = sketch.SketchedFactor((lam.to(device=device, dtype=dtype)[:, None] * T), T, l)

    def spectral_step():
        return sketch.nystrom_eigen(f, k), sketch.ritz_basis(f)

    t_step, ((nys, _, err_nys), Vb) = timed(spectral_step, device)
    Z = lam.to(device=device, dtype=dtype)[:, None] * Vb
    theta = sketch.ritz_eigen(Vb, Z, k)[0]
    t_rr, (ref, err) = timed(lambda: sketch.refined_eigenvalues(Vb, Z, k), device)
    truth = lam[:k].to(theta.device)
    miss = (truth - ref).abs()
    item = torch.empty((), dtype=dtype).element_size()
    return {"d": d, "l": l, "dense_us": 1e6 * t_dense / rows, "sketch_us": 1e6 * t_sketch / rows,
            "ritz_us": 1e6 * t_ritz / rows, "dense_eig_s": t_eig, "sketch_eig_s": t_step + t_rr,
            "dense_gb": d * d * item / 1e9, "sketch_gb": sketch_bytes(d, rank, item) / 1e9,
            "ritz_gb": ritz_bytes(d, rank, item) / 1e9,
            "dense_rel": float(((lam_dense.double().to(truth.device) - truth).abs() / truth).max()),
            "nys_rel": float(((truth - nys).abs() / truth).max()),
            "ritz_rel": float(((truth - theta).abs() / truth).max()),
            "ref_rel": float((miss / truth).max()),
            "est_ratio": float((err / miss.clamp_min(1e-300)).min()),
            "nys_est_ratio": float((err_nys / (truth - nys).abs().clamp_min(1e-300)).min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 11008, 28672])
    ap.add_argument("--rank", type=int, default=512, help="sketch_rank l (default: the config default)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--rows", type=int, default=256, help="rows per timed accumulation chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--decay", type=float, default=1.0, help="planted spectrum λ_j = j^-decay")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.float64 if a.float64 else torch.float32
    device = torch.device(a.device)
    item = torch.empty((), dtype=dtype).element_size()
    print(f"sketch vs dense, {str(dtype).replace('torch.', '')}, {device}, {a.threads} threads, l = {a.rank}, "
          f"K = {a.k}, {a.rows} rows per chunk; planted λ_j = j^-{a.decay:g}")
    head = (f"{'d':>6} | {'accumulate µs/row: dense':>24} {'sketch':>16} {'ritz pass':>16} | {'eigensolve s: dense':>19} "
            f"{'sketch':>16} | {'memory GB: dense':>16} {'sketch':>15} | {'rel err λ≤K: dense':>18} {'nyström':>8} "
            f"{'ritz θ':>8} {'reported':>8} {'est/err':>7}")
    print(head)
    print("-" * len(head))
    for d in a.dims:
        need = 3 * d * d * item if device.type == "cpu" else 0
        if device.type == "cpu" and need > 0.8 * available_bytes():
            print(f"{d:>6} | skipped: the dense factor and its copies need {need / 1e9:.1f} GB, "
                  f"{available_bytes() / 1e9:.1f} GB available")
            continue
        r = bench(d, a.rank, a.k, a.rows, dtype, device, a.decay)
        def x(s, dn):
            return f"{s:.3g} ({s / dn:.2g}×)"

        print(f"{d:>6} | {r['dense_us']:>24.3g} {x(r['sketch_us'], r['dense_us']):>16} "
              f"{x(r['ritz_us'], r['dense_us']):>16} | {r['dense_eig_s']:>19.3g} "
              f"{x(r['sketch_eig_s'], r['dense_eig_s']):>16} | {r['dense_gb']:>16.3g} "
              f"{x(r['sketch_gb'], r['dense_gb']):>15} | {r['dense_rel']:>18.1e} {r['nys_rel']:>8.1e} "
              f"{r['ritz_rel']:>8.1e} {r['ref_rel']:>8.1e} {r['est_ratio']:>7.1f}", flush=True)
    print("× dense: the sketch's time or memory in multiples of the dense path's. ritz pass: the projections "
          "pass's product Z = C V of the Rayleigh-Ritz step (the dense path has no such product). est/err: the "
          "smallest ratio over k ≤ K of the stored error estimate to the true error of the reported λ_k (the Nyström "
          "eigenvalues on the Rayleigh-Ritz basis, curvdist.math.sketch.refined_eigenvalues; ritz θ: the Rayleigh-Ritz "
          "values alone).")


if __name__ == "__main__":
    main()
