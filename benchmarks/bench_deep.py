"""Load: a deep, narrow Llama (64 blocks by default) over 4 stage actors on a local Ray, and each stage's peak
memory.  Statistics are accumulated per micro-batch and every micro-batch's activations are freed at its end, so a
stage's peak memory should not grow with the number of micro-batches: the run is done at N and 2N micro-batches.

    .venv/bin/python benchmarks/bench_deep.py [--blocks 64] [--stages 4] [--hidden 64] [--micro-batches 4]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def deep_llama(path: Path, blocks: int, hidden: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="2MB")
    return path


def run(ckpt: Path, out: Path, stages: int, micro_batches: int, seq_len: int, micro_batch: int, blocks: int) -> dict:
    from curvdist import config as C
    from curvdist.io import query
    from curvdist.runner import driver

    cfg = C.load_config(None, [f"model.path={ckpt}", f"stages={stages}", "data.source=synthetic",
                               f"data.sequences={micro_batches * micro_batch}", f"data.seq_len={seq_len}",
                               f"data.micro_batch={micro_batch}", "top_k=8", "plots=false", "ray.num_cpus=2",
                               f"exact_layers=[model.layers.{blocks - 1}.*]", f"out={out}"])
    t0 = time.perf_counter()
    run_id = driver.main(cfg)
    wall = time.perf_counter() - t0
    row = query.read_run(out, run_id)
    timings = json.loads(row["timings_json"])
    return {"wall_s": wall, "layers": len(query.done_layers(out, run_id)),
            "peak_rss_gb_per_worker": timings["peak_rss_gb_per_worker"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4)
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as d:
        ckpt = deep_llama(Path(d) / "deep", a.blocks, a.hidden)
        print(f"{a.blocks}-block Llama, hidden {a.hidden}, {a.stages} stages, micro-batches of "
              f"{a.micro_batch}×{a.seq_len} tokens, 2 CPUs")
        for n in (a.micro_batches, 2 * a.micro_batches):
            r = run(ckpt, Path(d) / f"out{n}", a.stages, n, a.seq_len, a.micro_batch, a.blocks)
            peaks = ", ".join(f"{g:.2f}" for g in r["peak_rss_gb_per_worker"])
            print(f"{n:3d} micro-batches: {r['layers']} layers in {r['wall_s']:.1f} s; peak RSS per stage (GiB): "
                  f"{peaks}")


if __name__ == "__main__":
    main()
