"""Exact directional curvature of a layer's weight along rank-one directions.  Pure: tensors in, tensors out.

For a layer W (m × n) with output s_i = W a_i at its rows i, and directions D_k = u_k v_kᵀ (k = 1..K):

    h_k    = vec(D_k)ᵀ ∇²_W L vec(D_k)                         (exact Hessian of the mean loss L)
    h^GN_k = vec(D_k)ᵀ Jᵀ H_ℓ J vec(D_k) = ż_kᵀ H_ℓ ż_k          (exact Gauss–Newton; J = ∂z/∂W, ż_k = J vec(D_k))

with L = (1/N) Σ_t ℓ_t over every loss term of every micro-batch.  A micro-batch b with N_b terms and mean loss L_b
contributes (N_b/N)·h_b.  Since s is linear in W and a does not depend on W, the output tangent along D_k is
ṡ_{k,i} = (v_kᵀ a_i) u_k (:func:`curvdist.math.layers.directional_output`), s̈ = 0, and so

    h_k = ṡ_kᵀ ∇²_s L ṡ_k ,                                   ∇²_s L: the Hessian w.r.t. the layer output only,

which involves the network *downstream* of the layer only.

``method="taylor"``: Taylor mode (second-order forward, :mod:`curvdist.math.jet`), the pipeline's route
-------------------------------------------------------------------------------------------------------
Every direction of every layer is a row of a jet seeded at its layer's output (ṡ_t = D_t a, s̈_t = 0); the model's
own forward on the jet gives (z, ż, z̈) and h_t = ⟨∇_z L_b, z̈_t⟩ + ż_tᵀ∇²_z L_b ż_t, h^GN_t = ż_tᵀ∇²_z L_b ż_t
(:mod:`curvdist.math.stage_tangents`, the same code as a pipeline stage's sweep).  Two products per downstream
linear map and direction, no adjoint, nothing kept; rows of late layers cost nothing upstream of them, so a jet
takes as many rows as :data:`curvdist.math.stage_tangents.JET_BUDGET` allows for the widest activation after its first layer.  Each jet
recomputes the plain forward, which the method below shares.  Measured in ``benchmarks/bench_curvature.py``
(docs/design.md, "Exact pass").

Every route reports h and h^GN as exactly 0 within c·ε of the magnitude of the sums at the loss (a softmax null
direction, ż ∝ 1, whose h is 0 but computes as rounding of either sign: :func:`curvdist.math.stage_tangents.loss_jet`;
the two routes below, which have ż but not z̈ apart, by :func:`curvdist.math.losses.gn_and_rounded`).

Default (``auto``): reverse-over-reverse from the layer outputs, batched over K
------------------------------------------------------------------------------
Not Taylor mode by default in process: measured on SmolLM2-135M (49152-word head, 4 × 64 tokens, K = 10, one
thread; ``benchmarks/bench_exact_routes.py``), the 7 layers of block 20 took 179 s by the jets against 115 s by the
double backward, those of the last block 83 s against 48 s, and ``make run``'s exact pass 623 s against 342–358 s;
only on the small-vocabulary GPT-2 of ``benchmarks/bench_curvature.py`` are the jets faster (0.85–0.94 of the
double backward's time).
Per micro-batch, one forward with hooks keeps every analysed layer's output s_l (parameters are switched to
``requires_grad=False`` for that forward, so no weight-gradient graph is built), then

    z̄   = ∂L_b/∂z                               (create_graph: z̄ depends on z, which carries ∇²ℓ)
    g_l = J_lᵀ z̄ = ∂L_b/∂s_l  for all layers     (ONE create_graph backward shared by all layers)
    per layer, one batched double backward      autograd.grad(g_l, (s_l, z̄), grad_outputs=ṡ, is_grads_batched=True)
          ∂⟨g_l, ṡ⟩/∂s_l = ∇²_s L_b ṡ  →  h = ⟨ṡ, ∇²_s L_b ṡ⟩
          ∂⟨g_l, ṡ⟩/∂z̄   = J_l ṡ = ż    →  h^GN = hessian_quadratic(z, ż)

so both h and h^GN come from the same pass (ż is an intermediate of the double backward anyway; asking for
h^GN on top of h is free), and h^GN alone is a double backward w.r.t. z̄ only, which runs only the tangent-up
half (one product per downstream linear map).

It does two matrix products per downstream linear map per direction (the tangent J ṡ going up, the tangent
adjoint going down), as Taylor mode does, and shares the forward and the first backward across all layers and
directions, but its double backward's elementwise work (GELU, LayerNorm, softmax second derivatives) is heavier
than the jets' closed forms.  Measured on the benchmark before Taylor mode (4×384 GPT-2, 64×64 tokens, fp32, 2 CPU threads, K = 20; multiples
of one forward+backward in CPU time; see ``benchmarks/bench_curvature.py``): h and h^GN together for the first
block's c_attn 18 (matmul floor 12.5), middle c_attn 9.8 (6.1), middle c_fc 8.0 (4.7), last c_proj 1.0 (0.35);
h^GN alone 9.6 / 4.9 / 4.1 / 0.8; K separate double backwards (h only) 21 / 10 / 8.9 / 1.0; ``torch.func``
forward-over-reverse on the weight (``method="param"``, h only) 51 / 31 / 27 / 11 (it recomputes the upstream
forward, forms the (K, m, n) tangent of ∇_W L and pays functorch's per-op cost);
forward mode for h^GN alone was ~1.4× the double backward w.r.t. z̄; forward-over-forward (nested jvp) costs
three tangent products per linear map (Taylor mode, which carries ẋ and ẍ together, two).  On the CPU, batching the K
directions does not pay (same bytes per direction, and large blocks are mapped and zero-filled anew), so the
default chunk keeps the batched tangent small there (:data:`CHUNK_BUDGET`) and a single direction takes a plain
double backward; on a GPU the K directions go through ``is_grads_batched`` together.

A module called more than once per forward (weight reuse) breaks s̈ = 0 when one call's input depends on W
through another call; such a layer goes through ``method="param"``: ``torch.func`` forward-over-reverse on the
weight itself, (H vec D_k, ż_k) = jvp(∇_W L_b, z)(W; D_k), vmapped over K (exact in every case, slower).

The pipeline's route (no autograd graph across processes): Taylor mode, :mod:`curvdist.math.stage_tangents`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from curvdist.math import noise, subsample
from curvdist.math import layers as L
from curvdist.math.forward import batch_size, first_rows, model_logits, second_order_attention, to_device
from curvdist.math.losses import gn_and_rounded, loss_terms
from curvdist.math.stage_tangents import (
    BlockReplay,
    HeadSplit,
    Perturbation,
    jet_slices,
    layer_param_tangent,
    loss_jet,
    stage_jet,
    widest_after,
)


@dataclass
class Curvature:
    """Per-layer result: ``h`` (K,) exact Hessian quotients, ``h_gn`` (K,) Gauss–Newton quotients (None if not asked),
    ``h_half`` (2, K): h of the micro-batches of each half (:func:`curvdist.math.noise.half_of`), each over its own
    loss terms (None when a half is empty or h was not asked).  ``moments``: the additive per-micro-batch sums
    (:class:`curvdist.math.subsample.ExactMoments`) and ``population`` the micro-batches of the whole batch, from
    which :attr:`subset` gives the standard errors of h and h^GN as estimates of the full-batch values."""

    h: Tensor | None
    h_gn: Tensor | None
    h_half: Tensor | None = None
    moments: subsample.ExactMoments | None = None
    population: int | None = None

    @property
    def subset(self) -> subsample.SubsetEstimate | None:
        if self.moments is None or self.population is None:
            return None
        return subsample.estimate(self.moments, self.population)


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
                    method: str = "auto", keys: Iterable | None = None,
                    population: int | None = None) -> dict[str, Curvature]:
    """Exact h_k and h^GN_k of every layer in ``directions`` (name → (U (K, m), V (K, n))), over all micro-batches.

    ``data``: iterable of ``(inputs, targets)`` micro-batches (see :mod:`curvdist.math.forward`); floating inputs are
    cast to the model's dtype and everything is computed in that dtype.  ``chunk_size`` bounds how many directions
    go through one batched pass (memory ∝ chunk_size × downstream activations); None: as many as keep the batched
    layer-output tangent within :data:`CHUNK_BUDGET` elements (all K for small layers; ``method="output"``) or by
    :data:`curvdist.math.stage_tangents.JET_BUDGET` (taylor).
    ``method``: ``"taylor"`` (jets: second-order forward mode, see the module docstring), ``"output"`` (hooks +
    batched double backward from the layer outputs), ``"param"`` (``torch.func`` forward-over-reverse on the
    weight itself, one extra forward per layer), or ``"auto"``: output (module docstring: measured faster in process
    than the jets on a real model), except for a layer whose module is called more than once in a forward — there
    the input of one call may depend on W, so s is not linear in W and only the param route is exact.  Every route
    reports a value within the rounding of its sums at the loss as exactly 0 (module docstring).  A weight tied to
    another module (GPT-2's lm_head and wte) is measured in its use by THIS module on the output route, as G and
    the Kronecker factors are; ``method="param"`` gives the Hessian w.r.t. the shared tensor instead (all uses).
    The model is evaluated in its current mode (``model.eval()`` switches dropout off).  ``keys``: the micro-batch
    keys of ``data`` (default 0, 1, 2, … in order), which decide the half of each micro-batch for ``h_half``.
    ``population``: the micro-batches of the whole evaluation batch when ``data`` is a sample of them (default:
    as many as ``data`` holds), for the standard errors (:mod:`curvdist.math.subsample`).
    Returns name → :class:`Curvature` with float64 CPU tensors (K,).
    """
    if not (hessian or gn):
        raise ValueError("nothing to compute: hessian=False and gn=False")
    if method not in ("auto", "taylor", "output", "param"):
        raise ValueError(f"method={method!r}: choose auto, taylor, output or param")
    _check_directions(directions, layers)
    dtype, device = _model_dtype_device(model)
    names = list(directions)
    dirs = {k: (U.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype)) for k, (U, V) in directions.items()}
    acc_h = {k: torch.zeros(U.shape[0], dtype=torch.float64) for k, (U, _) in dirs.items()}
    acc_gn = {k: torch.zeros(U.shape[0], dtype=torch.float64) for k, (U, _) in dirs.items()}
    acc_half = {k: torch.zeros(2, U.shape[0], dtype=torch.float64) for k, (U, _) in dirs.items()}
    n_half, half = [0, 0], [0]
    mom = {k: subsample.ExactMoments.zeros(U.shape[0]) for k, (U, _) in dirs.items()}
    cur: dict[str, list] = {}     # this micro-batch's (h_b, h^GN_b) per layer
    keys = None if keys is None else list(keys)
    pnames = {k: _weight_names(model, layers[k]) for k in names}
    # A weight tied to another module (GPT-2's lm_head and wte) is measured in its use by THIS module, as G and the
    # Kronecker factors are (and as a pipeline stage, which holds its own copy, must): the output path.
    param_path = {k for k in names if method == "param"}
    jet_plan: dict = {}   # the Taylor route's slices, cut on the first micro-batch
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
        cur[name] = [hb, gnb]
        if hb is not None:
            acc_h[name] += nb * hb.detach().double().cpu()
            acc_half[name][half[0]] += nb * hb.detach().double().cpu()
        if gnb is not None:
            acc_gn[name] += nb * gnb.detach().double().cpu()

    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        handles = [layers[k].register_forward_hook(make_hook(k)) for k in names if k not in param_path]
        for b, (inputs, targets) in enumerate(data):
            half[0] = noise.half_of(b if keys is None else keys[b])
            inputs = to_device(inputs, device, dtype)
            targets = to_device(targets, device)
            nb = None
            todo = [k for k in names if k in param_path]
            if handles:
                if method == "taylor":
                    nb, reused = _taylor_path(model, inputs, targets, loss, [k for k in names if k not in param_path],
                                              layers, dirs, hessian, chunk_size, add, gn, jet_plan)
                else:
                    nb, reused = _output_path(model, inputs, targets, loss, names, param_path, captured, active,
                                              layers, dirs, hessian, gn, chunk_size, add)
                if reused and method in ("output", "taylor"):
                    raise ValueError(f"{reused} called more than once per forward; use method='param' or 'auto'")
                todo += reused
            for k in todo:
                hb, gnb, nb = _param_pass(model, inputs, targets, loss, layers[k], pnames[k][0], *dirs[k], hessian,
                                          gn, chunk_size)
                add(k, nb, hb, gnb)
            n_total += nb
            n_half[half[0]] += nb
            for k in names:
                hb, gnb = cur.pop(k, (None, None))
                mom[k] = mom[k] + subsample.ExactMoments.of_unit(nb, hb, gnb, dirs[k][0].shape[0])
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
    units = int(round(next(iter(mom.values())).units)) if mom else 0
    if population is not None and population < units:
        raise ValueError(f"population={population} is smaller than the {units} micro-batches measured")
    return {k: Curvature(acc_h[k] / n_total if hessian else None, acc_gn[k] / n_total if gn else None,
                         noise.half_means(acc_half[k], n_half) if hessian else None, mom[k],
                         units if population is None else population) for k in names}


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


def _taylor_path(model, inputs, targets, loss, names, layers, dirs, hessian, chunk_size, add, gn, plan):
    """Every direction of every layer as rows of jets (by :data:`curvdist.math.stage_tangents.JET_BUDGET` from
    the first micro-batch's activations, at most ``chunk_size``; kept in ``plan``), the model's forward in Taylor
    mode, h and h^GN at the loss (:mod:`curvdist.math.stage_tangents`).  Returns (N_b, layers called more than
    once: their rows are void, they go to the param route)."""
    counts = [(k, dirs[k][0].shape[0]) for k in names]
    if "slices" not in plan:
        device = next(iter(model.parameters())).device
        B = batch_size(inputs)    # one sequence's forward, scaled: every activation grows with the batch
        widest = widest_after(model, lambda: model_logits(model, first_rows(inputs, 1, B)),
                              {k: layers[k] for k in names}, scale=B)
        plan["slices"] = jet_slices(counts, widest, device, cap=chunk_size)
    slices = plan["slices"]
    h = {k: torch.zeros(K, dtype=torch.float64) for k, K in counts}
    h_gn = {k: torch.zeros(K, dtype=torch.float64) for k, K in counts}
    calls: dict[str, int] = {}
    pert = Perturbation({k: layers[k] for k in names})
    replay, head = BlockReplay(model, pert), HeadSplit(model)
    nb = None
    try:
        for sl in slices:
            with pert.of(sl, dirs):
                z, zd, zdd = stage_jet(model, inputs, T=len(sl), call=model_logits, head=head, pert=pert,
                                       replay=replay)
            for k in sl.layers:
                calls[k] = max(calls.get(k, 0), pert.calls.get(k, 0))
            hb, gnb, nb = loss_jet(z, zd, zdd, targets, loss, len(sl), hessian=hessian, head=head.term())
            hb = None if hb is None else hb.double().cpu()   # one copy to the host, not one sync per direction
            gnb = gnb.double().cpu()
            for t, (k, i) in enumerate(sl.entries):
                if hessian:
                    h[k][i] = hb[t]
                h_gn[k][i] = gnb[t]
    finally:
        replay.close()
        head.close()
        pert.close()
    missing = [k for k in names if not calls.get(k)]
    if missing:
        raise RuntimeError(f"layers {missing} were not called by the model's forward")
    reused = [k for k in names if calls[k] > 1]
    for k in names:
        if k not in reused:
            add(k, nb, h[k] if hessian else None, h_gn[k] if gn else None)
    return nb, reused


def _param_pass(model, inputs, targets, loss, module, pname, U, V, hessian, gn, chunk_size):
    """torch.func on the weight, batched over K: forward-over-reverse (H vec D_k, ż_k) = jvp(∇_W L_b, z)(W; D_k)
    when h is asked for; forward mode only, ż_k = jvp(z)(W; D_k), for h^GN alone."""
    W = module.weight.detach()
    D = layer_param_tangent(module, U, V)  # (K, *W.shape)

    def logits(w):
        return model_logits(lambda *a, **kw: functional_call(model, {pname: w}, a, kw), inputs)

    def grad_and_logits(w):
        def f(w):
            z = logits(w)
            return loss_terms(z, targets, loss)[0], z
        return torch.func.grad(f, has_aux=True)(w)  # (∇_W L_b, z)

    if chunk_size is None:  # one plain forward to size the chunks by the layer output (all its calls)
        sizes = []
        hook = module.register_forward_hook(lambda m, a, o: sizes.append(o.numel()))
        try:
            with torch.no_grad(), second_order_attention():
                logits(W)
        finally:
            hook.remove()
        step = _chunk(None, D.shape[0], sum(sizes), W.device)
    else:
        step = _chunk(chunk_size, D.shape[0], None, W.device)
    hs, gns = [], []
    with second_order_attention(), torch.no_grad():
        for a in range(0, D.shape[0], step):
            Dc = D[a:a + step]
            if hessian:
                (_, z), (gdot, zdot) = vmap(lambda d: jvp(grad_and_logits, (W,), (d,)), out_dims=(None, 0))(Dc)
            else:
                z, zdot = vmap(lambda d: jvp(logits, (W,), (d,)), out_dims=(None, 0))(Dc)
            hb, gnb = gn_and_rounded(z, targets, loss, zdot, (gdot * Dc).flatten(1).sum(1) if hessian else None)
            hs.append(hb)  # ⟨D_k, H vec D_k⟩
            gns.append(gnb)
    nb = loss_terms(z.detach(), targets, loss)[1]
    return (torch.cat(hs) if hessian else None), (torch.cat(gns) if gn else None), nb


CHUNK_BUDGET = {"cpu": 2 ** 20, "cuda": 2 ** 26}  # elements of the batched layer-output tangent per pass


def _chunk(chunk_size, K, numel, device) -> int:
    """Directions per batched pass: ``chunk_size`` if given, else as many as keep chunk × numel (the layer
    output's size) within CHUNK_BUDGET.  On the CPU, passes over tensors of a few hundred MB are no faster per
    direction than small ones (memory-bound elementwise work; glibc maps and zero-fills each large block anew),
    so the budget is small there; on a GPU, batching K amortises launches and fills the device."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if numel is None:
        return K
    budget = CHUNK_BUDGET.get(torch.device(device).type, CHUNK_BUDGET["cuda"])
    return max(1, min(K, budget // max(1, numel)))


def _layer_pass(module, x, s, g, zbar, z, targets, loss, U, V, hessian, gn, chunk_size):
    """Per micro-batch h_b (K,) and h^GN_b (K,) of one layer from its input x, output s and error g = ∂L_b/∂s."""
    K = U.shape[0]
    if g is None or not g.requires_grad:  # the layer does not influence the loss here
        zero = torch.zeros(K, dtype=z.dtype, device=z.device)
        return (zero if hessian else None), (zero if gn else None)
    step = _chunk(chunk_size, K, s.numel(), s.device)
    out_h, out_gn = [], []
    for a in range(0, K, step):
        sdot = L.directional_output(module, x, U[a:a + step], V[a:a + step])  # (k, *s.shape)
        wrt = ([s] if hessian else []) + [zbar]     # ż = J ṡ: h^GN, and the rounding bound of both at the loss
        if sdot.shape[0] == 1:  # a plain double backward: no vmap wrappers for one direction (~10% faster)
            res = [r if r is None else r[None] for r in
                   torch.autograd.grad(g, wrt, grad_outputs=sdot[0], retain_graph=True, allow_unused=True)]
        else:
            res = torch.autograd.grad(g, wrt, grad_outputs=sdot, retain_graph=True, is_grads_batched=True,
                                      allow_unused=True)
        zdot = res[-1]  # (k, *z.shape) = J ṡ
        if zdot is None:
            zdot = torch.zeros((sdot.shape[0], *z.shape), dtype=z.dtype, device=z.device)
        hb = None
        if hessian:  # ⟨ṡ, ∇²_s L ṡ⟩
            hb = ((sdot * res[0]).flatten(1).sum(1) if res[0] is not None
                  else torch.zeros(sdot.shape[0], dtype=z.dtype, device=z.device))
        hb, gnb = gn_and_rounded(z.detach(), targets, loss, zdot, hb)
        out_h.append(hb)
        out_gn.append(gnb)
    return (torch.cat(out_h) if hessian else None), (torch.cat(out_gn) if gn else None)
