"""Losses, error seeds and loss-Hessian quadratic forms.  Pure: tensors in, tensors out.

Every loss is a mean over *loss terms* (see docs/design.md):

    L = (1/N) Σ_t ℓ_t

- ``cross_entropy``: logits (B, C) with targets (B,), or (B, T, V) with targets (B, T); target -100 is ignored.
  ℓ_t = logsumexp(z_t) − z_t[y_t].
- ``mse``: logits and targets of the same shape (..., C); one term per row of the last axis,
  ℓ_t = (1/C)‖z_t − y_t‖², so that L equals ``torch.nn.functional.mse_loss(z, y)`` (mean over elements).

Seeds are tensors of the logits' shape that are back-propagated to obtain per-row errors δ_i.  They are
gradients of the *summed* loss Σ_t ℓ_t (not the mean), so δ_i = N ∂L/∂s_i:

- ``empirical``: ∂ℓ_t/∂z_t at the true labels (CE: p_t − e_{y_t}; MSE: (2/C)(z_t − y_t)).
- ``mc``: the same at labels drawn from the model's predictive distribution (CE: y ~ Cat(p_t);
  MSE: y ~ N(z_t, (C/2) I), whose negative log-likelihood is ℓ_t up to a constant); with S samples each seed is
  scaled by 1/√S so that the seeds' outer products average to E[g gᵀ] = ∇²ℓ (the true Fisher).
- ``type2``: the columns of an exact square root of ∇²_z ℓ_t (CE: q_c = √p_c (e_c − p_t), Σ_c q_c q_cᵀ = diag p − p pᵀ;
  MSE: √(2/C) e_c): one seed per class.

Gradient labels (``gradient_labels="sampled"``, the null measurement): :func:`sampled_targets` replaces the targets
of a micro-batch by one draw from the model's predictive distribution (CE: y_t ~ Cat(p_t), ignored positions stay
-100; MSE: y_t ~ N(z_t, (C/2) I)), from the generator :func:`label_generator` of (seed, micro-batch key), so every
route draws the same labels.  Then E G = 0: the gradient is pure sampling noise.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

LOSSES = ("cross_entropy", "mse")
FISHERS = ("empirical", "mc", "type2")
IGNORE_INDEX = -100


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not supported; choose one of {', '.join(LOSSES)}")


def check_fisher(fisher: str) -> None:
    if fisher not in FISHERS:
        raise ValueError(f"fisher={fisher!r} is not supported; choose one of {', '.join(FISHERS)}")


def _flat(logits: torch.Tensor, targets: torch.Tensor, loss: str):
    """(R, C) logits, (R,) or (R, C) targets and the (R,) mask of valid terms."""
    check_loss(loss)
    C = logits.shape[-1]
    z = logits.reshape(-1, C)
    if z.dtype in (torch.bfloat16, torch.float16):
        z = z.float()   # bf16/fp16 forward, fp32 loss and seeds (float64 stays float64)
    if loss == "cross_entropy":
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"cross_entropy needs targets of shape {tuple(logits.shape[:-1])} for logits of shape "
                f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
        y = targets.reshape(-1)
        mask = y != IGNORE_INDEX
    else:
        if targets.shape != logits.shape:
            raise ValueError(f"mse needs targets of the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
        y = targets.reshape(-1, C).to(logits.dtype)
        mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    return z, y, mask


def count_terms(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> int:
    """N_b, the loss terms of a micro-batch (the ``n_terms`` of :func:`loss_terms` without computing the loss)."""
    _, _, mask = _flat(logits, targets, loss)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("the micro-batch has no loss terms (every target is -100); drop it or fix the targets")
    return n


def loss_terms(logits: torch.Tensor, targets: torch.Tensor, loss: str):
    """Return ``(L_mean, n_terms, term_mask)``; the loss is computed in the logits' dtype (fp32 for bf16/fp16)."""
    z, y, mask = _flat(logits, targets, loss)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("the micro-batch has no loss terms (every target is -100); drop it or fix the targets")
    if loss == "cross_entropy":
        yy = torch.where(mask, y, torch.zeros_like(y))
        ell = torch.logsumexp(z, dim=-1) - z.gather(1, yy[:, None]).squeeze(1)
        total = (ell * mask.to(z.dtype)).sum()
    else:
        total = ((z - y) ** 2).sum() / z.shape[-1]
    return total / n, n, mask


def _probs(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z, dim=-1)


def error_seeds(logits: torch.Tensor, targets: torch.Tensor, loss: str, fisher: str,
                generator: torch.Generator | None = None, mc_samples: int = 1) -> Iterator[torch.Tensor]:
    """Yield seeds of the logits' shape (lazily: ``type2`` on a large vocabulary has one seed per class)."""
    check_fisher(fisher)
    z, y, mask = _flat(logits.detach(), targets, loss)
    shape = logits.shape
    C = z.shape[-1]
    m = mask.to(z.dtype)[:, None]
    if loss == "cross_entropy":
        p = _probs(z)
        if fisher == "empirical":   # p − e_y in place: no (R, C) one-hot (int64, then cast) beside p
            yy = torch.where(mask, y, torch.zeros_like(y))
            p.scatter_add_(1, yy[:, None], torch.full((p.shape[0], 1), -1.0, dtype=p.dtype, device=p.device))
            if not bool(mask.all()):
                p.mul_(m)
            yield p.reshape(shape)
        elif fisher == "mc":
            for _ in range(mc_samples):
                # sample on the CPU generator when given one so that runs are reproducible across devices
                pc = p.float().cpu() if generator is not None else p.float()
                ys = torch.multinomial(pc, 1, generator=generator).squeeze(1).to(z.device)
                seed = (p - torch.nn.functional.one_hot(ys, C).to(z.dtype)) * m
                yield (seed / mc_samples ** 0.5).reshape(shape)
        else:
            sq = p.sqrt()
            for c in range(C):
                seed = -sq[:, c:c + 1] * p
                seed[:, c] += sq[:, c]
                yield (seed * m).reshape(shape)
    else:
        if fisher == "empirical":
            yield ((2.0 / C) * (z - y)).reshape(shape)
        elif fisher == "mc":
            for _ in range(mc_samples):
                eps = torch.randn(z.shape, generator=generator, dtype=z.dtype,
                                  device="cpu" if generator is not None else z.device).to(z.device)
                yield (-(2.0 / C) ** 0.5 * eps / mc_samples ** 0.5).reshape(shape)
        else:
            for c in range(C):
                seed = torch.zeros_like(z)
                seed[:, c] = (2.0 / C) ** 0.5
                yield seed.reshape(shape)


GRADIENT_LABELS = ("true", "sampled")


def check_gradient_labels(gradient_labels: str) -> None:
    if gradient_labels not in GRADIENT_LABELS:
        raise ValueError(f"gradient_labels={gradient_labels!r} is not supported; choose one of "
                         f"{', '.join(GRADIENT_LABELS)}")


def label_generator(seed: int, key) -> torch.Generator:
    """The CPU generator of the sampled labels of micro-batch ``key``: a function of (seed, key) only."""
    try:
        k = int(key)            # Python, numpy and 0-d tensor integers alike
    except (TypeError, ValueError):
        k = zlib.crc32(repr(key).encode())
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + (k + 1) * 0x632BE5AB + 0x5DEECE66D) % 2 ** 63)


def sampled_targets(logits: torch.Tensor, targets: torch.Tensor, loss: str,
                    generator: torch.Generator) -> torch.Tensor:
    """Targets of ``targets``' shape drawn from the model's predictive distribution at ``logits`` (module
    docstring); ignored CE positions stay -100.  Drawn on the CPU with ``generator`` (the same on every device)."""
    z, _, mask = _flat(logits.detach(), targets, loss)
    if loss == "cross_entropy":
        ys = torch.multinomial(_probs(z).double().cpu(), 1, generator=generator).squeeze(1).to(z.device)
        out = torch.where(mask, ys, torch.full_like(ys, IGNORE_INDEX))
        return out.reshape(targets.shape).to(targets.dtype)
    eps = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(device=z.device, dtype=z.dtype)
    return (z + (z.shape[-1] / 2.0) ** 0.5 * eps).reshape(targets.shape).to(logits.dtype)


def n_seeds(logits: torch.Tensor, fisher: str, mc_samples: int = 1) -> int:
    return {"empirical": 1, "mc": mc_samples, "type2": logits.shape[-1]}[fisher]


def hessian_quadratic(logits: torch.Tensor, targets: torch.Tensor, loss: str, zdot: torch.Tensor) -> torch.Tensor:
    """Σ_t żᵀ_t ∇²_z ℓ_t ż_t / N for a batch of logit tangents ``zdot`` (K, *logits.shape) → (K,).

    This is the Gauss–Newton quadratic form vᵀ Jᵀ H_ℓ J v once ż = J v is known.
    """
    return _quadratic(logits, targets, loss, zdot, False)[0]


def hessian_quadratic_bounded(logits: torch.Tensor, targets: torch.Tensor, loss: str,
                              zdot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`hessian_quadratic`, its magnitude Σ_t ż_tᵀ|∇²_z ℓ_t|ż_t / N), both (K,).  The magnitude bounds the
    sum of the absolute values of the products the quadratic form adds, so its rounding is a small multiple of
    ε·magnitude (:func:`within_rounding`).  CE: |diag p − p pᵀ| ≤ diag p + p pᵀ elementwise, so per row
    żᵀdiag(p)ż + (pᵀ|ż|)²; a direction that shifts a row's logits uniformly (ż ∝ 1, the softmax's null direction)
    has the form 0 in exact arithmetic and, computed, the rounding of the difference of these two terms.  MSE: the
    Hessian is (2/C) I, no cancellation: the magnitude is the form itself."""
    q, scale = _quadratic(logits, targets, loss, zdot, True)
    assert scale is not None
    return q, scale


def _quadratic(logits, targets, loss, zdot, bound: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    z, _, mask = _flat(logits.detach(), targets, loss)
    n = int(mask.sum())
    K = zdot.shape[0]
    zd = zdot.reshape(K, -1, z.shape[-1]).to(z.dtype)
    m = mask.to(z.dtype)
    scale = None
    if loss == "cross_entropy":
        p = _probs(z)
        pz = zd * p                                                    # one (K, R, C) temporary
        diag = torch.linalg.vecdot(pz, zd)                             # (K, R): żᵀ diag(p) ż
        q = diag - pz.sum(-1) ** 2
        if bound:
            scale = ((diag + pz.abs_().sum(-1) ** 2) * m[None]).sum(-1) / n    # p ≥ 0: |p ż| = p |ż|
    else:
        q = (2.0 / z.shape[-1]) * (zd * zd).sum(-1)
    q = (q * m[None]).sum(-1) / n
    if bound and scale is None:
        scale = q
    return q, scale


ROUNDING_C = 16.0
"""c of :func:`within_rounding` (see there; measured in tests/test_null_directions.py)."""


def rounding_eps(*dtypes: torch.dtype) -> float:
    """ε of the coarsest of ``dtypes`` (the dtypes the loss-level products were computed in), at most float32's: in
    half precision (``exact_dtype: model`` on a bf16 model) c·ε would be 1/8 and zero genuine values whose sums
    cancel to that degree, while PyTorch accumulates those sums in float32; a null direction's rounding in half
    precision is then left as it is (that mode's error is reported, not hidden)."""
    return max(min(torch.finfo(d).eps, torch.finfo(torch.float32).eps) for d in dtypes)


def within_rounding(value: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``value`` with every entry of |value| ≤ c·ε·scale (c = :data:`ROUNDING_C`) set to exactly 0: a sum whose
    terms' absolute values add up to ``scale`` is not resolved below its rounding, whose sign is chance."""
    return torch.where(value.abs() <= ROUNDING_C * eps * scale.to(value.device, value.dtype), torch.zeros_like(value),
                       value)


def gn_and_rounded(logits: torch.Tensor, targets: torch.Tensor, loss: str, zdot: torch.Tensor,
                   h: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(h, h^GN) for a route that has ż but not z̈ apart (the double backward, the param route): h^GN from ż, and
    both set to 0 within the rounding of żᵀ∇²ℓ ż (:func:`within_rounding` with the magnitude of
    :func:`hessian_quadratic_bounded`, a lower bound of h's: such a route zeroes no more than the jets would)."""
    q, scale = hessian_quadratic_bounded(logits, targets, loss, zdot)
    eps = rounding_eps(q.dtype, zdot.dtype, *(() if h is None else (h.dtype,)))
    return (None if h is None else within_rounding(h, scale, eps)), within_rounding(q, scale, eps)
