"""Stage-local forward-over-reverse: exact curvature through a pipeline of stages, no autograd graph spanning them.
Pure: tensors in, tensors out.

A stage is ``fn(params, x) -> y``.  Forward: (y, ẏ) = (fn, ∂fn·(ẋ, ṗ)) stage by stage (:func:`stage_forward_tangent`).
At the loss: (z̄, z̄̇) = (∇_z L_b, ∇²_z L_b ż) (:func:`loss_tangent`).  Backward, stage by stage
(:func:`stage_backward_tangent`, forward-over-reverse of the stage's vjp):

    x̄ = J_xᵀ ȳ,     x̄̇ = J_xᵀ ȳ̇ + (∂²fn[ȳ])·(ẋ, ṗ),     p̄̇ likewise  =  (∇²L · vec D) restricted to p.

Then h_k = ⟨ṗ_k, p̄̇_k⟩ (:func:`tangent_quadratic`) and h^GN_k = hessian_quadratic(z, ż).

Stacked directions (:class:`DirectionSlice`).  Every exact layer l of a stage, with directions D_{l,k} = u_k v_kᵀ,
gets a vector of K_l scalar parameters ε_l (primal value 0): the stage computes W_l x + Σ_k ε_{l,k} D_{l,k} x, i.e.
its output plus Σ_k ε_{l,k} (v_kᵀ a) u_k at the layer's output rows.  Then ∂L/∂ε_{l,k} = ⟨D_{l,k}, ∇_W L⟩ and

    h_{l,k} = ∂²L/∂ε_{l,k}²  = vec(D_{l,k})ᵀ H vec(D_{l,k}),

so the T = Σ_l K_l directions of all exact layers of a stage travel as T one-hot tangents of ε (T × T numbers
instead of T copies of the weights), through the same forward-over-reverse, in one sweep per micro-batch; h is the
diagonal of ε̄̇ (T, T).  The extra primal work is K_l(m+n) per row and layer, against m·n for the layer itself.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from curvdist.math import layers as L
from curvdist.math.forward import second_order_attention
from curvdist.math.losses import loss_terms

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
                           param_tangent: Mapping[str, Tensor] | None, ybar: Tensor, ybar_dot: Tensor, *,
                           input_adjoint: bool = True):
    """Forward-over-reverse through one stage: ``(x̄, x̄̇, p̄̇)``.

    x̄ = J_xᵀ ȳ (*x.shape, None if x is not floating); x̄̇_k = J_xᵀ ȳ̇_k + ∂_ε[J_x(x+εẋ_k, p+εṗ_k)ᵀ] ȳ (K, *x.shape);
    p̄̇ name → (K, *param.shape) for the parameters in ``param_tangent`` (the tangent of their gradient, i.e.
    (H vec D_k) restricted to them when ȳ, ȳ̇ come from the loss).  ``ybar`` (*y.shape) is the adjoint of the stage
    output, ``ybar_dot`` (K, *y.shape) its tangent.  The stage's forward is recomputed (no graph is kept).
    ``input_adjoint=False`` skips (x̄, x̄̇) (returned as None) where nothing upstream needs them.
    """
    pt = dict(param_tangent or {})
    names = list(pt)
    fixed = {k: v for k, v in params.items() if k not in pt}
    dx = input_adjoint and _differentiable(x)   # False: the source stage of a sweep needs no (x̄, x̄̇)

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
    # grad mode on even under a caller's no_grad: the vjp's backward then runs silu_backward & co. differentiably
    # (without it, forward AD of aten::silu_backward is missing: NotImplementedError)
    with second_order_attention(), torch.enable_grad():
        out, out_dot = vmap(lambda *t: jvp(F, primals, t), in_dims=tuple(in_dims), out_dims=(None, 0))(*tangents)
    pbar_dot = {k: t.detach() for k, t in zip(names, out_dot[:len(names)])}
    xbar, xbar_dot = (out[len(names)].detach(), out_dot[len(names)].detach()) if dx else (None, None)
    return xbar, xbar_dot, pbar_dot


def loss_tangent(logits: Tensor, targets: Tensor, loss: str, zdot: Tensor) -> tuple[Tensor, Tensor, int]:
    """At the loss: ``(z̄, z̄̇, N_b)`` with z̄ = ∇_z L_b (*z.shape), z̄̇_k = ∇²_z L_b ż_k (K, *z.shape), L_b the
    micro-batch mean loss.  Scale both by N_b/N when micro-batches are combined."""
    def grad_z(zz):
        return torch.func.grad(lambda q: loss_terms(q, targets, loss)[0])(zz)

    with torch.enable_grad():  # see stage_backward_tangent
        zbar, zbar_dot = vmap(lambda t: jvp(grad_z, (logits.detach(),), (t,)), out_dims=(None, 0))(zdot)
    return zbar, zbar_dot, loss_terms(logits.detach(), targets, loss)[1]


def tangent_quadratic(param_tangent: Mapping[str, Tensor], param_bar_dot: Mapping[str, Tensor]) -> Tensor:
    """h_k = Σ_p ⟨ṗ_k, p̄̇_k⟩ → (K,)."""
    return sum((param_tangent[k] * param_bar_dot[k]).flatten(1).sum(1) for k in param_tangent)


# ------------------------------------------------------------------------------------------------ stacked directions
EPS = "eps::"   # parameter-name prefix of the ε vectors (never a module parameter name)


@dataclass(frozen=True)
class DirectionSlice:
    """The directions one sweep carries: ``entries`` (layer, k) in tangent order (a chunk of a stage's exact
    layers × their K directions); ``layers`` in order of first appearance."""
    entries: tuple[tuple[str, int], ...]

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.entries))

    def ks(self, layer: str) -> list[int]:
        return [k for name, k in self.entries if name == layer]

    def __len__(self) -> int:
        return len(self.entries)


def chunk_directions(counts: Sequence[tuple[str, int]], chunk: int | None) -> list[DirectionSlice]:
    """The (layer, k) of every exact layer (``counts``: (layer, K_l) in order), cut into slices of at most ``chunk``
    tangents (None: one slice)."""
    entries = [(layer, k) for layer, K in counts for k in range(K)]
    if not entries:
        return []
    size = len(entries) if not chunk else max(1, int(chunk))
    return [DirectionSlice(tuple(entries[i:i + size])) for i in range(0, len(entries), size)]


def _eps_output(module: nn.Module, x: Tensor, U: Tensor, V: Tensor, eps: Tensor) -> Tensor:
    """Σ_k ε_k D_k applied to the layer input x, in the output's layout: Σ_k ε_k (v_kᵀ a) u_k."""
    U, V, eps = U.to(x.dtype), V.to(x.dtype), eps.to(x.dtype)
    if isinstance(module, nn.Conv2d):
        return torch.einsum("k,k...->...", eps, L.directional_output(module, x, U, V))
    return ((x @ V.T) * eps) @ U   # (..., K) → (..., m)


class PerturbedStage:
    """``fn(params, x)`` of a stage module whose layers in ``directions`` ({layer: (U (K, m), V (K, n))}) are
    perturbed by ε (module docstring): ``params`` holds the module's parameters to substitute and, for each
    perturbed layer, ``EPS + layer`` → ε (K_l,) — those of :meth:`eps_params`.  Forward hooks add the ε term to
    the layer outputs; they are inert outside :meth:`fn` (the module computes as usual there)."""

    def __init__(self, module: nn.Module, layers: Mapping[str, nn.Module]):
        self.module = module
        self._active: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in layers.items()]

    def _hook(self, name: str):
        def hook(module, args, out):
            got = self._active.get(name)
            return None if got is None else out + _eps_output(module, args[0], *got)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def fn(self, directions: Mapping[str, tuple[Tensor, Tensor]], kwargs: Mapping[str, Any] | None = None) -> StageFn:
        """The stage function for the perturbed ``directions`` ({layer: (U, V)} of one slice); ``kwargs`` go to the
        module's forward (an attention mask)."""
        kwargs = dict(kwargs or {})

        def call(params, x):
            weights = {k: v for k, v in params.items() if not k.startswith(EPS)}
            self._active = {name[len(EPS):]: (*directions[name[len(EPS):]], v)
                            for name, v in params.items() if name.startswith(EPS)}
            try:
                return functional_call(self.module, weights, (x,), kwargs)
            finally:
                self._active = {}
        return call


def eps_params(sl: DirectionSlice, dtype: torch.dtype, device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """ε (zeros) for every layer of the slice and their T one-hot tangents: (params, param_tangent), name → (K_l,)
    and (T, K_l), in :data:`EPS` + layer names."""
    params, tangents, t = {}, {}, 0
    T = len(sl)
    for layer in sl.layers:
        K = len(sl.ks(layer))
        params[EPS + layer] = torch.zeros(K, dtype=dtype, device=device)
        tan = torch.zeros(T, K, dtype=dtype, device=device)
        tan[t:t + K] = torch.eye(K, dtype=dtype, device=device)
        tangents[EPS + layer] = tan
        t += K
    return params, tangents


def slice_directions(sl: DirectionSlice, directions: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, tuple]:
    """The (U, V) rows of the slice's directions, per layer."""
    return {layer: (directions[layer][0][sl.ks(layer)], directions[layer][1][sl.ks(layer)]) for layer in sl.layers}


def eps_quadratic(sl: DirectionSlice, eps_bar_dot: Mapping[str, Tensor]) -> Tensor:
    """h_t = ∂²L/∂ε_t² for every tangent t of the slice (T,): the diagonal of ε̄̇ (T, T) (module docstring)."""
    out, t = [], 0
    for layer in sl.layers:
        K = len(sl.ks(layer))
        block = eps_bar_dot[EPS + layer][t:t + K]          # (K, K): tangents of this layer × its ε
        out.append(torch.diagonal(block))
        t += K
    return torch.cat(out)
