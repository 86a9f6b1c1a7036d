"""Stage-local exact curvature: Taylor mode through a pipeline of stages, no autograd graph spanning them.
Pure: tensors in, tensors out.

Every exact layer l of a source stage, with directions D_{l,k} = u_k v_kᵀ, perturbs its output by ε_{l,k} D_{l,k} a
(ε = 0); along the one-hot tangent of ε_{l,k} the layer output moves by ṡ = (v_kᵀ a) u_k with s̈ = 0 (s is linear in
W and a does not depend on it).  The T = Σ_l K_l directions of a stage travel together as the T rows of a
:class:`curvdist.math.jet.Jet` (second-order forward mode: the stage's own forward on (x, ẋ, ẍ) gives (y, ẏ, ÿ)),
stage to stage to the logits, where

    h_t = ∂²L_b/∂ε_t² = ⟨∇_z L_b, z̈_t⟩ + ż_tᵀ ∇²_z L_b ż_t,      h^GN_t = ż_tᵀ ∇²_z L_b ż_t      (:func:`loss_jet`).

One sweep per (source stage, micro-batch, chunk) goes one way only: nothing is kept for a backward, nothing is
recomputed, and a stage's rows appear only from its own layers on (rows of later layers cost nothing upstream).
Per direction each downstream linear map does two products (ẏ = Wẋ, ÿ = Wẍ): the FLOP floor of an exact HVP.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from curvdist.math import jet
from curvdist.math import layers as L
from curvdist.math.forward import second_order_attention
from curvdist.math.losses import hessian_quadratic_bounded, loss_terms, rounding_eps, within_rounding


def layer_param_tangent(module: nn.Module, U: Tensor, V: Tensor) -> Tensor:
    """(K, *module.weight.shape): the directions u_k v_kᵀ in the weight's own layout."""
    D = U[:, :, None] * V[:, None, :]  # (K, m, n)
    return torch.stack([L.matrix_to_weight(module, d) for d in D])


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


JET_BUDGET = {"cpu": 2 ** 25, "cuda": 2 ** 29}   # elements of one derivative part of the widest activation a jet meets
# CPU: 5 rows through a 64 × 64 × 1536 MLP activation (31 M elements) took 0.64–0.70 of the time of 20 rows in one
# jet, and 1 row per jet recomputes the plain forward 20 times (benchmarks/bench_curvature.py, docs/design.md).
# GPU: 2^29 (2 GB per float32 part) lets a LLaMA-7B micro-batch of 2 × 2048 tokens (45 M elements in the MLP) take
# 11 rows, so each jet's plain forward is under 5 % of its products; ``exact_chunk`` (device memory) caps it too.


def widest_after(module: nn.Module, run: Callable[[], Tensor], layers: Mapping[str, nn.Module],
                 scale: int = 1) -> dict[str, tuple[int, int]]:
    """Per layer of ``layers`` (name → module, matched by identity): (the largest tensor, in elements, that any op
    computes from that layer's output on, except the final result; the final result ``run()`` returns), times
    ``scale`` (``run`` may take one sequence of a micro-batch of ``scale``: every activation grows with the batch).
    Every op counts, not only module outputs: the attention scores (B·heads·T² under the MATH kernel, which the
    jets run) are the widest tensor of a long-sequence block and live inside the attention module."""
    seen: list[tuple[str | None, int, int]] = []          # (layer name or None, elements, data pointer)
    keys = {id(m): n for n, m in layers.items()}

    def hook(mod, args, out):
        name = keys.get(id(mod))
        if name is not None and isinstance(out, Tensor):
            seen.append((name, out.numel(), out.untyped_storage().data_ptr()))
    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad(), second_order_attention(), _Sizes(seen):
            z = run()
    finally:
        for h in handles:
            h.remove()
    out, most = {}, 1
    final = (z.numel(), z.untyped_storage().data_ptr())
    for name, n, ptr in reversed(seen):
        if (n, ptr) != final:
            most = max(most, n)
        if name is not None:
            out[name] = (most * scale, z.numel() * scale)
    return out


class _Sizes(TorchDispatchMode):
    """Records (None, elements, data pointer) of every tensor an op returns (for :func:`widest_after`)."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, Tensor):
                self.seen.append((None, t.numel(), t.untyped_storage().data_ptr()))
        return out


def jet_slices(counts: Sequence[tuple[str, int]], widest: Mapping[str, tuple[int, int]], device,
               cap: int | None = None) -> list[DirectionSlice]:
    """The (layer, k) entries in slices of at most :data:`JET_BUDGET` // (the widest activation after the slice's
    first layer) rows, 4 × JET_BUDGET // (the final result: logits carry first derivatives only, see
    :class:`HeadSplit`), and ``cap``: rows of late layers, which meet only small activations, go many to a jet.
    A layer missing from ``widest`` bounds nothing: ``jet_slices(counts, {}, device, cap)`` cuts by ``cap`` alone."""
    budget = JET_BUDGET.get(torch.device(device).type, JET_BUDGET["cuda"])
    entries = [(layer, k) for layer, K in counts for k in range(K)]
    out, cur, size = [], [], 0
    for layer, k in entries:
        if not cur:
            inner, final = widest.get(layer, (1, 1))
            size = max(1, min(budget // max(1, inner), 4 * budget // max(1, final)))
            size = min(size, cap) if cap else size
        cur.append((layer, k))
        if len(cur) >= size:
            out.append(DirectionSlice(tuple(cur)))
            cur = []
    if cur:
        out.append(DirectionSlice(tuple(cur)))
    return out


class Perturbation:
    """Forward hooks on a stage's exact layers that seed the jet rows of one slice (:meth:`of`): layer l's output
    gains ṡ = D_{l,k} a at the rows of its (l, k) entries.  Inert outside :meth:`of`."""

    def __init__(self, layers: Mapping[str, nn.Module]):
        self._layers = dict(layers)
        self._active: dict[str, tuple[Tensor, Tensor, int]] = {}
        self.calls: dict[str, int] = {}     # layer → its calls in the current :meth:`of` (more than one: reuse)
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in layers.items()]

    def _hook(self, name: str):
        def hook(module, args, out):
            got = self._active.get(name)
            if got is None:
                return None
            self.calls[name] = self.calls.get(name, 0) + 1
            U, V, offset = got
            return jet.add_rows(out, L.directional_output(module, jet.primal(args[0]), U, V), offset)
        return hook

    @contextmanager
    def of(self, sl: DirectionSlice, directions: Mapping[str, tuple[Tensor, Tensor]]):
        """Inside: the layers of ``sl`` seed their rows ({layer: (U, V)} of every direction of the layer)."""
        t, active = 0, {}
        for layer in sl.layers:
            ks = sl.ks(layer)
            U, V = directions[layer]
            active[layer] = (U[ks], V[ks], t)
            t += len(ks)
        self._active, self.calls = active, {}
        try:
            yield
        finally:
            self._active = {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def active_modules(self) -> set[int]:
        """ids of the modules seeded now."""
        return {id(self._layers[n]) for n in self._active}


def _carries_jet(obj) -> bool:
    if isinstance(obj, jet.Jet):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_carries_jet(o) for o in obj)
    if isinstance(obj, Mapping):
        return any(_carries_jet(o) for o in obj.values())
    return False


class BlockReplay:
    """Skips the plain forward upstream of a jet's first seed: every element of an ``nn.ModuleList`` of ``module``
    (a transformer's blocks) keeps the output of each of its calls with plain inputs (by call number within the
    forward: a block called twice keeps two), and the same call of a later forward with plain inputs and no seeded
    layer inside (``perturbation``'s active modules, by identity) returns it instead of computing it again; an
    output that carries a jet is never kept.  One micro-batch: :meth:`start` before each forward of it."""

    def __init__(self, module: nn.Module, perturbation: Perturbation):
        self._pert = perturbation
        self._cache: dict[tuple[int, int], object] = {}
        self._calls: dict[int, int] = {}
        self._blocks = []
        for lst in module.modules():
            if isinstance(lst, nn.ModuleList):
                for block in (b for b in lst if "forward" not in b.__dict__):
                    self._blocks.append(block)
                    block.forward = self._wrap(id(block), block.forward, {id(m) for m in block.modules()})

    def _wrap(self, key: int, own: Callable, inner: set[int]) -> Callable:
        def forward(*args, **kwargs):
            n = self._calls.get(key, 0)
            self._calls[key] = n + 1
            if _carries_jet(args) or _carries_jet(kwargs) or inner & self._pert.active_modules:
                return own(*args, **kwargs)
            if (key, n) not in self._cache:
                out = own(*args, **kwargs)
                if _carries_jet(out):
                    return out
                self._cache[(key, n)] = out
            return self._cache[(key, n)]
        return forward

    def start(self) -> None:
        """A new forward of the same micro-batch begins."""
        self._calls = {}

    def close(self) -> None:
        for block in self._blocks:
            del block.forward
        self._blocks, self._cache, self._calls = [], {}, {}


def output_head(module: nn.Module) -> nn.Linear | None:
    """The linear map that produces the logits (``get_output_embeddings()``, or a stage's ``lm_head``), if any."""
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    head = head if head is not None else getattr(module, "lm_head", None)
    return head if isinstance(head, nn.Linear) else None


class HeadSplit:
    """The head z = hWᵀ (+ b) is the forward's last op: its second part z̈ = ḧWᵀ enters h only as ⟨∇_z L, z̈⟩ =
    ⟨(∇_z L) W, ḧ⟩, so the head takes (h, ḣ) only and :func:`loss_jet` forms that term from ḧ (:attr:`second`):
    one product through the head per direction less (half the head's work; the head of a 49152-word vocabulary is
    most of a small model's).  :meth:`applies` checks that the logits are the head's own output (no op after it);
    where they are not, the caller runs the jet again with ``enabled = False``."""

    def __init__(self, module: nn.Module):
        self.head = output_head(module)
        self.enabled = self.head is not None
        self.second: Tensor | None = None
        self._out = None
        self._handles = [] if self.head is None else [self.head.register_forward_pre_hook(self._pre),
                                                      self.head.register_forward_hook(self._post)]

    def _pre(self, module, args):
        x = args[0]
        if self.enabled and isinstance(x, jet.Jet) and x.b is not None:
            self.second = x.b
            return (jet.seed(x.p, x.a, None), *args[1:])
        return None

    def _post(self, module, args, out):
        self._out = out

    def reset(self) -> None:
        self.second, self._out = None, None

    def applies(self, logits) -> bool:
        return self.second is None or logits is self._out

    def term(self) -> tuple[Tensor, Tensor] | None:
        """(ḧ, W) for :func:`loss_jet`, or None."""
        return None if self.second is None else (self.second, self.head.weight)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def stage_jet(module: nn.Module, x, xdot: Tensor | None = None, xddot: Tensor | None = None, *, T: int,
              kwargs: Mapping | None = None, call: Callable | None = None, head: HeadSplit | None = None,
              pert: Perturbation | None = None, replay: BlockReplay | None = None
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(y, ẏ, ÿ)`` of one stage (rows: T directions; ẏ None when no direction reaches y) from its input x with
    (ẋ, ẍ) ((T, *x.shape) or None: x held fixed, as token ids are).  Seeds come from an active
    :class:`Perturbation` on the stage's layers; ``call(module, x)`` runs it when not ``module(x, **kwargs)``
    (:func:`curvdist.math.forward.model_logits` for a whole model); ``head`` (the last stage): its
    :class:`HeadSplit` leaves ÿ to :meth:`HeadSplit.term`; ``pert`` and ``replay`` are restarted before each
    forward (a rerun counts the layers' calls afresh)."""
    xin = jet.seed(x, xdot, xddot) if xdot is not None else x
    while True:
        if head is not None:
            head.reset()
        if pert is not None:
            pert.calls = {}
        if replay is not None:
            replay.start()
        with torch.no_grad(), second_order_attention(), jet.fused_activations(module):
            y = call(module, xin) if call is not None else module(xin, **dict(kwargs or {}))
        if head is None or head.applies(y):
            return jet.parts(y, T)
        head.enabled = False    # an op after the head (a logit soft-cap…) needs its z̈: run again without the split


@dataclass(frozen=True)
class LossCurvature:
    """What the loss makes of a jet's logits (:func:`loss_curvature`): h (T,) (None: not asked), h^GN (T,), N_b,
    and the magnitudes ``scale_h``, ``scale_gn`` (T,) of the sums that give them: Σ of the absolute values of
    their products (:func:`curvdist.math.losses.within_rounding`); ``eps``: ε of the coarsest dtype they were
    computed in."""
    h: Tensor | None
    h_gn: Tensor
    n_terms: int
    scale_h: Tensor | None
    scale_gn: Tensor
    eps: float


def loss_curvature(logits: Tensor, zdot: Tensor | None, zddot: Tensor | None, targets: Tensor, loss: str, T: int,
                   hessian: bool = True, head: tuple[Tensor, Tensor] | None = None) -> LossCurvature:
    """h_t = ⟨∇_z L_b, z̈_t⟩ + ż_tᵀ∇²_z L_b ż_t and h^GN_t = ż_tᵀ∇²_z L_b ż_t as computed, with their magnitudes
    s_t = Σ|∇_z L_b|·|z̈_t| + Σ(|∇_z L_b|·|W|)·|ḧ_t| (``head``) + ż_tᵀ|∇²_z L_b|ż_t and s^GN_t = ż_tᵀ|∇²_z L_b|ż_t
    (:func:`curvdist.math.losses.hessian_quadratic_bounded`); see :func:`loss_jet`."""
    z = logits.detach()
    nb = loss_terms(z, targets, loss)[1]
    if zdot is None:
        zero = z.new_zeros(T)
        return LossCurvature(zero if hessian else None, zero, nb, zero if hessian else None, zero,
                             rounding_eps(z.dtype))
    gn, s_gn = hessian_quadratic_bounded(z, targets, loss, zdot)
    dtypes = [gn.dtype, zdot.dtype]
    if not hessian or (zddot is None and head is None):
        return LossCurvature(gn if hessian else None, gn, nb, s_gn if hessian else None, s_gn, rounding_eps(*dtypes))
    with torch.enable_grad():
        zz = z.clone().requires_grad_()
        (zbar,) = torch.autograd.grad(loss_terms(zz, targets, loss)[0], zz)
    h, s_h = gn, s_gn
    if zddot is not None:
        zb = zbar.to(zddot.dtype)
        h = h + (zddot * zb).flatten(1).sum(1)
        s_h = s_h + zddot.abs().mul_(zb.abs()).flatten(1).sum(1)
        dtypes.append(zddot.dtype)
    if head is not None:
        hdd, W = head
        hdd = jet.pad_rows(hdd, T)
        zb = zbar.to(W.dtype)
        pulled = (zb @ W).to(hdd.dtype)                     # (…, d): once, not per direction
        bound = _abs_product(zb, W).to(hdd.dtype)           # |∇_z L|·|W|: the matmul's rounding too
        h = h + (hdd * pulled).flatten(1).sum(1)
        s_h = s_h + (hdd.abs() * bound).flatten(1).sum(1)
        dtypes += [hdd.dtype, W.dtype]
    return LossCurvature(h, gn, nb, s_h, s_gn, rounding_eps(*dtypes))


def _abs_product(a: Tensor, W: Tensor, step: int = 4096) -> Tensor:
    """|a|·|W| (a (…, C), W (C, d)) by blocks of W's rows: no copy of a large head's |W| or of |a| at once."""
    out = None
    for i in range(0, W.shape[0], step):
        part = a[..., i:i + step].abs() @ W[i:i + step].abs()
        out = part if out is None else out.add_(part)
    return out


def loss_jet(logits: Tensor, zdot: Tensor | None, zddot: Tensor | None, targets: Tensor, loss: str, T: int,
             hessian: bool = True, head: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor | None, Tensor, int]:
    """(h (T,), h^GN (T,), N_b) of the micro-batch mean loss L_b from the logits and their tangents (module
    docstring); a direction whose tangent does not reach the logits gets 0.  ``head``: (ḧ, W) when the head's
    second part was left out (:class:`HeadSplit`): ⟨∇_z L_b, z̈⟩ = ⟨(∇_z L_b) W, ḧ⟩.

    Each is reported as exactly 0 where it is within the rounding of its sums at the loss, |h_t| ≤ c·ε·s_t
    (:func:`loss_curvature`, :func:`curvdist.math.losses.within_rounding`).  The case this is for: a cross-entropy
    head's softmax null direction (ż_t ∝ 1, a uniform shift of a row's logits; z̈_t ∝ 1 too, and ⟨∇_z ℓ, 1⟩ = 0),
    where both terms are 0 in exact arithmetic but the computed sums are their rounding, of either sign per
    micro-batch, and the h > 0 fits would keep or drop the direction by chance.  That cancellation happens at the
    loss, so the bound is taken there: the network's rounding upstream leaves ż_t = c·1 + δ with |δ| of order
    ε|c|, whose true form δᵀ∇²ℓ δ is of order ε² (the null direction's cross term is exactly 0); in z̈_t it enters
    the gradient term at first order, relative to |∇_z ℓ|·|z̈_t|, which s_t carries.  A genuine direction's h lies
    orders of magnitude above the bound (tests/test_null_directions.py); one that does not is not resolved by
    this dtype anyway."""
    r = loss_curvature(logits, zdot, zddot, targets, loss, T, hessian, head)
    h = None if r.h is None else within_rounding(r.h, r.scale_h, r.eps)
    return h, within_rounding(r.h_gn, r.scale_gn, r.eps), r.n_terms
