"""Measure what a stage really allocates, for tests/test_memory.py (run as a script in a fresh process).

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python tests/probe_memory.py CHECKPOINT DTYPE OUT.json

With every allocation of 64 kB or more served by mmap, the process's resident memory follows the live tensors: an
allocation is resident once written and returned to the system when freed.  Peaks are read from VmHWM after
resetting it (``/proc/self/clear_refs``), live memory from VmRSS.  Prints nothing; writes measured and modelled bytes
to OUT.json.
"""
import json
import sys

import torch

from curvdist.config import load_config
from curvdist.io import checkpoint as ckpt
from curvdist.io.slice import build_slice
from curvdist.math import families, forward, spectral
from curvdist.math.eigenvalues import top_eigenvalues
from curvdist.math.factors import StatisticsCollector
from curvdist.math.stage_tangents import stage_jet
from curvdist.runner import estimate, planning
from curvdist.runner.memory import exact_route_bytes, spectral_workspace

B, T, K = 4, 128, 4


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(fn):
    """(result, peak increase, live increase) of ``fn()`` in resident bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    r0 = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - r0, _status("VmRSS") - r0


def main(path: str, dtype: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.path={path}", "stages=3", f"model.dtype={dtype}", f"data.micro_batch={B}",
                             f"data.seq_len={T}", "data.sequences=8", "device=cpu", f"top_k={K}"])
    plan = planning.plan_from_config(cfg)
    mem = estimate.estimate(cfg, plan).memory.stages[1]
    st, dt = plan.stages[1], getattr(torch, dtype)
    index = ckpt.CheckpointIndex.open(path)
    stage = build_slice(index, st.first_block, st.last_block, has_embedding=False, has_head=False, dtype=dt,
                        device="cpu", attn_implementation="sdpa")
    for p in stage.parameters():
        p.requires_grad_(True)
    hidden = plan.arch.hidden
    layers = {n: m for n, m in families.select_layers(stage, None, index.family).items() if n in st.layers}
    col = StatisticsCollector(layers, stat_dtype=torch.float32).attach()
    x = torch.randn(B, T, hidden).to(dt).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.long)

    def fwd(key):  # as curvdist.runner.worker.Worker._forward does it
        col.begin_microbatch(mask.bool(), key=key)
        with torch.enable_grad(), forward.second_order_attention():
            return stage(x, attention_mask=mask)

    def bwd(y, key):
        col.seed_kind("both")
        torch.autograd.grad(y, col.outputs(key) + [x], torch.ones_like(y), retain_graph=True)
        col.seed_kind(None)
        col.end_microbatch(B * T, key=key)

    bwd(fwd(0), 0)  # warm-up: first calls initialise kernels and allocate the collector's sums (G, C_A, C_δ)
    y1, _, live_fwd = measure(lambda: fwd(1))
    _, peak_bwd, _ = measure(lambda: bwd(y1, 1))
    y1 = None  # the micro-batch's graph is freed
    col.detach()
    res = {"activations": [live_fwd, mem.activations], "backward": [peak_bwd, mem.backward]}

    xd, xdot, xddot = x.detach(), torch.randn(K, B, T, hidden).to(dt), torch.randn(K, B, T, hidden).to(dt)
    kw = {"attention_mask": mask}
    stage_jet(stage, xd, xdot[:1], xddot[:1], T=1, kwargs=kw)  # warm-up
    _, peak_exact, _ = measure(lambda: stage_jet(stage, xd, xdot, xddot, T=K, kwargs=kw))
    model = exact_route_bytes(mem.activations_autograd, B * T, plan.arch, K, dt.itemsize, last=False, seq_len=T,
                              device="cpu")
    res["exact"] = [peak_exact, model - 2 * K * B * T * hidden * dt.itemsize]  # ẋ and ẍ were already there

    g = torch.Generator().manual_seed(0)
    for m, n in ((300, 700), (1200, 5000)):  # dense (min ≤ 384 on CPU fp32) and randomized SVD
        G = torch.randn(m, n, generator=g)
        spectral.top_singular(G, 20)  # warm-up
        _, peak, _ = measure(lambda G=G: spectral.top_singular(G, 20))
        res[f"svd {m}x{n}"] = [peak, spectral_workspace(m, n, 20, "float32", "cpu", factors=(False, False))]
    for d in (400, 1500):  # the spectral step's eigenvalues: dense eigvalsh (d ≤ 640) and block Lanczos
        A = torch.randn(d, 2 * d, generator=g)
        C = A @ A.T / d
        top_eigenvalues(C, 20)
        _, peak, _ = measure(lambda C=C: top_eigenvalues(C, 20))
        res[f"eig {d}"] = [peak, spectral_workspace(1, d, 20, "float32", "cpu", factors=(True, False))]
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
