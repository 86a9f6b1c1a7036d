"""Second-order calculus of the nonlinear ops a model's forward calls, on plain tensors.  Pure: tensors in, tensors
out.  :mod:`curvdist.math.jet` applies these to the parts of a jet.

For y = f(x) along T directions with first and second derivatives (ẋ, ẍ) of shape (T, *x.shape):

    ẏ = f'(x) ẋ,      ÿ = f''(x) ẋ² + f'(x) ẍ                                   (:func:`chain`)

with f', f'' evaluated once on x (x.shape), not per direction (:data:`DERIVATIVES`, :func:`gelu`).  Softmax and
layer normalisation couple the entries along a dimension and have their own closed forms (:func:`softmax`,
:func:`layer_norm`).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Derivatives = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]   # (x, y = f(x)) → (f'(x), f''(x))


def chain(g1: Tensor, g2: Tensor, a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """(ẏ, ÿ) of y = f(x) from f' = ``g1``, f'' = ``g2`` (x.shape) and (ẋ, ẍ) = (``a``, ``b``) ((T, *x.shape); b
    None: zero)."""
    first = a * g1
    second = (a * a).mul_(g2)
    if b is not None:
        second.addcmul_(b, g1)
    return first, second


def _silu(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(p)
    return s * (1 + p * (1 - s)), s * (1 - s) * (2 + p * (1 - 2 * s))


def power(n: float) -> Derivatives:
    return lambda p, y: (n * p ** (n - 1), n * (n - 1) * p ** (n - 2))


_SQRT_2PI = math.sqrt(2 * math.pi)
_C, _K = math.sqrt(2 / math.pi), 0.044715


def gelu(approximate: str) -> Derivatives:
    """GELU, exact (erf) or tanh-approximated: g = ½x(1 + t), t = tanh(u), u = c(x + kx³)."""
    if approximate == "tanh":
        def d(p, y):
            p2 = p * p
            t = torch.tanh(_C * p * (1 + _K * p2))
            s = 1 - t * t
            u1 = _C * (1 + 3 * _K * p2)
            return 0.5 * (1 + t) + 0.5 * p * s * u1, s * (u1 + p * (3 * _C * _K * p - t * u1 * u1))
        return d

    def d_erf(p, y):
        phi = torch.exp(-0.5 * p * p) / _SQRT_2PI
        return 0.5 * (1 + torch.erf(p / math.sqrt(2))) + p * phi, phi * (2 - p * p)
    return d_erf


DERIVATIVES: dict[str, Derivatives] = {
    "tanh": lambda p, y: (1 - y * y, -2 * y * (1 - y * y)),
    "sigmoid": lambda p, y: (y * (1 - y), y * (1 - y) * (1 - 2 * y)),
    "silu": _silu,
    "rsqrt": lambda p, y: (-0.5 * y ** 3, 0.75 * y ** 5),
    "sqrt": lambda p, y: (0.5 / y, -0.25 / y ** 3),
    "exp": lambda p, y: (y, y),
    "log": lambda p, y: (1 / p, -1 / (p * p)),
    "sin": lambda p, y: (torch.cos(p), -y),
    "cos": lambda p, y: (-torch.sin(p), -y),
    "relu": lambda p, y: ((p > 0).to(p.dtype), torch.zeros_like(p)),
    "reciprocal": lambda p, y: (-y * y, 2 * y * y * y),
}


def softmax(y: Tensor, a: Tensor, b: Tensor | None, d: int) -> tuple[Tensor, Tensor]:
    """y = softmax(x) along dim ``d`` of the (T, …) parts: ẏ = y(ẋ − ⟨y, ẋ⟩), ÿ = ẏ(ẋ − ⟨y, ẋ⟩) + y(ẍ − ⟨ẏ, ẋ⟩ −
    ⟨y, ẍ⟩)."""
    c = a - (a * y).sum(d, keepdim=True)
    first = c * y
    inner = (first * a).sum(d, keepdim=True).neg_()
    if b is not None:
        inner = (b - (b * y).sum(d, keepdim=True)).add_(inner)
    return first, c.mul_(first).addcmul_(y, inner)      # c is ours


def layer_norm(xc: Tensor, r: Tensor, a: Tensor, b: Tensor | None, dims: list[int],
               weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """x̂ = xc·r with xc = x − mean(x), r = (var + eps)^(-1/2) over ``dims`` (times ``weight``): its (ẏ, ÿ)."""
    def mean(t):
        return t.mean(dims, keepdim=True)
    a1 = a - mean(a)                            # centred ẋ
    v1 = 2 * mean(a1 * xc)                      # vaṙ and var̈, (T, …, 1)
    v2 = 2 * mean(a1 * a1)
    a2 = None
    if b is not None:
        a2 = b - mean(b)
        v2 = v2 + 2 * mean(a2 * xc)
    r1 = -0.5 * r ** 3 * v1
    r2 = 0.75 * r ** 5 * v1 * v1 - 0.5 * r ** 3 * v2
    second = (a1 * (2 * r1)).addcmul_(xc, r2)   # x̂̈ = 2 ẋc ṙ + xc r̈ + ẍc r
    if a2 is not None:
        second.addcmul_(a2, r)
    first = a1.mul_(r).addcmul_(xc, r1)         # x̂̇ = ẋc r + xc ṙ (a1 is ours)
    if weight is not None:
        first, second = first.mul_(weight), second.mul_(weight)
    return first, second
