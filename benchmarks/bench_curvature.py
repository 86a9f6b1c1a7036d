"""Cost of exact directional curvature, in multiples of one forward+backward (prints a table; not a test).

Model: transformers GPT2LMHeadModel, 4 blocks, n_embd 384, 6 heads, vocabulary 512, 64 positions, random init,
float32, eager attention; batch 64 × 64 tokens.  For K = 20 directions of three layers (first block attn.c_attn,
a middle layer, last block mlp.c_proj) it times

- ``batched``:     :func:`curvdist.curvature.exact_curvature` (h and h^GN together; one forward, one
                   create_graph backward, one K-batched double backward), and h only / h^GN only;
- ``loop``:        the same forward + create_graph backward, then K separate double backwards (retained graph);
- ``func``:        ``torch.func`` forward-over-reverse (:func:`curvdist.curvature.stage_backward_tangent` style)
                   through the whole model as a single stage (optional: ``--func``);

and the FLOP floor 2·K·(downstream matmul FLOPs) / (3·all matmul FLOPs) of any exact HVP (two products per
downstream linear map per direction — tangent up and tangent adjoint down — against three for forward+backward).

Usage: ``python benchmarks/bench_curvature.py [--threads 2] [--reps 2] [--K 20] [--func]``
"""
from __future__ import annotations

import argparse
import time

import torch

from curvdist import layers as L
from curvdist.curvature import exact_curvature
from curvdist.forward import model_logits, second_order_attention
from curvdist.losses import loss_terms


def build(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_embd=384, n_head=6, n_layer=4, vocab_size=512, n_positions=64, attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).float().eval()
    ids = torch.randint(0, 512, (64, 64))
    targets = torch.cat([ids[:, 1:], torch.full((64, 1), -100)], 1)
    return model, ids, targets


def timeit(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


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


def func_hvps(model, ids, targets, name, module, U, V):
    """torch.func forward-over-reverse over the whole model as one stage (vmap over K tangents of W)."""
    from torch.func import functional_call, grad, jvp, vmap
    pname = next(n for n, p in model.named_parameters() if p is module.weight)
    W = module.weight.detach()
    D = torch.stack([L.matrix_to_weight(module, u[:, None] * v[None, :]) for u, v in zip(U, V)])

    def f(w):
        return loss_terms(model_logits(lambda *a, **k: functional_call(model, {pname: w}, a, k), ids),
                          targets, "cross_entropy")[0]

    with second_order_attention():
        _, hd = vmap(lambda d: jvp(grad(f), (W,), (d,)), out_dims=(None, 0))(D)
    return (hd * D).flatten(1).sum(1)


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--func", action="store_true", help="also time torch.func forward-over-reverse")
    ap.add_argument("--no-loop", action="store_true", help="skip the K-separate-double-backwards reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, ids, targets = build()
    K = args.K
    t_fb = timeit(lambda: fwd_bwd(model, ids, targets), args.reps)
    print(f"GPT-2 4×384, vocab 512, batch 64×64 tokens, float32, {args.threads} threads, K={K}")
    print(f"one forward+backward: {t_fb:.3f} s (= 1.00)")
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
    hdr = f"{'layer':34s} {'floor':>6s} {'h+GN':>6s} {'h':>6s} {'GN':>6s} {'loop h':>7s}"
    if args.func:
        hdr += f" {'func h':>7s}"
    print(hdr + "   max rel diff batched vs loop")
    for name in names:
        mod = mods[name]
        m, n = L.shape(mod)
        U = torch.randn(K, m, generator=g)
        V = torch.randn(K, n, generator=g)
        U, V = U / U.norm(dim=1, keepdim=True), V / V.norm(dim=1, keepdim=True)
        dirs, lay = {name: (U, V)}, {name: mod}
        data = [(ids, targets)]
        floor = 2 * K * downstream_fraction(flops, name, order) / 3
        res = {}
        t_both = timeit(lambda: res.update(r=exact_curvature(model, data, "cross_entropy", dirs, layers=lay)), 1)
        t_h = timeit(lambda: exact_curvature(model, data, "cross_entropy", dirs, layers=lay, gn=False), 1)
        t_gn = timeit(lambda: exact_curvature(model, data, "cross_entropy", dirs, layers=lay, hessian=False), 1)
        row = f"{name:34s} {floor:6.2f} {t_both / t_fb:6.2f} {t_h / t_fb:6.2f} {t_gn / t_fb:6.2f}"
        diff = float("nan")
        if not args.no_loop:
            ref = {}
            t_loop = timeit(lambda: ref.update(h=loop_hvps(model, ids, targets, mod, U, V)), 0 if False else 1)
            diff = float(((res["r"][name].h - ref["h"].double()).abs() / ref["h"].double().abs().max()).max())
            row += f" {t_loop / t_fb:7.2f}"
        else:
            row += f" {'-':>7s}"
        if args.func:
            t_func = timeit(lambda: func_hvps(model, ids, targets, name, mod, U, V), 1)
            row += f" {t_func / t_fb:7.2f}"
        print(row + f"   {diff:.1e}", flush=True)
    print("floor: 2·K·(matmul FLOPs downstream of the layer)/(3·all matmul FLOPs); h+GN: both from one batched pass")


if __name__ == "__main__":
    main()
