"""The Kronecker measurement beside its peers, step by step, in one run (a script, not a test):

    PYTHONPATH=. .venv/bin/python benchmarks/bench_kronecker.py [--threads 2] [--repeats 3] [--profile]

Model and batch (issue 15): GPT-2, 4 blocks × 384 wide, 6 heads, vocabulary 2048, one micro-batch of 64 × 64 tokens,
float32, the 17 supported layers (4 × {c_attn, attn.c_proj, c_fc, mlp.c_proj} and lm_head).  Every figure is a
multiple of one forward + backward of the same batch (``loss.backward()``, MATH attention as curvdist runs it):

- **curvdist**: :func:`curvdist.analyze` with ``exact=False`` (its own ``timings``: statistics G, C_A, C_δ; spectral
  step: top-20 SVD of G, top-20 eigenpairs of C_A and C_δ, Rayleigh quotients; projections: h^SoP);
- **naive torch**: forward hooks and full backward hooks (C_A, C_δ per layer), G from ``loss.backward()``, then a full
  float64 ``eigh`` of every factor and a full SVD of every G;
- **floor**: what the statistics step cannot avoid, on this machine: one forward+backward (its weight-gradient
  GEMMs are G), half of each full product Σ a aᵀ, Σ δ δᵀ (the flops of a symmetric rank-R update at full GEMM speed,
  which no blocked triangle reaches) and the per-unit Gram products of the gradient-noise statistic;
- **kronfluence** 1.0.1 when installed (``pip install --no-deps kronfluence``): covariance fit (empirical Fisher) and
  its float64 eigendecomposition, in memory (its GPT-2 ``Conv1D`` layers swapped for equal ``nn.Linear``).

Targets (issue 15): statistics ≤ 1.5, spectral ≤ 0.3, projections ≤ 0.3, whole measurement ≤ 2.0.  Then the accuracy
of curvdist's top-20 σ_k, λ^A_k, λ^δ_k against dense float64 on the same batch (float64 statistics), and with
``--profile`` a torch.profiler table of each curvdist step.  Times are medians of ``--repeats`` runs of the wall clock,
or with ``--clock cpu`` of the process's CPU time: on a shared machine (other jobs on the cores) run
``--threads 1 --clock cpu``, whose ratios move least with the load; each step is divided by a forward+backward timed
just before it.  ``--no-peers`` times curvdist alone.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import curvdist
from curvdist.math import eigenvalues, families, forward, spectral
from curvdist.math import layers as L
from curvdist.math.collect import collect_statistics

VOCAB, WIDTH, BLOCKS, B, T, K = 2048, 384, 4, 64, 64, 20
TARGETS = {"statistics": 1.5, "spectral": 0.3, "projections": 0.3, "total": 2.0}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=BLOCKS, n_embd=WIDTH, n_head=6, vocab_size=VOCAB, n_positions=T,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    return ids, torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)


def loss_sum(model, ids, tgt):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")


def median_ratios(fn, fb, repeats: int) -> tuple[dict, float]:
    """Median over ``repeats`` runs (after one warm-up) of each step time of ``fn`` divided by the time of the
    forward+backward ``fb`` run just before it (so a change of load between runs moves both), and the median
    forward+backward time."""
    fn()
    fb()
    runs, fbs = [], []
    for _ in range(repeats):
        t = fb()["total"]
        fbs.append(t)
        runs.append({k: v / t for k, v in fn().items()})
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}, statistics.median(fbs)


def forward_backward(model, ids, tgt):
    def run():
        t0 = clock()
        with forward.second_order_attention():
            (loss_sum(model, ids, tgt) / int((tgt != -100).sum())).backward()
        model.zero_grad(set_to_none=True)
        return {"total": clock() - t0}
    return run


def curvdist_steps(model, ids, tgt):
    def run():
        t0 = clock()
        res = curvdist.analyze(model, [({"input_ids": ids}, tgt)], top_k=K, exact=False)
        total = clock() - t0
        t = res.timings
        return {"statistics": t["factors_s"], "spectral": t["spectral_s"], "projections": t["projections_s"],
                "total": total}
    return run


def naive_steps(model, ids, tgt):
    """Hooks (inputs, output gradients) → C_A, C_δ; G from .grad; full float64 eigh of each factor, full SVD of G."""
    layers = families.select_layers(model)

    def run():
        t0 = clock()
        acts, stats, handles = {}, {}, []
        n_terms = int((tgt != -100).sum())
        for name, mod in layers.items():
            handles.append(mod.register_forward_hook(
                lambda m, i, o, name=name: acts.__setitem__(name, L.input_rows(m, i[0].detach()))))
            handles.append(mod.register_full_backward_hook(
                lambda m, gi, go, name=name: stats.__setitem__(name, L.output_rows(m, go[0].detach()))))
        with forward.second_order_attention():
            loss_sum(model, ids, tgt).backward()
        factors = {}
        for name, mod in layers.items():
            a, d = acts[name], stats[name]
            G = (mod.weight.grad if isinstance(mod, nn.Linear) else mod.weight.grad.T) / n_terms  # Conv1D: (in, out)
            factors[name] = (a.T @ a / a.shape[0], d.T @ d / n_terms, G)
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        t1 = clock()
        for C_A, C_d, G in factors.values():
            torch.linalg.eigh(C_A.double())
            torch.linalg.eigh(C_d.double())
            torch.linalg.svd(G, full_matrices=False)
        t2 = clock()
        return {"statistics": t1 - t0, "spectral": t2 - t1, "total": t2 - t0}
    return run


def floor_steps(model, ids, tgt):
    """What the statistics step cannot avoid, at this machine's GEMM rate: one forward+backward (it includes the
    weight-gradient GEMMs, i.e. G), half of each full product Σ a aᵀ and Σ δ δᵀ (a symmetric rank-R update done at
    full GEMM speed with no redundant flops: the syrk ideal), and the per-unit Gram products of the gradient-noise
    statistic (T²(m + n) per unit).  Rows are the layers' real input and error rows of the batch."""
    layers = families.select_layers(model)
    rows: dict[str, list] = {}
    handles = []
    for name, mod in layers.items():
        handles.append(mod.register_forward_hook(
            lambda m, i, o, name=name: rows.setdefault(name, [None, None]).__setitem__(0, L.input_rows(m, i[0].detach()))))
        handles.append(mod.register_full_backward_hook(
            lambda m, gi, go, name=name: rows[name].__setitem__(1, L.output_rows(m, go[0].detach()))))
    with forward.second_order_attention():
        loss_sum(model, ids, tgt).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    fb = forward_backward(model, ids, tgt)

    def run():
        t_fb = fb()["total"]
        t0 = clock()
        for a, d in rows.values():
            torch.mm(a.T, a)
            torch.mm(d.T, d)
        t1 = clock()
        for a, d in rows.values():
            A, D = a.reshape(B, T, -1), d.reshape(B, T, -1)
            (torch.bmm(A, A.mT) * torch.bmm(D, D.mT)).sum()
        t2 = clock()
        return {"statistics": t_fb + (t1 - t0) / 2 + (t2 - t1)}
    return run


def as_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with transformers' ``Conv1D`` swapped for equal ``nn.Linear`` (kronfluence tracks Linear)."""
    from transformers.pytorch_utils import Conv1D
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1])
            lin.weight.data.copy_(mod.weight.data.T)
            lin.bias.data.copy_(mod.bias.data)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, lin)
    return model


def kronfluence_steps(model, ids, tgt):
    """kronfluence's covariance fit (empirical Fisher) and float64 eigendecomposition, in memory; None if absent."""
    try:
        from kronfluence.arguments import FactorArguments
        from kronfluence.factor.covariance import fit_covariance_matrices_with_loader
        from kronfluence.factor.eigen import perform_eigendecomposition
        from kronfluence.module.utils import wrap_tracked_modules
        from kronfluence.task import Task
        from kronfluence.utils.state import State
    except ImportError:
        return None

    class LM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return loss_sum(model, *batch)

        def compute_measurement(self, batch, model):
            return loss_sum(model, *batch)

    task, args = LM(), FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    wrapped = wrap_tracked_modules(as_linear(model), task=task, factor_args=args)
    state = State(cpu=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, tgt), batch_size=B)

    def run():
        t0 = clock()
        with forward.second_order_attention():
            _, cov = fit_covariance_matrices_with_loader(wrapped, state, task, loader, args, disable_tqdm=True)
        t1 = clock()
        perform_eigendecomposition(cov, wrapped, state, args, disable_tqdm=True)
        t2 = clock()
        return {"statistics": t1 - t0, "spectral": t2 - t1, "total": t2 - t0}
    return run


def accuracy(model, ids, tgt) -> float:
    """max over layers and k ≤ 20 of the relative error of σ_k, λ^A_k, λ^δ_k (curvdist's solvers) vs dense float64."""
    m64 = copy.deepcopy(model).double()
    layers = families.select_layers(m64)
    with forward.second_order_attention():
        stats = collect_statistics(m64, [({"input_ids": ids}, tgt)], "cross_entropy", layers=layers,
                                   stat_dtype=torch.float64)
    worst = 0.0
    for s in stats.values():
        pairs = [(spectral.top_singular(s.G, K)[0], torch.linalg.svdvals(s.G)[:K])]
        for C in (s.C_A, s.C_delta):
            pairs.append((eigenvalues.top_eigenvalues(C, K), torch.linalg.eigvalsh(C).flip(0)[:K]))
        for got, want in pairs:
            worst = max(worst, float(((got - want).abs() / want.abs()).max()))
    return worst


def profile(model, ids, tgt) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    with prof(activities=[ProfilerActivity.CPU]) as p:
        curvdist.analyze(model, [({"input_ids": ids}, tgt)], top_k=K, exact=False)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of curvdist's steps")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the float64 accuracy check")
    ap.add_argument("--no-peers", action="store_true", help="time curvdist alone (no kronfluence, no naive torch)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall clock, or the process's CPU time (stable on a shared machine with --threads 1)")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    sys.modules["curvdist.analyze"].time = types.SimpleNamespace(perf_counter=clock)   # analyze's step timings
    torch.set_num_threads(args.threads)
    model, (ids, tgt) = gpt2(), batch()
    for p in model.parameters():
        p.requires_grad_(True)
    fb_run = forward_backward(model, ids, tgt)
    cols = {} if args.no_peers else {"kronfluence 1.0.1 (in memory)": kronfluence_steps(model, ids, tgt),
                                     "naive torch (hooks + eigh + svd)": naive_steps(model, ids, tgt)}
    cols["curvdist.analyze(exact=False)"] = curvdist_steps(model, ids, tgt)
    cols["floor (fwd+bwd, syrk ideal, unit Grams)"] = floor_steps(model, ids, tgt)
    times, fbs = {}, []
    for name, fn in cols.items():
        times[name] = None
        if fn is not None:
            times[name], t = median_ratios(fn, fb_run, args.repeats)
            fbs.append(t)
    fb = statistics.median(fbs)
    print(f"GPT-2 {BLOCKS}x{WIDTH}, vocabulary {VOCAB}, {B}x{T} tokens, {torch.get_num_threads()} threads; "
          f"multiples of one forward+backward ({fb:.2f} s {args.clock}, median), medians of {args.repeats} ratios")
    print()
    print("| step | " + " | ".join(cols) + " | target |")
    print("| --- | " + " | ".join("---" for _ in cols) + " | --- |")
    for step, label in (("statistics", "statistics (curvdist also G)"),
                        ("spectral", "eigensolves (+ SVD for curvdist, + Rayleigh quotients)"),
                        ("projections", "projections (h^SoP, Rayleigh quotients)"), ("total", "total")):
        cells = []
        for t in times.values():
            cells.append("not installed" if t is None else (f"{t[step]:.2f}" if step in t else "—"))
        print(f"| {label} | " + " | ".join(cells) + f" | ≤ {TARGETS[step]} |")
    if not args.no_accuracy:
        print(f"\nmax relative error of top-{K} σ_k, λ^A_k, λ^δ_k vs dense float64, all layers: "
              f"{accuracy(model, ids, tgt):.1e}")
    if args.profile:
        profile(model, ids, tgt)


if __name__ == "__main__":
    main()
