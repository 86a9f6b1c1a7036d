"""Pipelined passes: wall time and stage busy fraction of the statistics pass, one micro-batch at a time (the old
driver: ``in_flight=1``) against the 1F1B schedule (``in_flight = stages``), and with replicas.

    python benchmarks/bench_pipeline.py                 # CPU: tiny GPT-2, 4 stages (sleep-hook and real compute)
    python benchmarks/bench_pipeline.py --gpu           # lent GPU: random ~1B Llama, 4 fractional-GPU stages
    python benchmarks/bench_pipeline.py --projections   # CPU: the projections pass streamed against replayed

Prints one line per configuration: wall seconds of the statistics and projections passes and the busy fraction
Σ busy / (wall × workers) the driver records in the run's timings (``runs.timings_json`` → ``passes``).  The
sleep-hook rows replace each stage's forward with a fixed sleep (``CURVDIST_STAGE_SLEEP``), so they show the
schedule alone: on 2 CPU cores, 4 stages of real compute share 2 cores and cannot all be busy at once.
``--projections``: the projections pass of one run with the statistics pass's rows replayed (``row_cache_gb``, the
default) against one that streams the batch again (``row_cache_gb=0``), each as the run's timings record it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from curvdist import config as C  # noqa: E402
from curvdist.io import query  # noqa: E402
from curvdist.runner import driver  # noqa: E402
from curvdist.runner.spec import SLEEP_ENV  # noqa: E402


def run(overrides: list[str], sleep: float = 0.0) -> dict:
    out = tempfile.mkdtemp(prefix="bench-pipeline-")
    if sleep:
        os.environ[SLEEP_ENV] = str(sleep)
    else:
        os.environ.pop(SLEEP_ENV, None)
    cfg = C.load_config(None, overrides + [f"out={out}", "plots=false", "exact=false"])
    t0 = time.perf_counter()
    run_id = driver.main(cfg)
    total = time.perf_counter() - t0
    timings = json.loads(query.read_run(out, run_id)["timings_json"])
    passes = {p["kind"]: p for p in timings["passes"]}
    return {"total_s": total, **{f"{k}_wall_s": p["wall_s"] for k, p in passes.items()},
            **{f"{k}_busy": p["busy_fraction"] for k, p in passes.items()}, "layout": timings["layout"]}


def line(name: str, r: dict) -> str:
    lay = r["layout"]
    return (f"{name:<34} {lay['stages']}×{lay['replicas']} in_flight={lay['in_flight']:<2} M={lay['microbatches']:<3} "
            f"stats {r['stats_wall_s']:7.2f} s busy {r['stats_busy']:.2f} | projections "
            f"{r['projections_wall_s']:7.2f} s busy {r['projections_busy']:.2f}")


def cpu() -> None:
    import ray
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    S, M, t = 4, 16, 0.1
    base = ["model.name=tiny-gpt2", f"stages={S}", "data.source=synthetic", "data.seq_len=64", "data.micro_batch=4",
            f"data.sequences={4 * M}", "top_k=10", f"ray.cpus_per_stage={os.cpu_count() / S}"]
    print(f"statistics pass, tiny GPT-2 (4 blocks, d=64), {S} stages, M={M} micro-batches of 4×64 tokens, "
          f"{os.cpu_count()} CPU cores")
    print(f"sleep hook t = {t} s per forward: ideal 1F1B (M+S-1)·t = {(M + S - 1) * t:.2f} s, one at a time "
          f"M·S·t = {M * S * t:.2f} s")
    sl = base + ["layers=[transformer.h.*.mlp.c_fc]"]
    print(line("sleep, one at a time (old)", run(sl + ["in_flight=1"], sleep=t)))
    print(line("sleep, 1F1B", run(sl, sleep=t)))
    print(line("sleep, 1F1B, in_flight=2S", run(sl + [f"in_flight={2 * S}"], sleep=t)))
    print(line("real compute, one at a time (old)", run(base + ["in_flight=1"])))
    print(line("real compute, 1F1B", run(base)))
    print(line("real compute, 2 stages × 2 replicas", run(base + ["stages=2", "replicas=2",
                                                                  f"ray.cpus_per_stage={os.cpu_count() / 4}"])))
    ray.shutdown()


def projections(repeats: int) -> None:
    """A random GPT-2 (4 blocks, d = 128, vocabulary 2048) on 2 stages × 1 replica, 32 micro-batches of 4 × 64
    tokens, every layer: the projections pass's wall time streamed (row_cache_gb=0) and replayed (the default
    budget), the best of ``repeats`` runs each, beside the statistics pass of the same runs."""
    import ray
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = Path(tempfile.mkdtemp(prefix="gpt2-d128-"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=2048, n_positions=128)).save_pretrained(d)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    base = [f"model.path={d}", "stages=2", "data.source=synthetic", "data.seq_len=64", "data.micro_batch=4",
            "data.sequences=128", "top_k=20", f"ray.cpus_per_stage={os.cpu_count() / 2}"]
    print(f"projections pass, random GPT-2 4 × 128 (vocabulary 2048), 2 stages, 32 micro-batches of 4 × 64 tokens, "
          f"{os.cpu_count()} CPU cores; best of {repeats} runs")
    got = {}
    cases = (("streamed", ["row_cache_gb=0"]), ("replayed", []))
    runs = {name: [] for name, _ in cases}
    for _ in range(repeats):   # alternated, so that a change in the machine's load reaches both alike
        for name, over in cases:
            runs[name].append(run(base + over))
    for name, _ in cases:
        got[name] = min(r["projections_wall_s"] for r in runs[name])
        each = " ".join(f"{r['projections_wall_s']:.3f}" for r in runs[name])
        stats = " ".join(f"{r['stats_wall_s']:.3f}" for r in runs[name])
        print(f"{name:<9} projections {got[name]:7.3f} s (runs: {each});  statistics pass (runs: {stats}) s")
    print(f"replayed / streamed (best runs): {got['replayed'] / got['streamed']:.3f}")
    ray.shutdown()


def gpu() -> None:
    """On the lent GPU: a randomly initialised ~1B Llama (built on the device, saved as safetensors), 4 stages
    with a quarter GPU each on one device, 1F1B against one micro-batch at a time, bf16 forward."""
    import ray
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(tempfile.mkdtemp(prefix="llama-1b-"))
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(d)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    ray.init(address="local", num_gpus=1, include_dashboard=False, log_to_driver=False)
    S, M = 4, 16
    base = [f"model.path={d}", f"stages={S}", "device=cuda", "model.dtype=bfloat16", "data.source=synthetic",
            "data.seq_len=512", "data.micro_batch=4", f"data.sequences={4 * M}", "top_k=20",
            "layers=[model.layers.*.mlp.*,model.layers.*.self_attn.o_proj]", f"ray.num_gpus_per_stage={1 / S}",
            "factor_budget_gb=16"]
    print(f"random Llama {n / 1e9:.2f}B params, {S} stages × 1/{S} GPU on one device, M={M} micro-batches of 4×512")
    print(line("one at a time (old)", run(base + ["in_flight=1"])))
    print(line("1F1B", run(base)))
    ray.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the prepared block for a lent GPU machine")
    ap.add_argument("--projections", action="store_true", help="the projections pass streamed against replayed")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case of --projections (the best is printed)")
    args = ap.parse_args()
    projections(args.repeats) if args.projections else gpu() if args.gpu else cpu()
