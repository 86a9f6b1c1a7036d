"""Exact directional curvature of a layer's weight along rank-one directions.  Pure: tensors in, tensors out.

For a layer W (m × n) with output s_i = W a_i at its rows i, and directions D_k = u_k v_kᵀ (k = 1..K):

    h_k    = vec(D_k)ᵀ ∇²_W L vec(D_k)                         (exact Hessian of the mean loss L)
    h^GN_k = vec(D_k)ᵀ Jᵀ H_ℓ J vec(D_k) = ż_kᵀ H_ℓ ż_k          (exact Gauss–Newton; J = ∂z/∂W, ż_k = J vec(D_k))

with L = (1/N) Σ_t ℓ_t over every loss term of every micro-batch.  A micro-batch b with N_b terms and mean loss L_b
contributes (N_b/N)·h_b.  Since s is linear in W and a does not depend on W, the output tangent along D_k is
ṡ_{k,i} = (v_kᵀ a_i) u_k (:func:`curvdist.layers.directional_output`), s̈ = 0, and so

    h_k = ṡ_kᵀ ∇²_s L ṡ_k ,                                   ∇²_s L: the Hessian w.r.t. the layer output only,

which involves the network *downstream* of the layer only.

Method of :func:`exact_curvature` (reverse-over-reverse from the layer outputs, batched over K)
------------------------------------------------------------------------------------------------
Per micro-batch, one forward with hooks keeps every analysed layer's output s_l (parameters are switched to
``requires_grad=False`` for that forward, so no weight-gradient graph is built), then

    z̄   = ∂L_b/∂z                               (create_graph: z̄ depends on z, which carries ∇²ℓ)
    g_l = J_lᵀ z̄ = ∂L_b/∂s_l  for all layers     (ONE create_graph backward shared by all layers)
    per layer, one batched double backward      autograd.grad(g_l, (s_l, z̄), grad_outputs=ṡ, is_grads_batched=True)
          ∂⟨g_l, ṡ⟩/∂s_l = ∇²_s L_b ṡ  →  h = ⟨ṡ, ∇²_s L_b ṡ⟩
          ∂⟨g_l, ṡ⟩/∂z̄   = J_l ṡ = ż    →  h^GN = hessian_quadratic(z, ż)

so both h and h^GN come from the same K-batched pass (ż is an intermediate of the double backward anyway).
Why this one: its cost per direction is the floor of any exact HVP — two matrix products per downstream linear
map (the tangent J ṡ going up and the tangent adjoint going down) against three per linear map for one
forward+backward — and it touches only the layer's downstream part, so late layers are cheap.  The forward and
the first backward are shared by all layers and all K.  The alternatives measured on the benchmark model
(``benchmarks/bench_curvature.py``): K separate double backwards do the same FLOPs in K small passes (no GEMM
batching, K× the per-op overhead); ``torch.func`` forward-over-reverse (jvp of vjp under vmap, as in
:func:`stage_backward_tangent`) does the same FLOPs again but recomputes the upstream forward per layer and
forms the (K, m, n) tangent of ∇_W L.  Forward-over-forward (nested jvp) costs three tangent products per
linear map.  When only h^GN is asked for, the double backward is taken w.r.t. z̄ alone, which runs only the
tangent-forward half (one product per downstream linear map).

Stage-local building blocks (pipeline, no autograd graph across processes)
---------------------------------------------------------------------------
A stage is ``fn(params, x) -> y``.  Forward: (y, ẏ) = (fn, ∂fn·(ẋ, ṗ)) stage by stage (:func:`stage_forward_tangent`).
At the loss: (z̄, z̄̇) = (∇_z L_b, ∇²_z L_b ż) (:func:`loss_tangent`).  Backward, stage by stage
(:func:`stage_backward_tangent`, forward-over-reverse of the stage's vjp):

    x̄ = J_xᵀ ȳ,     x̄̇ = J_xᵀ ȳ̇ + (∂²fn[ȳ])·(ẋ, ṗ),     p̄̇ likewise  =  (∇²L · vec D) restricted to p.

Then h_k = ⟨ṗ_k, p̄̇_k⟩ (:func:`tangent_quadratic`) and h^GN_k = hessian_quadratic(z, ż).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from . import layers as L
from .forward import model_logits, second_order_attention, to_device
from .losses import hessian_quadratic, loss_terms


@dataclass
class Curvature:
    """Per-layer result: ``h`` (K,) exact Hessian quotients, ``h_gn`` (K,) Gauss–Newton quotients (None if not asked)."""

    h: Tensor | None
    h_gn: Tensor | None


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(iter(model.parameters()))
    return p.dtype, p.device


def _check_directions(directions, layers) -> None:
    for name, (U, V) in directions.items():
        if name not in layers:
            raise KeyError(f"direction for {name!r} but no such entry in layers")
        m, n = L.shape(layers[name])
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != m or V.shape[1] != n or U.shape[0] != V.shape[0]:
            raise ValueError(f"{name}: need U (K, {m}) and V (K, {n}), got {tuple(U.shape)} and {tuple(V.shape)}")


def exact_curvature(model: nn.Module, data: Iterable, loss: str,
                    directions: Mapping[str, tuple[Tensor, Tensor]], *, layers: Mapping[str, nn.Module],
                    hessian: bool = True, gn: bool = True, chunk_size: int | None = None,
                    method: str = "auto") -> dict[str, Curvature]:
    """Exact h_k and h^GN_k of every layer in ``directions`` (name → (U (K, m), V (K, n))), over all micro-batches.

    ``data``: iterable of ``(inputs, targets)`` micro-batches (see :mod:`curvdist.forward`); floating inputs are
    cast to the model's dtype and everything is computed in that dtype.  ``chunk_size`` bounds how many directions
    go through one batched pass (memory ∝ chunk_size × downstream activations); None = all K at once.
    ``method``: ``"output"`` (hooks + batched double backward from the layer outputs, see the module docstring),
    ``"param"`` (``torch.func`` forward-over-reverse on the weight itself, one extra forward per layer), or
    ``"auto"``: output, except for a layer whose weight is shared with another module (tied) or whose module is
    called more than once in a forward — there the input of one call may depend on W, so s is not linear in W
    and only the param route is exact.  The model is evaluated in its current mode (``model.eval()`` switches
    dropout off).  Returns name → :class:`Curvature` with float64 CPU tensors (K,).
    """
    if not (hessian or gn):
        raise ValueError("nothing to compute: hessian=False and gn=False")
    if method not in ("auto", "output", "param"):
        raise ValueError(f"method={method!r}: choose auto, output or param")
    _check_directions(directions, layers)
    dtype, device = _model_dtype_device(model)
    names = list(directions)
    dirs = {k: (U.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype)) for k, (U, V) in directions.items()}
    acc_h = {k: torch.zeros(U.shape[0], dtype=torch.float64) for k, (U, _) in dirs.items()}
    acc_gn = {k: torch.zeros(U.shape[0], dtype=torch.float64) for k, (U, _) in dirs.items()}
    pnames = {k: _weight_names(model, layers[k]) for k in names}
    if method == "output" and any(len(v) > 1 for v in pnames.values()):
        raise ValueError("a layer's weight is tied to another module; use method='param' or 'auto'")
    param_path = {k for k in names if method == "param" or len(pnames[k]) > 1}
    n_total = 0

    captured: dict[str, list[tuple[Tensor, Tensor]]] = {k: [] for k in names}
    active = [False]

    def make_hook(name):
        def hook(module, args, out):
            if not active[0]:
                return None
            if not out.requires_grad:  # nothing upstream needs grad: make s a leaf of the graph
                out = out.detach().requires_grad_()
            captured[name].append((args[0].detach(), out))  # (layer input a, layer output s)
            return out
        return hook

    def add(name, nb, hb, gnb):
        if hb is not None:
            acc_h[name] += nb * hb.detach().double().cpu()
        if gnb is not None:
            acc_gn[name] += nb * gnb.detach().double().cpu()

    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        handles = [layers[k].register_forward_hook(make_hook(k)) for k in names if k not in param_path]
        for inputs, targets in data:
            inputs = to_device(inputs, device, dtype)
            targets = to_device(targets, device)
            nb = None
            todo = [k for k in names if k in param_path]
            if handles:
                nb, reused = _output_path(model, inputs, targets, loss, names, param_path, captured, active, layers,
                                          dirs, hessian, gn, chunk_size, add)
                if reused and method == "output":
                    raise ValueError(f"{reused} called more than once per forward; use method='param' or 'auto'")
                todo += reused
            for k in todo:
                hb, gnb, nb = _param_pass(model, inputs, targets, loss, layers[k], pnames[k][0], *dirs[k], hessian,
                                          gn, chunk_size)
                add(k, nb, hb, gnb)
            n_total += nb
    finally:
        active[0] = False
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for v in captured.values():
            v.clear()
    if n_total == 0:
        raise ValueError("data yielded no micro-batches")
    return {k: Curvature(acc_h[k] / n_total if hessian else None, acc_gn[k] / n_total if gn else None)
            for k in names}


def _weight_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Every name under which the module's weight is registered in the model (more than one: tied)."""
    out = [n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight]
    if not out:
        raise ValueError("the layer's weight is not a parameter of the model")
    return out


def _output_path(model, inputs, targets, loss, names, param_path, captured, active, layers, dirs, hessian, gn,
                 chunk_size, add):
    """One hooked forward, one create_graph backward, then per layer one K-batched double backward."""
    for v in captured.values():
        v.clear()
    active[0] = True
    try:
        with second_order_attention(), torch.enable_grad():
            z = model_logits(model, inputs)  # (*, C)
    finally:
        active[0] = False
    reused = [k for k in names if k not in param_path and len(captured[k]) > 1]
    out_names = [k for k in names if k not in param_path and k not in reused]
    with second_order_attention(), torch.enable_grad():
        Lb, nb, _ = loss_terms(z, targets, loss)
        if hessian:
            (zbar,) = torch.autograd.grad(Lb, z, create_graph=True)  # depends on z: carries ∇²ℓ
        else:  # GN only: z̄ a leaf, g = J_lᵀ z̄ is linear in it
            (zbar,) = torch.autograd.grad(Lb, z, retain_graph=True)
            zbar = zbar.detach().requires_grad_()
        uses = [(k, x, s) for k in out_names for (x, s) in captured[k]]
        if any(not captured[k] for k in out_names):
            missing = [k for k in out_names if not captured[k]]
            raise RuntimeError(f"layers {missing} were not called by the model's forward")
        if uses:
            gs = torch.autograd.grad(z, [s for _, _, s in uses], grad_outputs=zbar, create_graph=True,
                                     allow_unused=True)  # g_l = ∂L_b/∂s_l for every layer at once
            for i, (name, x, s) in enumerate(uses):
                hb, gnb = _layer_pass(layers[name], x, s, gs[i], zbar, z, targets, loss, *dirs[name], hessian, gn,
                                      chunk_size)
                add(name, nb, hb, gnb)
    for v in captured.values():
        v.clear()
    return nb, reused


def _param_pass(model, inputs, targets, loss, module, pname, U, V, hessian, gn, chunk_size):
    """torch.func forward-over-reverse on the weight: (H vec D_k, ż_k) = jvp(∇_W L_b, z)(W; D_k), batched over K."""
    W = module.weight.detach()
    D = layer_param_tangent(module, U, V)  # (K, *W.shape)

    def grad_and_logits(w):
        def f(w):
            z = model_logits(lambda *a, **kw: functional_call(model, {pname: w}, a, kw), inputs)
            return loss_terms(z, targets, loss)[0], z
        return torch.func.grad(f, has_aux=True)(w)  # (∇_W L_b, z)

    step = D.shape[0] if chunk_size is None else max(1, int(chunk_size))
    hs, gns = [], []
    with second_order_attention(), torch.no_grad():
        for a in range(0, D.shape[0], step):
            Dc = D[a:a + step]
            (_, z), (gdot, zdot) = vmap(lambda d: jvp(grad_and_logits, (W,), (d,)), out_dims=(None, 0))(Dc)
            if hessian:
                hs.append((gdot * Dc).flatten(1).sum(1))  # ⟨D_k, H vec D_k⟩
            if gn:
                gns.append(hessian_quadratic(z, targets, loss, zdot))
    nb = loss_terms(z.detach(), targets, loss)[1]
    return (torch.cat(hs) if hessian else None), (torch.cat(gns) if gn else None), nb


def _layer_pass(module, x, s, g, zbar, z, targets, loss, U, V, hessian, gn, chunk_size):
    """Per micro-batch h_b (K,) and h^GN_b (K,) of one layer from its input x, output s and error g = ∂L_b/∂s."""
    K = U.shape[0]
    if g is None or not g.requires_grad:  # the layer does not influence the loss here
        zero = torch.zeros(K, dtype=z.dtype, device=z.device)
        return (zero if hessian else None), (zero if gn else None)
    step = K if chunk_size is None else max(1, int(chunk_size))
    out_h, out_gn = [], []
    for a in range(0, K, step):
        sdot = L.directional_output(module, x, U[a:a + step], V[a:a + step])  # (k, *s.shape)
        res = torch.autograd.grad(g, ([s] if hessian else []) + ([zbar] if gn else []), grad_outputs=sdot,
                                  retain_graph=True, is_grads_batched=True, allow_unused=True)
        if hessian:  # ⟨ṡ, ∇²_s L ṡ⟩
            out_h.append((sdot * res[0]).flatten(1).sum(1) if res[0] is not None
                         else torch.zeros(sdot.shape[0], dtype=z.dtype, device=z.device))
        if gn:
            zdot = res[-1]  # (k, *z.shape) = J ṡ
            if zdot is None:
                zdot = torch.zeros((sdot.shape[0], *z.shape), dtype=z.dtype, device=z.device)
            out_gn.append(hessian_quadratic(z.detach(), targets, loss, zdot))
    return (torch.cat(out_h) if hessian else None), (torch.cat(out_gn) if gn else None)


# ----------------------------------------------------------------------------------------------------------------
# Stage-local forward-over-reverse (pipeline-friendly: tensors in, tensors out, no graph kept between calls)
# ----------------------------------------------------------------------------------------------------------------

StageFn = Callable[[dict, Any], Tensor]


def module_stage(module: nn.Module) -> StageFn:
    """``fn(params, x) = module(x)`` with the named parameters in ``params`` substituted (others: the module's)."""
    return lambda params, x: functional_call(module, params, (x,))


def layer_param_tangent(module: nn.Module, U: Tensor, V: Tensor) -> Tensor:
    """(K, *module.weight.shape): the directions u_k v_kᵀ in the weight's own layout."""
    D = U[:, :, None] * V[:, None, :]  # (K, m, n)
    return torch.stack([L.matrix_to_weight(module, d) for d in D])


def _differentiable(x) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def stage_forward_tangent(fn: StageFn, params: Mapping[str, Tensor], x, xdot: Tensor | None = None,
                          param_tangent: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(y, ẏ)`` with y = fn(params, x) and ẏ_k = J_x ẋ_k + Σ_p J_p ṗ_k for K tangents.

    ``xdot`` (K, *x.shape) or None (x held fixed, e.g. token ids); ``param_tangent`` name → (K, *param.shape) for the
    perturbed parameters (others fixed).  Returns y (*y.shape) and ẏ (K, *y.shape).
    """
    pt = dict(param_tangent or {})
    if xdot is None and not pt:
        raise ValueError("no tangent given: pass xdot and/or param_tangent")
    names = list(pt)
    fixed = {k: v for k, v in params.items() if k not in pt}
    primals = tuple(params[k] for k in names) + ((x,) if xdot is not None else ())

    def f(*args):
        p = dict(zip(names, args[:len(names)]))
        return fn({**fixed, **p}, args[len(names)] if xdot is not None else x)

    tangents = tuple(pt[k] for k in names) + ((xdot,) if xdot is not None else ())
    with second_order_attention(), torch.no_grad():  # torch.func transforms ignore the outer no_grad
        y, ydot = vmap(lambda *t: jvp(f, primals, t), out_dims=(None, 0))(*tangents)
    return y, ydot


def stage_backward_tangent(fn: StageFn, params: Mapping[str, Tensor], x, xdot: Tensor | None,
                           param_tangent: Mapping[str, Tensor] | None, ybar: Tensor, ybar_dot: Tensor):
    """Forward-over-reverse through one stage: ``(x̄, x̄̇, p̄̇)``.

    x̄ = J_xᵀ ȳ (*x.shape, None if x is not floating); x̄̇_k = J_xᵀ ȳ̇_k + ∂_ε[J_x(x+εẋ_k, p+εṗ_k)ᵀ] ȳ (K, *x.shape);
    p̄̇ name → (K, *param.shape) for the parameters in ``param_tangent`` (the tangent of their gradient, i.e.
    (H vec D_k) restricted to them when ȳ, ȳ̇ come from the loss).  ``ybar`` (*y.shape) is the adjoint of the stage
    output, ``ybar_dot`` (K, *y.shape) its tangent.  The stage's forward is recomputed (no graph is kept).
    """
    pt = dict(param_tangent or {})
    names = list(pt)
    fixed = {k: v for k, v in params.items() if k not in pt}
    dx = _differentiable(x)

    def F(*args):  # (p_1..p_r, [x], ȳ) -> (p̄_1..p̄_r, [x̄])
        p = args[:len(names)]
        xx = args[len(names)] if dx else x
        yb = args[-1]

        def g(*a):
            return fn({**fixed, **dict(zip(names, a[:len(names)]))}, a[len(names)] if dx else x)

        _, pull = vjp(g, *p, *((xx,) if dx else ()))
        return pull(yb)

    primals = tuple(params[k] for k in names) + ((x,) if dx else ()) + (ybar,)
    tangents = tuple(pt[k] for k in names)
    in_dims = [0] * len(names)
    if dx:
        tangents += (xdot if xdot is not None else torch.zeros_like(x),)
        in_dims.append(0 if xdot is not None else None)
    tangents += (ybar_dot,)
    in_dims.append(0)
    with second_order_attention(), torch.no_grad():
        out, out_dot = vmap(lambda *t: jvp(F, primals, t), in_dims=tuple(in_dims), out_dims=(None, 0))(*tangents)
    pbar_dot = dict(zip(names, out_dot[:len(names)]))
    xbar, xbar_dot = (out[len(names)], out_dot[len(names)]) if dx else (None, None)
    return xbar, xbar_dot, pbar_dot


def loss_tangent(logits: Tensor, targets: Tensor, loss: str, zdot: Tensor) -> tuple[Tensor, Tensor, int]:
    """At the loss: ``(z̄, z̄̇, N_b)`` with z̄ = ∇_z L_b (*z.shape), z̄̇_k = ∇²_z L_b ż_k (K, *z.shape), L_b the
    micro-batch mean loss.  Scale both by N_b/N when micro-batches are combined."""
    def grad_z(zz):
        return torch.func.grad(lambda q: loss_terms(q, targets, loss)[0])(zz)

    with torch.no_grad():
        zbar, zbar_dot = vmap(lambda t: jvp(grad_z, (logits,), (t,)), out_dims=(None, 0))(zdot)
    return zbar, zbar_dot, loss_terms(logits.detach(), targets, loss)[1]


def tangent_quadratic(param_tangent: Mapping[str, Tensor], param_bar_dot: Mapping[str, Tensor]) -> Tensor:
    """h_k = Σ_p ⟨ṗ_k, p̄̇_k⟩ → (K,)."""
    return sum((param_tangent[k] * param_bar_dot[k]).flatten(1).sum(1) for k in param_tangent)
