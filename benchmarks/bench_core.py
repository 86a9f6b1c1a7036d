"""The measurement core's figures in one run (a script, not a test):

    .venv/bin/python benchmarks/bench_core.py [--threads 2] [--quick]

1. Kronecker measurement of every layer (hooks → G, C_A, C_δ; top-K eigensolves; top-K SVD; Rayleigh quotients) on a
   4-layer, 384-wide GPT-2 (vocab 512) with a 64×64-token batch, in multiples of one forward+backward of that batch.
   Target ≤ 2.0 (kronfluence's factor fit + eigendecomposition: 6.0; hooks + full float64 eigh + full SVD: 6.6).
   The same with the dense baseline (full eigh + full SVD) for comparison.
2. Randomized vs full SVD and the top-K eigensolve vs full eigh (benchmarks/bench_spectral.py).
3. Exact h for K = 20 directions of one layer, batched vs one at a time (benchmarks/bench_curvature.py);
   target ≤ 4 multiples (twenty double backwards: 13, curvlinops' Hessian operator: 37).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from curvdist.math import families, forward, losses, measure, spectral
from curvdist.math.collect import collect_statistics


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=4, n_embd=384, n_head=6, vocab_size=512, n_positions=64, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (64, 64), generator=g)
    tgt = torch.cat([ids[:, 1:], torch.full((64, 1), -100)], 1)
    return [({"input_ids": ids}, tgt)]


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def kronecker_figures(repeats: int) -> None:
    model, data = gpt2(), batch()
    layers = families.select_layers(model, None, families.detect_family(model))

    def fb():
        with forward.second_order_attention():
            for x, y in data:
                losses.loss_terms(forward.model_logits(model, x), y, "cross_entropy")[0].backward()
        model.zero_grad(set_to_none=True)

    def kron():
        with forward.second_order_attention():
            stats = collect_statistics(model, data, "cross_entropy", layers=layers, stat_dtype=torch.float32)
        return {n: measure.spectral_step(s, 20) for n, s in stats.items()}

    def dense_baseline():
        with forward.second_order_attention():
            stats = collect_statistics(model, data, "cross_entropy", layers=layers, stat_dtype=torch.float32)
        for s in stats.values():
            torch.linalg.eigh(s.C_A.double())
            torch.linalg.eigh(s.C_delta.double())
            torch.linalg.svd(s.G, full_matrices=False)

    t_fb = timed(fb, repeats)
    t_kron = timed(kron, repeats)
    t_dense = timed(dense_baseline, 1)
    print(f"GPT-2 4x384, vocab 512, 64x64 tokens, {torch.get_num_threads()} threads, float32 statistics")
    print(f"  one forward+backward                               {t_fb:8.3f} s   1.0x")
    print(f"  Kronecker measurement, all {len(layers)} layers (curvdist)      {t_kron:8.3f} s   {t_kron / t_fb:.2f}x"
          "   (target <= 2.0)")
    print(f"  hooks + full float64 eigh + full SVD (baseline)    {t_dense:8.3f} s   {t_dense / t_fb:.2f}x")
    worst = 0.0
    # accuracy of the top-K structure against dense truth on one layer of each shape
    with forward.second_order_attention():
        stats = collect_statistics(model, data, "cross_entropy", layers=layers, stat_dtype=torch.float64)
    for n, s in stats.items():
        sig = spectral.top_singular(s.G, 20)[0]
        sig_d = torch.linalg.svdvals(s.G)[:20]
        lam = spectral.top_eigen(s.C_A, 20)[0]
        lam_d = torch.linalg.eigvalsh(s.C_A).flip(0)[:20]
        worst = max(worst, float(((sig - sig_d).abs() / sig_d).max()), float(((lam - lam_d).abs() / lam_d).max()))
    print(f"  max relative error of top-20 σ_k and λ^A_k vs dense float64, all layers: {worst:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only the Kronecker figures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("== 1. Kronecker measurement ==")
    kronecker_figures(args.repeats)
    if args.quick:
        return
    print("\n== 2. spectral solvers (benchmarks/bench_spectral.py) ==")
    import bench_spectral
    sys.argv = ["bench_spectral.py", "--repeats", "1", "--threads", str(args.threads)]
    bench_spectral.main()
    print("\n== 3. exact curvature (benchmarks/bench_curvature.py) ==")
    import bench_curvature
    sys.argv = ["bench_curvature.py"]
    bench_curvature.main()


if __name__ == "__main__":
    main()
