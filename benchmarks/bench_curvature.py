"""Cost of exact directional curvature, in multiples of one forward+backward (prints a table; not a test).

Model: transformers GPT2LMHeadModel, 4 blocks, n_embd 384, 6 heads, vocabulary 512, 64 positions, random init,
float32, eager attention; batch 64 × 64 tokens.  For K = 20 directions of four layers (first block attn.c_attn,
the middle block's attn.c_attn and mlp.c_fc, last block mlp.c_proj) it times, each in multiples of one
forward+backward (re-measured around every layer; the machine may be shared):

- ``taylor``: :func:`curvdist.math.curvature.exact_curvature` with ``method="taylor"`` (in process: the K
  directions as rows of jets, as many rows per jet as ``JET_BUDGET`` allows for the widest activation after the
  layer; h and h^GN together);
- ``2×bwd``, ``GN``: the default route (``method="output"``: one forward, one create_graph backward, batched double
  backwards from the layer output; h and h^GN together, and h^GN alone);
- ``loop h``: the same forward + create_graph backward, then K separate double backwards (retained graph);
- ``param h`` (``--param``): the torch.func forward-over-reverse route on the weight (``method="param"``);
- ``sweep``: the pipeline route, run here on one stage holding the whole model: the K directions as rows of a
  jet seeded at the layer (:mod:`curvdist.math.stage_tangents`: Taylor mode to the logits, h and h^GN at the loss),
  rows per jet as a stage worker cuts them (``--sweep-chunk``: at most that many, as ``exact_chunk``), i.e. what
  the stage workers compute, without Ray;
- ``floor``: 2·K·(matmul FLOPs downstream of the layer) / (3·all matmul FLOPs), the FLOP floor of the K
  directions (two products per downstream linear map per direction, against three for one forward+backward);
- ``+fwd``: that plus 1/3, the model's forward, which any exact method runs at least once (the second derivatives
  are taken at its activations); elementwise work comes on top of both.

Usage: ``python benchmarks/bench_curvature.py [--threads 2] [--K 20] [--batch 64] [--param] [--chunk N]
[--repeats R] [--sweep-chunk N]``
"""
from __future__ import annotations

import argparse
import time

import torch

from curvdist.math import layers as L
from curvdist.math.curvature import exact_curvature
from curvdist.math.forward import model_logits, second_order_attention
from curvdist.math.losses import loss_terms


def build(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_embd=384, n_head=6, n_layer=4, vocab_size=512, n_positions=64, attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).float().eval()
    ids = torch.randint(0, 512, (64, 64))
    targets = torch.cat([ids[:, 1:], torch.full((64, 1), -100)], 1)
    return model, ids, targets


def timeit(fn, reps):
    """(wall, cpu) seconds: best of ``reps`` runs after one warm-up; reps=0: one run, no warm-up.  cpu is this
    process's CPU time (all its threads), which a machine shared with other jobs inflates much less than wall."""
    if reps == 0:
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c
    fn()
    return min(timeit(fn, 0) for _ in range(reps))


def fwd_bwd(model, ids, targets):
    model.zero_grad(set_to_none=True)
    with second_order_attention():
        Lb, _, _ = loss_terms(model_logits(model, ids), targets, "cross_entropy")
        Lb.backward()


def loop_hvps(model, ids, targets, module, U, V):
    """Reference: shared forward + create_graph backward, then K separate double backwards."""
    keep = {}
    h = module.register_forward_hook(lambda m, a, o: keep.update(x=a[0].detach(), s=o))
    try:
        with second_order_attention():
            z = model_logits(model, ids)
            Lb, _, _ = loss_terms(z, targets, "cross_entropy")
            (g,) = torch.autograd.grad(Lb, keep["s"], create_graph=True)
            sd = L.directional_output(module, keep["x"], U, V)
            out = [(sd[k] * torch.autograd.grad(g, keep["s"], sd[k], retain_graph=True)[0]).sum()
                   for k in range(U.shape[0])]
    finally:
        h.remove()
    return torch.stack(out)


def matmul_flops(model, ids):
    """Per linear layer: 2·rows·m·n; plus attention score/context bmm FLOPs assigned to the attention block."""
    rows = ids.numel()
    out = {}
    for name, mod in model.named_modules():
        if L.is_supported(mod):
            m, n = L.shape(mod)
            out[name] = 2 * rows * m * n
    cfg = model.config
    att = 2 * 2 * ids.shape[0] * ids.shape[1] ** 2 * cfg.n_embd  # QKᵀ and PV per block
    for b in range(cfg.n_layer):
        out[f"transformer.h.{b}.attn.__bmm__"] = att
    out["lm_head"] = 2 * rows * cfg.n_embd * cfg.vocab_size
    return out


def downstream_fraction(flops, name, order):
    """Share of the model's matmul FLOPs strictly after layer ``name`` (in forward order)."""
    i = order.index(name)
    return sum(flops[k] for k in order[i + 1:]) / sum(flops.values())


def time_layer(model, ids, targets, name, mod, U, V, args):
    """(wall, cpu) seconds of each method for one layer (best of ``args.repeats`` rounds), exact_curvature's
    result, and the loop's h."""
    dirs, lay, data = {name: (U, V)}, {name: mod}, [(ids, targets)]

    def ec(**kw):
        return exact_curvature(model, data, "cross_entropy", dirs, layers=lay, chunk_size=args.chunk, **kw)

    res, ref = {}, {}
    runs = {"both": lambda: res.update(ec(method="taylor")), "out": lambda: ec(method="output"),
            "gn": lambda: ec(method="output", hessian=False)}
    if not args.no_loop:
        runs["loop"] = lambda: ref.update(h=loop_hvps(model, ids, targets, mod, U, V))
    if args.param:
        runs["param"] = lambda: ec(gn=False, method="param")
    runs["sweep"] = lambda: ref.update(sweep=sweep(model, ids, targets, name, mod, U, V, args.sweep_chunk))
    ts = {}
    for _ in range(args.repeats):  # rounds interleave the methods, so a busy spell hits one round, not one method
        for key, fn in runs.items():
            ts[key] = tuple(map(min, ts.get(key, (float("inf"),) * 2), timeit(fn, 0)))
    return ts, res, ref


def sweep(model, ids, targets, name, mod, U, V, chunk=None):
    """h (K,) by the pipeline route on one stage: the K directions as rows of jets seeded at ``name``, Taylor mode
    to the logits, h and h^GN at the loss (:mod:`curvdist.math.stage_tangents`); rows per jet as a stage worker
    cuts them (``jet_slices`` by the widest activation after the layer, at most ``chunk``)."""
    from curvdist.math.stage_tangents import HeadSplit, Perturbation, jet_slices, loss_jet, stage_jet, widest_after
    widest = widest_after(model, lambda: model(ids[:1]).logits, {name: mod}, scale=ids.shape[0])
    pert, head = Perturbation({name: mod}), HeadSplit(model)
    out = []
    try:
        for sl in jet_slices([(name, U.shape[0])], widest, ids.device, cap=chunk):
            with pert.of(sl, {name: (U, V)}):
                z, zd, zdd = stage_jet(model, ids, T=len(sl), call=model_logits, head=head)
            out.append(loss_jet(z, zd, zdd, targets, "cross_entropy", len(sl), head=head.term())[0])
    finally:
        head.close()
        pert.close()
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="sequences of 64 tokens")
    ap.add_argument("--chunk", type=int, default=None, help="directions per batched pass (default: automatic)")
    ap.add_argument("--sweep-chunk", type=int, default=None, help="at most this many directions per jet of the sweep "
                    "route (exact_chunk; default: as many as JET_BUDGET allows)")
    ap.add_argument("--param", action="store_true", help="also time method='param' (torch.func)")
    ap.add_argument("--no-loop", action="store_true", help="skip the K-separate-double-backwards reference")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per layer; the best of them is reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, ids, targets = build()
    ids, targets = ids[:args.batch], targets[:args.batch]
    K = args.K
    fb = lambda: fwd_bwd(model, ids, targets)
    fb(), fb()
    t_fb = timeit(fb, 3)
    print(f"GPT-2 4×384, vocab 512, batch {ids.shape[0]}×{ids.shape[1]} tokens, float32, {args.threads} threads, K={K}")
    print(f"one forward+backward: {t_fb[0]:.3f} s wall, {t_fb[1]:.3f} s CPU (= 1.00)")
    flops = matmul_flops(model, ids)
    order = []
    for b in range(model.config.n_layer):
        p = f"transformer.h.{b}."
        order += [p + "attn.c_attn", p + "attn.__bmm__", p + "attn.c_proj", p + "mlp.c_fc", p + "mlp.c_proj"]
    order.append("lm_head")
    mid = model.config.n_layer // 2
    names = ["transformer.h.0.attn.c_attn", f"transformer.h.{mid}.attn.c_attn", f"transformer.h.{mid}.mlp.c_fc",
             f"transformer.h.{model.config.n_layer - 1}.mlp.c_proj"]
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(1)
    hdr = f"{'layer':30s} {'floor':>6s} {'+fwd':>6s} {'taylor':>6s} {'2×bwd':>6s} {'GN':>6s} {'sweep':>6s} {'loop h':>7s}"
    print("multiples of one forward+backward, CPU time (wall time in brackets for taylor)")
    print(hdr + (f" {'param h':>8s}" if args.param else "") + "  rel.diff(loop)  [taylor wall]")
    for name in names:
        mod = mods[name]
        m, n = L.shape(mod)
        U = torch.randn(K, m, generator=g)
        V = torch.randn(K, n, generator=g)
        U, V = U / U.norm(dim=1, keepdim=True), V / V.norm(dim=1, keepdim=True)
        floor = 2 * K * downstream_fraction(flops, name, order) / 3
        ts, res, ref = time_layer(model, ids, targets, name, mod, U, V, args)
        t_fb = tuple(map(min, t_fb, timeit(fb, 1)))  # re-measured: min over the run

        x = {k: (w / t_fb[0], c / t_fb[1]) for k, (w, c) in ts.items()}  # (wall, cpu) multiples
        row = f"{name:30s} {floor:6.2f} {floor + 1 / 3:6.2f} {x['both'][1]:6.2f} {x['out'][1]:6.2f} {x['gn'][1]:6.2f} {x['sweep'][1]:6.2f}"
        row += f" {x['loop'][1]:7.2f}" if "loop" in x else f" {'-':>7s}"
        row += f" {x['param'][1]:8.2f}" if "param" in x else ""
        diff = float("nan")
        if "h" in ref:
            diff = float(((res[name].h - ref["h"].double()).abs() / ref["h"].double().abs().max()).max())
        sweep_diff = float(((res[name].h - ref["sweep"].double()).abs() / res[name].h.abs().max()).max())
        assert sweep_diff < 1e-3, (name, sweep_diff)   # the two routes measure the same h (float32 here)
        print(row + f"  {diff:.1e}         [{x['both'][0]:.2f}]", flush=True)
    print(f"forward+backward at best: {t_fb[0]:.3f} s wall, {t_fb[1]:.3f} s CPU; floor = matmul-FLOP floor of any "
          "exact HVP for K directions")


if __name__ == "__main__":
    main()
