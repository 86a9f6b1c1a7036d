"""Seconds per stage-to-stage hop of a tensor: Ray's object store against Ray Direct Transport.  A script:

    .venv/bin/python benchmarks/bench_transport.py [--mb 4 32 128] [--kinds object_store gloo] [--gpu]

Two actors; the producer returns a float32 tensor of the given size the way a stage does
(:func:`curvdist.runner.transport.wire`), the consumer reduces it (so the bytes must arrive).  Each size is
timed over --reps round trips after one warm-up.  With --gpu the actors hold a GPU each and the kinds default
to object_store, nccl (needs CuPy) and cuda_ipc.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curvdist.runner import transport as T


class Stage:
    def __init__(self, kind: str, device: str):
        self.kind, self.device = kind, device

    def leave_link(self) -> None:
        pass

    def produce(self, n: int):
        return T.wire(torch.ones(n, device=self.device), self.kind)

    def consume(self, x) -> float:
        return float(torch.as_tensor(x).to(self.device).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[4, 32, 128])
    ap.add_argument("--kinds", nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args()
    import ray

    kinds = a.kinds or (["object_store", "nccl", "cuda_ipc"] if a.gpu else ["object_store", "gloo"])
    ray.init(address="local", num_cpus=2, num_gpus=2 if a.gpu else 0, include_dashboard=False, log_to_driver=False)
    device = "cuda" if a.gpu else "cpu"
    print(f"seconds per hop (producer → consumer), {device}; MB = 1e6 bytes of float32")
    print(f"{'MB':>8} " + " ".join(f"{k:>14}" for k in kinds))
    rows = {mb: [] for mb in a.mb}
    for kind in kinds:
        rdt = T.rdt(kind)
        Actor = ray.remote(enable_tensor_transport=True)(Stage) if rdt else ray.remote(Stage)
        res = {"num_gpus": 1} if a.gpu else {}
        p, c = (Actor.options(**res).remote(kind, device) for _ in range(2))
        link = T.Link(kind)
        link.connect([p, c])
        for mb in a.mb:
            n = int(mb * 1e6 / 4)
            ray.get(c.consume.remote(p.produce.options(**T.call_options(kind)).remote(n)))
            t0 = time.perf_counter()
            for _ in range(a.reps):
                assert ray.get(c.consume.remote(p.produce.options(**T.call_options(kind)).remote(n))) == n
            rows[mb].append((time.perf_counter() - t0) / a.reps)
        link.close()
        for x in (p, c):
            ray.kill(x)
    for mb, ts in rows.items():
        print(f"{mb:>8g} " + " ".join(f"{t:>14.4f}" for t in ts))
    base = rows[a.mb[-1]][0]
    print("at the largest size, object store / each: " + ", ".join(f"{k} {base / t:.2f}×"
                                                                   for k, t in zip(kinds, rows[a.mb[-1]])))


if __name__ == "__main__":
    main()
