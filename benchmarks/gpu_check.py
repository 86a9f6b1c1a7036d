"""GPU check (not a test): the CUDA code paths of the measurement core, with figures.

    PYTHONPATH=. python3 benchmarks/gpu_check.py        # on a machine with a CUDA device

1. Planted spectra (SPEC §4.3) on the GPU in float64: α = 1/(1+g), α_Kron = 2, φ = 0.
2. bf16 forward with fp32 statistics vs the float64 reference on the same GPU (tiny GPT-2): relative errors.
3. Costs on the benchmark GPT-2 (4 layers, 384 wide, vocab 512, 64×64 tokens) in multiples of one forward+backward.
4. A 0.5B-class Llama (hidden 2048, 8 blocks, MLP 5632, vocab 32000) in bf16: statistics of every layer, spectral
   work, exact h for K = 20 directions of one MLP layer.
5. ``--pipeline``: the Ray runner on the device: a random ~1B Llama (16 blocks × 2048, built on the GPU, saved as
   safetensors), 4 stages of a quarter GPU each, bf16 forward; the passes' seconds and busy fractions, the exact
   pass's sweeps, h with exact_dtype=float32 against exact_dtype=model (bf16), and the 7B config's time projected
   from the measured exact pass by the cost model's FLOP ratio.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import curvdist
from curvdist.math import forward, losses

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a smoke run of the same code (no large models)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(f, reps=3):
    f()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def planted_check():
    from test_planted import K, planted
    for g in (0.5, 1.5):
        model, data, lam, s = planted(g)
        model = model.to(DEV)
        data = [(a.to(DEV), y.to(DEV)) for a, y in data]
        r = curvdist.analyze(model, data, loss="mse", top_k=K).layers.to_pylist()[0]
        print(f"planted g={g}: alpha={r['alpha']:.9f} (want {1 / (1 + g):.9f})  alpha_kron={r['alpha_kron']:.9f}  "
              f"phi={r['phi']:.2e}  status={r['status']}")


def gpt2(n_layer=4, n_embd=384, vocab=512, seq=64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=6, vocab_size=vocab, n_positions=seq,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def lm_batch(vocab, B, T, device, micro=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    tgt = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
    return [({"input_ids": i.to(device)}, t.to(device)) for i, t in zip(ids.chunk(micro), tgt.chunk(micro))]


def bf16_check():
    model = gpt2(n_layer=2, n_embd=192, seq=32).to(DEV)
    data = lm_batch(512, 8, 32, DEV)
    ref = curvdist.analyze(model, data, top_k=10, dtype=torch.float64)
    lo = curvdist.analyze(model.to(torch.float32), data, top_k=10, dtype=torch.bfloat16, stat_dtype=torch.float32)
    a = {(r["layer"], r["k"]): r for r in ref.directions.to_pylist()}
    errs = {c: [] for c in ("sigma", "h_kron", "h")}
    for r in lo.directions.to_pylist():
        q = a[(r["layer"], r["k"])]
        for c in errs:
            if r[c] is not None and q[c] is not None and q[c] != 0:
                errs[c].append(abs(r[c] - q[c]) / abs(q[c]))
    for c, e in errs.items():
        e = torch.tensor(e)
        print(f"bf16 forward / fp32 stats vs fp64, {c}: median rel err {e.median():.2e}, max {e.max():.2e} (k ≤ 10)")
    la = {r["layer"]: r for r in ref.layers.to_pylist()}
    d = [abs(r["alpha_kron"] - la[r["layer"]]["alpha_kron"]) for r in lo.layers.to_pylist()
         if r["alpha_kron"] is not None and la[r["layer"]]["alpha_kron"] is not None]
    print(f"bf16 vs fp64 alpha_kron: max abs diff {max(d):.3e} over {len(d)} layers")


def fwd_bwd(model, data):
    def f():
        with forward.second_order_attention():
            for x, y in data:
                logits = forward.model_logits(model, x)
                losses.loss_terms(logits, y, "cross_entropy")[0].backward()
        model.zero_grad(set_to_none=True)
    return f


def cost_check(model, data, name, exact_layer, dtype):
    model = model.to(DEV).to(dtype)
    t_fb = timed(fwd_bwd(model, data))
    from curvdist.math import families
    from curvdist.math.collect import collect_statistics
    from curvdist.math.curvature import exact_curvature
    from curvdist.math.measure import spectral_step
    layers = families.select_layers(model, None, families.detect_family(model))

    def kron():
        stats = collect_statistics(model, data, "cross_entropy", layers=layers, stat_dtype=torch.float32)
        return {n: spectral_step(s, 20) for n, s in stats.items()}
    t_kron = timed(kron, reps=1)
    t_stats = timed(lambda: collect_statistics(model, data, "cross_entropy", layers=layers,
                                               stat_dtype=torch.float32), reps=1)
    sp = kron()[exact_layer]
    dirs = {exact_layer: sp.directions}

    def exact():
        exact_curvature(model, data, "cross_entropy", dirs, layers={exact_layer: layers[exact_layer]})
    t_exact = timed(exact, reps=1)
    print(f"{name}: fwd+bwd {t_fb * 1e3:.1f} ms; Kronecker measurement of all {len(layers)} layers "
          f"{t_kron / t_fb:.1f}x (of which statistics {t_stats / t_fb:.1f}x); exact h+h_gn, K=20, {exact_layer}: {t_exact / t_fb:.1f}x; "
          f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    torch.cuda.reset_peak_memory_stats()


def pipeline_check():
    """Section 5 (module docstring)."""
    import json
    import os
    import tempfile

    import ray
    from transformers import LlamaConfig, LlamaForCausalLM

    from curvdist import config as C
    from curvdist.io import query
    from curvdist.runner import driver
    from curvdist.runner.estimate import estimate
    from curvdist.runner.planning import plan_from_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    d = Path(tempfile.mkdtemp(prefix="llama-1b-"))
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEV):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    torch.cuda.empty_cache()
    ray.init(address="local", num_gpus=1, include_dashboard=False, log_to_driver=False)
    out = tempfile.mkdtemp(prefix="pipe-")
    base = [f"model.path={d}", "stages=4", "ray.num_gpus_per_stage=0.25", "device=cuda", "model.dtype=bfloat16",
            "data.source=synthetic", "data.sequences=16", "data.seq_len=512", "data.micro_batch=2", "top_k=20",
            "layers=[model.layers.2.mlp.*,model.layers.7.self_attn.o_proj,model.layers.11.mlp.up_proj]",
            "plots=false", f"out={out}", "hardware.gpu=H200"]
    runs = {}
    for xd in ("float32", "model"):
        c = C.load_config(None, base + [f"exact_dtype={xd}"])
        t0 = time.perf_counter()
        run_id = driver.main(c)
        wall = time.perf_counter() - t0
        timings = json.loads(query.read_run(out, run_id)["timings_json"])
        con = query.open(out)
        h = {(r[0], r[1]): r[2] for r in con.sql(f"select layer, k, h from directions where run_id='{run_id}'")
             .fetchall()}
        runs[xd] = (c, timings, h)
        print(f"1B Llama, 4 stages × 1/4 H200, exact_dtype={xd}: run {wall:.1f} s")
        for p in timings["passes"]:
            print(f"  {p['kind']:12s} {p['wall_s']:8.2f} s  busy {p['busy_fraction']}"
                  + (f"  sweeps {p['sweeps']}  sent {p['sent_bytes'] / 1e9:.2f} GB" if p["kind"] == "exact" else ""))
    h32, h16 = runs["float32"][2], runs["model"][2]
    rel = torch.tensor([abs(h16[k] - v) / abs(v) for k, v in h32.items() if v and h16.get(k) is not None])
    print(f"h, bf16 HVPs against float32 HVPs: median relative difference {float(rel.median()):.2e}, "
          f"max {float(rel.max()):.2e} ({rel.numel()} directions)")
    c32, t32, _ = runs["float32"]
    measured = next(p["wall_s"] for p in t32["passes"] if p["kind"] == "exact")
    here = estimate(c32, plan_from_config(c32)).cost.total_s("pipelined")
    big = C.load_config(str(Path(__file__).resolve().parents[1] / "configs" / "llama2-7b-8gpu.yaml"),
                        ["hardware.gpu=H200"])
    there = estimate(big, plan_from_config(big)).cost.total_s("pipelined")
    if here and there:
        print(f"7B config on 8 GPUs, projected from the measured exact pass × the cost model's ratio: "
              f"{measured * there / here / 3600:.2f} h (cost model alone: {there / 3600:.2f} h)")
    ray.shutdown()


def main():
    if "--pipeline" in sys.argv:
        print(torch.__version__, torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu")
        if DEV == "cuda":
            pipeline_check()
        return
    print(torch.__version__, torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke run)")
    if "--costs-only" not in sys.argv:
        planted_check()
        bf16_check()
    if DEV == "cpu":
        return
    cost_check(gpt2(), lm_batch(512, 64, 64, DEV), "GPT-2 4x384 fp32, 64x64 tokens",
               "transformer.h.0.attn.c_attn", torch.float32)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000, attn_implementation="sdpa")
    with torch.device(DEV):
        llama = LlamaForCausalLM(cfg)
    cost_check(llama, lm_batch(32000, 8, 512, DEV, micro=2), "Llama 8x2048 (0.5B) bf16, 8x512 tokens",
               "model.layers.4.mlp.up_proj", torch.bfloat16)


if __name__ == "__main__":
    main()
