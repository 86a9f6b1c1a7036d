"""α over a training run: per-checkpoint wall time of a trajectory, each checkpoint a fresh set of stage actors (the
previous driver: one ``driver.main`` per checkpoint) against one set of actors that only reload the weights
(:class:`curvdist.runner.session.Session`, what ``model.checkpoints`` does now).

    python benchmarks/bench_trajectory.py                     # tiny Llama (4 blocks), 4 checkpoints, 2 stages, CPU
    python benchmarks/bench_trajectory.py --checkpoints 6 --hidden 256 --layers 8

The checkpoints are random Llamas of one architecture saved as safetensors (``checkpoint-<N>``: no training needed).
Prints one line per checkpoint and route: the wall seconds of the whole run of that checkpoint (the driver's
``total_s``) and of its set-up (``load_s``: actors started and stages built, or the weights swapped in), then the
totals.  Both routes run in one process with Ray already up, so neither pays for starting Ray after the first run.
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
from curvdist.runner import driver, trajectory  # noqa: E402


def save_checkpoints(root: Path, n: int, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True)
    for k in range(1, n + 1):
        torch.manual_seed(k)
        LlamaForCausalLM(conf).save_pretrained(root / f"checkpoint-{100 * k}")
    return root


def timings(out: Path) -> list[tuple[int, dict]]:
    con = query.open(out)
    rows = con.sql("select step, timings_json from runs order by step").fetchall()
    con.close()
    return [(s, json.loads(t)) for s, t in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-trajectory-"))
    save_checkpoints(root / "ckpt", args.checkpoints, args.hidden, args.layers)
    common = ["model.name=null", f"model.checkpoints=[{root / 'ckpt'}/checkpoint-*]", f"stages={args.stages}",
              "data.source=synthetic", "data.sequences=8", "data.seq_len=32", "data.micro_batch=4", "top_k=8",
              "exact=false", "plots=false", "ray.num_cpus=2"]
    print(f"tiny Llama: hidden {args.hidden}, {args.layers} blocks, {args.checkpoints} checkpoints, {args.stages} "
          f"stages, {os.cpu_count()} CPUs")
    results = {}
    for route in ("fresh actors per checkpoint (before)", "one session, weights reloaded (after)"):
        out = root / ("before" if "before" in route else "after")
        cfg = C.load_config(None, common + [f"out={out}", "run_id=traj"])
        t0 = time.perf_counter()
        if "before" in route:   # what trajectory.main did before: one driver.main (its own actors) per checkpoint
            for sub in trajectory.step_configs(cfg):
                driver.main(sub)
        else:
            trajectory.main(cfg)
        results[route] = (time.perf_counter() - t0, timings(out))
    for route, (wall, rows) in results.items():
        print(f"\n{route}: {wall:.2f} s for {len(rows)} checkpoints")
        for step, t in rows:
            print(f"  step {step:>4}: run {t['total_s']:6.2f} s   set-up {t.get('setup', 'full'):>7} "
                  f"{t['load_s']:6.3f} s")
    (wb, before), (wa, after) = results.values()
    later_b = [t["total_s"] for _, t in before[1:]]
    later_a = [t["total_s"] for _, t in after[1:]]
    if later_b and later_a:
        print(f"\nlater checkpoints, mean run wall: before {sum(later_b) / len(later_b):.2f} s, after "
              f"{sum(later_a) / len(later_a):.2f} s; whole trajectory {wb:.2f} s → {wa:.2f} s")


if __name__ == "__main__":
    main()
