"""Dense truth for tiny models: the exact Hessian and Gauss–Newton matrix of L restricted to one layer.

Pure: tensors in, tensors out (torch.func, meant for float64 and a few hundred weights).  For a layer W (m × n)
(the (out, in) matrix of :func:`curvdist.math.layers.weight_matrix`), with vec in row-major order (index i·n + j):

    L(W)  = (1/N) Σ_b N_b L_b(W),   L_b the mean loss of micro-batch b over its N_b terms
    H     = ∇²_W L                                        (mn × mn)
    G     = (1/N) Σ_b N_b J_bᵀ (∇²_z L_b) J_b              (mn × mn), J_b = ∂ vec(z_b)/∂ vec(W)   (P_b × mn)
    quadratic(M, U, V)_k = vec(u_k v_kᵀ)ᵀ M vec(u_k v_kᵀ)   = Σ_{ijkl} M[(i,j),(k,l)] u_i v_j u_k v_l

``loss`` is a name of :mod:`curvdist.math.losses` or a callable ``(logits, targets) -> (mean loss, number of loss
terms)``: tests that check code built on :func:`curvdist.math.losses.loss_terms` pass an independent oracle
(tests/oracle.py) so that the truth does not share the loss with what it checks.

The weight enters through ``torch.func.functional_call`` with the weight tensor rebuilt from W by
:func:`curvdist.math.layers.matrix_to_weight`, so Linear, Conv2d and GPT-2 Conv1D all work.  Every micro-batch is held
in memory; the Hessian is built by ``torch.func.hessian`` (forward-over-reverse over all mn basis directions).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacfwd

from curvdist.math import layers as L
from curvdist.math.forward import model_logits, second_order_attention, to_device
from curvdist.math.losses import loss_terms

LossFn = Callable[[Tensor, Tensor], tuple[Tensor, int]]


def _loss(loss: str | LossFn) -> LossFn:
    """(logits, targets) → (mean loss, terms) for a loss name or an oracle callable."""
    if callable(loss):
        return loss
    return lambda z, y: loss_terms(z, y, loss)[:2]


def _weight_name(model: nn.Module, module: nn.Module) -> str:
    for name, p in model.named_parameters():
        if p is module.weight:
            return name
    raise ValueError("the module's weight is not a parameter of the model")


def _prepared(model, data):
    p = next(iter(model.parameters()))
    return [(to_device(x, p.device, p.dtype), to_device(y, p.device)) for x, y in data], p.dtype


def _logits_fn(model: nn.Module, module: nn.Module, inputs):
    """W (m, n) → logits of the micro-batch, with the layer's weight replaced."""
    name = _weight_name(model, module)

    def f(W: Tensor) -> Tensor:
        params = {name: L.matrix_to_weight(module, W)}
        return model_logits(lambda *a, **kw: functional_call(model, params, a, kw), inputs)
    return f


def _n_terms(model, data, loss) -> list[int]:
    with torch.no_grad(), second_order_attention():
        return [int(_loss(loss)(model_logits(model, x), y)[1]) for x, y in data]


def _setup(model, data, loss, module):
    """Micro-batches on the model's device, their loss-term counts N_b, N = Σ N_b, and the layer's W (m, n)."""
    batches, _ = _prepared(model, data)
    counts = _n_terms(model, batches, loss)
    return batches, counts, sum(counts), L.weight_matrix(module).detach().clone()


def layer_hessian(model: nn.Module, data: Iterable, loss: str | LossFn, module: nn.Module) -> Tensor:
    """Exact ∇²_W L (mn × mn) of the mean loss over all micro-batches, W the layer's (m, n) matrix."""
    batches, counts, N, W0 = _setup(model, data, loss, module)
    m, n = W0.shape

    def total(W: Tensor) -> Tensor:
        out = 0.0
        for (x, y), nb in zip(batches, counts):
            out = out + nb * _loss(loss)(_logits_fn(model, module, x)(W), y)[0]
        return out / N

    with second_order_attention():
        H = hessian(total)(W0)  # (m, n, m, n)
    return H.reshape(m * n, m * n).detach()


def layer_ggn(model: nn.Module, data: Iterable, loss: str | LossFn, module: nn.Module) -> Tensor:
    """Exact Gauss–Newton matrix Jᵀ (∇²_z L) J (mn × mn) of the mean loss, restricted to the layer's W."""
    batches, counts, N, W0 = _setup(model, data, loss, module)
    m, n = W0.shape
    G = torch.zeros(m * n, m * n, dtype=W0.dtype, device=W0.device)
    with second_order_attention():
        for (x, y), nb in zip(batches, counts):
            f = _logits_fn(model, module, x)
            z0 = f(W0).detach()
            J = jacfwd(f)(W0).reshape(z0.numel(), m * n)  # (P, mn)
            Hz = hessian(lambda z, y=y: _loss(loss)(z, y)[0])(z0).reshape(z0.numel(), z0.numel())  # (P, P)
            G += (nb / N) * (J.T @ Hz @ J)
    return G.detach()


def quadratic(M: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """vec(u_k v_kᵀ)ᵀ M vec(u_k v_kᵀ) for U (K, m), V (K, n), M (mn × mn) in row-major vec order → (K,)."""
    K, m = U.shape
    n = V.shape[1]
    d = (U[:, :, None] * V[:, None, :]).reshape(K, m * n).to(M.dtype)  # vec(u vᵀ), index i·n + j
    return torch.einsum("ka,ab,kb->k", d, M, d)
