"""Second-order forward mode (Taylor mode) through an unmodified model.  Pure: tensors in, tensors out.

A :class:`Jet` carries, beside a tensor x (the primal), its first and second derivatives along T directions at
once: ẋ (T, *x.shape) and ẍ (T, *x.shape) (``None``: zero).  Every aten op the forward of a supported model calls
has a rule (linear maps act on each part; y = f(x) elementwise gives ẏ = f'ẋ, ÿ = f''ẋ² + f'ẍ; a product of two
jets gives ÿ = ẍB + 2ẋḂ + AB̈; softmax and layer norm have their closed forms), so running the model's own
forward on a jet input gives (z, ż, z̈) at the logits.  Along a direction t of a layer's weight, s = W a is
linear in W and a does not depend on W, so s̈_t = 0 at the layer output and the whole second derivative of the
loss along t is

    h_t = ∂²L_b/∂ε_t² = ⟨∇_z L_b, z̈_t⟩ + ż_tᵀ ∇²_z L_b ż_t ,        h^GN_t = ż_tᵀ ∇²_z L_b ż_t     (:func:`loss_jet`)

Why this route: it is forward only.  Per direction it does two products per downstream linear map (ẏ = Wẋ and
ÿ = Wẍ), the FLOP floor of any exact HVP, with no adjoint and nothing kept or recomputed; across pipeline stages
the jet travels one way (stage to stage to the loss), so a stage never waits for a message coming back down.
Tangent rows appear where their layer is (:func:`perturb_output` appends them), so rows of a later layer cost
nothing upstream of it.  A layer called twice per forward breaks s̈_t = 0 (the param route of
:mod:`curvdist.math.curvature` handles weight reuse).  An op without a rule raises :class:`NotImplementedError`
naming it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from curvdist.math import taylor

aten = torch.ops.aten


class MissingRule(NotImplementedError):
    """The model's forward calls an op that has no rule here."""


class Jet(Tensor):
    """x with its first (``a``, (T, *x.shape)) and second (``b``, same or None = 0) derivatives along T directions."""

    @staticmethod
    def __new__(cls, p: Tensor, a: Tensor, b: Tensor | None = None):
        return Tensor._make_wrapper_subclass(cls, p.shape, strides=p.stride(), storage_offset=p.storage_offset(),
                                             dtype=p.dtype, device=p.device, requires_grad=False)

    def __init__(self, p: Tensor, a: Tensor, b: Tensor | None = None):
        self.p, self.a, self.b = p, a, b

    def __repr__(self) -> str:
        return f"Jet(shape={tuple(self.p.shape)}, directions={self.a.shape[0]}, second={'yes' if self.b is not None else 'zero'})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = RULES.get(func)
        if rule is not None:
            return rule(func, *args, **kwargs)
        if func.overloadpacket in NONDIFF:
            return func(*_primals(args), **_primals(kwargs))
        raise MissingRule(f"no Taylor-mode rule for {func} (curvdist.math.jet): the exact pass cannot run this "
                          "model's forward on jets; add a rule there, or measure in process with method='output' "
                          "(the double backward)")


def primal(x):
    return x.p if isinstance(x, Jet) else x


def _primals(obj):
    if isinstance(obj, Jet):
        return obj.p
    if isinstance(obj, (list, tuple)):
        return type(obj)(_primals(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _primals(v) for k, v in obj.items()}
    return obj


def rows(x) -> int:
    return x.a.shape[0] if isinstance(x, Jet) else 0


def pad_rows(t: Tensor | None, T: int) -> Tensor | None:
    """``t`` (r, ...) with zero rows appended up to T (rows of directions whose layer came later)."""
    if t is None or t.shape[0] == T:
        return t
    return torch.cat([t, t.new_zeros((T - t.shape[0], *t.shape[1:]))])


def _fit(t: Tensor | None, shape) -> Tensor | None:
    """A tangent (T, *s) broadcast to (T, *shape) (s broadcastable to shape)."""
    if t is None:
        return None
    nd = len(shape)
    if t.dim() - 1 < nd:
        t = t.reshape(t.shape[0], *([1] * (nd - t.dim() + 1)), *t.shape[1:])
    return t.expand(t.shape[0], *shape) if tuple(t.shape[1:]) != tuple(shape) else t


def _parts(x, T: int, shape) -> tuple[Tensor | None, Tensor | None]:
    """(ẋ, ẍ) of an operand with T rows at ``shape`` (None for a constant or a zero second part)."""
    if not isinstance(x, Jet):
        return None, None
    return _fit(pad_rows(x.a, T), shape), _fit(pad_rows(x.b, T), shape)


def _add(*ts):
    ts = [t for t in ts if t is not None]
    if not ts:
        return None
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def _make(p: Tensor, a: Tensor | None, b: Tensor | None):
    if a is None:           # no operand carried a tangent through (e.g. masked out): a plain tensor
        return p
    return Jet(p, a, b)


# ------------------------------------------------------------------------------------------------ linear maps
def _dim(d: int, nd: int) -> int:
    return (d % nd if nd else 0) + 1


def _linear(tangent: Callable[[Tensor, Tensor], Tensor]):
    """Rule of an op linear in its first argument (a jet); ``tangent(t, out)`` maps a (T, *x.shape) tangent."""
    def rule(func, x, *args, **kwargs):
        out = func(x.p, *args, **kwargs)
        if isinstance(out, (list, tuple)):
            ta = tangent(x.a, out)
            tb = tangent(x.b, out) if x.b is not None else [None] * len(out)
            return type(out)(Jet(o, a, b) for o, a, b in zip(out, ta, tb))
        return Jet(out, tangent(x.a, out), tangent(x.b, out) if x.b is not None else None)
    return rule


def _view(func, x, size, *rest, **kw):
    out = func(x.p, size, *rest, **kw)
    T = x.a.shape[0]
    return Jet(out, x.a.reshape(T, *out.shape), None if x.b is None else x.b.reshape(T, *out.shape))


def _expand(func, x, size, *rest, **kw):
    out = func(x.p, size, *rest, **kw)
    return Jet(out, _fit(x.a, out.shape), _fit(x.b, out.shape))


def _transpose(func, x, d0, d1):
    nd = x.p.dim()
    return _linear(lambda t, out: t.transpose(_dim(d0, nd), _dim(d1, nd)))(func, x, d0, d1)


def _t(func, x):
    return _linear(lambda t, out: t.transpose(1, 2) if x.p.dim() == 2 else t)(func, x)


def _permute(func, x, dims):
    nd = x.p.dim()
    return _linear(lambda t, out: t.permute(0, *[_dim(d, nd) for d in dims]))(func, x, dims)


def _unsqueeze(func, x, d):
    return _linear(lambda t, out: t.unsqueeze(_dim(d, x.p.dim() + 1)))(func, x, d)


def _squeeze_dims(func, x, *dims):
    nd = x.p.dim()
    ds = [i for i, n in enumerate(x.p.shape) if n == 1] if not dims else \
        ([dims[0]] if isinstance(dims[0], int) else list(dims[0]))
    keep = [_dim(d, nd) for d in ds if x.p.shape[d] == 1]
    return _linear(lambda t, out: t.squeeze(keep) if keep else t)(func, x, *dims)


def _sliced(func, x, dim=0, *rest):
    nd = x.p.dim()
    return _linear(lambda t, out: func(t, _dim(dim, nd), *rest))(func, x, dim, *rest)


def _split(func, x, size, dim=0):
    nd = x.p.dim()
    return _linear(lambda t, out: func(t, size, _dim(dim, nd)))(func, x, size, dim)


def _same(func, x, *args, **kwargs):
    """Ops that act on the tangents exactly as on x (clone, dtype casts, negation, scaling by a number)."""
    return _linear(lambda t, out: func(t, *args, **kwargs))(func, x, *args, **kwargs)


def _reduce(func, x, dims=None, keepdim=False, **kw):
    nd = x.p.dim()
    if dims is None or (isinstance(dims, Sequence) and len(dims) == 0):
        dims = list(range(nd))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return _linear(lambda t, out: func(t, [_dim(d, nd) for d in dims], keepdim, **kw))(func, x, dims, keepdim, **kw)


def _reduce_all(func, x, **kw):
    def red(t):
        return t.flatten(1).sum(1) if func is aten.sum.default else t.flatten(1).mean(1)
    return Jet(func(x.p, **kw), red(x.a), None if x.b is None else red(x.b))


def _cat(func, tensors, dim=0):
    out = func([primal(t) for t in tensors], dim)
    tensors = [t for t in tensors if isinstance(t, Jet) or t.dim() > 1 or t.numel() > 0]   # legacy empty (0,)
    T = max(rows(t) for t in tensors)
    nd = out.dim()
    ta, tb = [], []
    for t in tensors:
        p = primal(t)
        if isinstance(t, Jet):
            ta.append(pad_rows(t.a, T))
            tb.append(pad_rows(t.b, T))
        else:
            ta.append(p.new_zeros((T, *p.shape)))
            tb.append(None)
    if all(b is None for b in tb):
        b = None
    else:
        b = func([x if x is not None else a.new_zeros(a.shape) for x, a in zip(tb, ta)], _dim(dim, nd))
    return Jet(out, func(ta, _dim(dim, nd)), b)


# ------------------------------------------------------------------------------------------------ elementwise
def _add_rule(sign: float):
    def rule(func, x, y, *, alpha=1):
        out = func(primal(x), primal(y), alpha=alpha)
        if not isinstance(y, Jet) and not isinstance(x, Jet):
            return out
        T = max(rows(x), rows(y))
        ax, bx = _parts(x, T, out.shape)
        ay, by = _parts(y, T, out.shape)
        c = sign * alpha
        ay = None if ay is None else (ay if c == 1 else c * ay)
        by = None if by is None else (by if c == 1 else c * by)
        return _make(out, _add(ax, ay), _add(bx, by))
    return rule


def _bilinear(op: Callable[[Tensor, Tensor], Tensor]):
    """d(AB) = ȦB + AḂ, d²(AB) = ÄB + 2ȦḂ + AB̈ for any op bilinear in (A, B) that broadcasts a leading batch."""
    def parts(A, B, out_shape):
        T = max(rows(A), rows(B))
        pa, pb = primal(A), primal(B)
        a1 = pad_rows(A.a, T) if isinstance(A, Jet) else None
        a2 = pad_rows(A.b, T) if isinstance(A, Jet) else None
        b1 = pad_rows(B.a, T) if isinstance(B, Jet) else None
        b2 = pad_rows(B.b, T) if isinstance(B, Jet) else None
        first = _add(None if a1 is None else op(a1, pb), None if b1 is None else op(pa, b1))
        second = _add(None if a2 is None else op(a2, pb), None if b2 is None else op(pa, b2),
                      None if a1 is None or b1 is None else 2 * op(a1, b1))
        return _fit(first, out_shape), _fit(second, out_shape)
    return parts


def _mul(func, x, y):
    """Elementwise product: the parts are lifted to the output's rank first, so the leading T never lines up with
    a dimension of the other operand."""
    out = func(primal(x), primal(y))
    T = max(rows(x), rows(y))
    ax, bx = _parts(x, T, out.shape)
    ay, by = _parts(y, T, out.shape)
    px, py = primal(x), primal(y)
    first = _add(None if ax is None else ax * py, None if ay is None else px * ay)
    second = _add(None if bx is None else bx * py, None if by is None else px * by,
                  None if ax is None or ay is None else 2 * ax * ay)
    return _make(out, first, second)


def _div(func, x, y):
    if not isinstance(y, Jet):
        out = func(primal(x), y)
        return Jet(out, _fit(x.a, out.shape) / y, None if x.b is None else _fit(x.b, out.shape) / y)
    inv = _unary(taylor.DERIVATIVES["reciprocal"])(aten.reciprocal.default, y)
    return _mul(aten.mul.Tensor, x, inv)


def _mm(func, A, B):
    out = func(primal(A), primal(B))
    a, b = _bilinear(torch.matmul)(A, B, out.shape)
    return _make(out, a, b)


def _addmm(func, bias, A, B, *, beta=1, alpha=1):
    if isinstance(bias, Jet):
        raise NotImplementedError("addmm with a perturbed bias (curvdist.math.jet)")
    out = func(bias, primal(A), primal(B), beta=beta, alpha=alpha)
    a, b = _bilinear(torch.matmul)(A, B, out.shape)
    if alpha != 1:
        a, b = alpha * a, (None if b is None else alpha * b)
    return _make(out, a, b)


def _convolution(func, x, weight, bias, *args):
    """Convolution of a jet input with constant weights: the T rows go through as extra batch entries."""
    if isinstance(weight, Jet) or isinstance(bias, Jet):
        raise NotImplementedError("convolution with perturbed weights (curvdist.math.jet)")
    out = func(x.p, weight, bias, *args)

    def conv(t):
        if t is None:
            return None
        y = func(t.reshape(-1, *t.shape[2:]), weight, None, *args)
        return y.reshape(t.shape[0], *out.shape)
    return Jet(out, conv(x.a), conv(x.b))


def _where(func, cond, x, y):
    out = func(cond, primal(x), primal(y))
    T = max(rows(x), rows(y))
    ax, bx = _parts(x, T, out.shape)
    ay, by = _parts(y, T, out.shape)

    def pick(u, v):
        if u is None and v is None:
            return None
        return torch.where(cond, u if u is not None else 0.0, v if v is not None else 0.0)
    return _make(out, pick(ax, ay), pick(bx, by))


def _masked_fill(func, x, mask, value):
    out = func(x.p, mask, value)
    return Jet(out, x.a.masked_fill(mask, 0), None if x.b is None else x.b.masked_fill(mask, 0))


def _unary(d: taylor.Derivatives):
    """y = f(x) elementwise, (f', f'') = ``d(x, y)`` on the primal once for all rows (:func:`taylor.chain`)."""
    def rule(func, x, *args, **kwargs):
        out = func(x.p, *args, **kwargs)
        return Jet(out, *taylor.chain(*d(x.p, out), x.a, x.b))
    return rule


def _pow(func, x, n):
    return _unary(taylor.power(n))(func, x, n)


def _gelu(func, x, *, approximate="none"):
    return _unary(taylor.gelu(approximate))(func, x, approximate=approximate)


def _softmax(func, x, dim, *args):
    y = func(x.p, dim, *args)
    first, second = taylor.softmax(y.to(x.a.dtype), x.a, x.b, _dim(dim, x.p.dim()))
    return Jet(y, first.to(y.dtype), second.to(y.dtype))


def _layer_norm(func, x, shape, weight=None, bias=None, eps=1e-5):
    """native_layer_norm over the last len(shape) dims (mean and rstd come back as plain tensors)."""
    out, mean, rstd = func(x.p, shape, weight, bias, eps)
    dims = list(range(-len(shape), 0))
    xc, r = (x.p - mean).to(x.a.dtype), rstd.to(x.a.dtype)   # CUDA keeps mean and rstd in float32 for bf16 input
    return Jet(out, *taylor.layer_norm(xc, r, x.a, x.b, dims, primal(weight))), mean, rstd


def _detach(func, x):
    return Jet(func(x.p), x.a, x.b)


RULES: dict = {
    aten.view.default: _view, aten._unsafe_view.default: _view, aten.reshape.default: _view,
    aten.expand.default: _expand, aten.transpose.int: _transpose, aten.t.default: _t, aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze_dims, aten.squeeze.dims: _squeeze_dims,
    aten.squeeze.default: _squeeze_dims, aten.slice.Tensor: _sliced, aten.select.int: _sliced,
    aten.split.Tensor: _split, aten.split_with_sizes.default: _split, aten.cat.default: _cat,
    aten.clone.default: _same, aten.alias.default: _same, aten._to_copy.default: _same,
    aten.contiguous.default: _same, aten.neg.default: _same, aten.mul.Scalar: _same, aten.div.Scalar: _same,
    aten.detach.default: _detach,
    aten.mean.dim: _reduce, aten.sum.dim_IntList: _reduce, aten.sum.default: _reduce_all,
    aten.mean.default: _reduce_all,
    aten.add.Tensor: _add_rule(1.0), aten.sub.Tensor: _add_rule(-1.0),
    aten.mul.Tensor: _mul, aten.div.Tensor: _div,
    aten.convolution.default: _convolution, aten.mm.default: _mm, aten.bmm.default: _mm,
    aten.matmul.default: _mm, aten.addmm.default: _addmm,
    aten.where.self: _where, aten.masked_fill.Scalar: _masked_fill,
    **{getattr(aten, name).default: _unary(d) for name, d in taylor.DERIVATIVES.items()},
    aten.pow.Tensor_Scalar: _pow, aten.gelu.default: _gelu,
    aten._softmax.default: _softmax, aten._safe_softmax.default: _softmax,
    aten.native_layer_norm.default: _layer_norm,
}
NONDIFF = {   # ops whose result carries no derivative: they see the primals
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.isnan, aten.isinf, aten.isfinite,
    aten.any, aten.all, aten.argmax, aten.argmin, aten.sign, aten.logical_not, aten.is_nonzero,
    aten._local_scalar_dense, aten.equal, aten.ones_like, aten.zeros_like, aten.empty_like,
    aten.full_like, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full,
}


# Activation modules whose forward is a chain of elementwise ops (GPT-2's gelu_new: pow, mul, add, tanh, mul): on a
# jet each op costs several (T, …) passes, so inside :func:`fused_activations` they apply their one-op equivalent,
# whose rule computes f' and f'' on the primal once (same function; the primal may differ by rounding).
FUSED = {
    "NewGELUActivation": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "FastGELUActivation": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "GELUTanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "PytorchGELUTanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def _on_jets(fused: Callable, own: Callable) -> Callable:
    return lambda x: fused(x) if isinstance(x, Jet) else own(x)


@contextmanager
def fused_activations(module: torch.nn.Module):
    """Inside: every activation module of ``module`` named in :data:`FUSED` applies its one-op form to a jet (plain
    tensors go through its own forward)."""
    patched = []
    for sub in module.modules():
        fused = FUSED.get(type(sub).__name__)
        if fused is not None and "forward" not in sub.__dict__:
            sub.forward = _on_jets(fused, sub.forward)
            patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub.forward


def parts(x, T: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(x, ẋ (T, *x.shape) or None, ẍ or None) of a result, with the rows of all T directions."""
    if not isinstance(x, Jet):
        return x, None, None
    return x.p, pad_rows(x.a, T), pad_rows(x.b, T)


def seed(p: Tensor, first: Tensor, second: Tensor | None = None) -> Jet:
    """A jet from its parts (a stage input arriving with its tangents)."""
    return Jet(p, first, second)


def add_rows(out, first: Tensor, offset: int) -> Jet:
    """``out`` (plain or a jet) with ``first`` (K, *out.shape) added to its first derivatives at rows
    offset..offset+K (rows appended as needed); the second derivatives are unchanged."""
    p = primal(out)
    K = first.shape[0]
    T = max(rows(out), offset + K)
    if isinstance(out, Jet):
        a, b = pad_rows(out.a, T).clone(), pad_rows(out.b, T)
    else:
        a, b = p.new_zeros((T, *p.shape)), None
    a[offset:offset + K] += first.to(a.dtype)
    return Jet(p, a, b)
