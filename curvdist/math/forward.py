"""Calling a model on a micro-batch.  Pure: tensors in, tensors out.

A micro-batch is ``(inputs, targets)``; ``inputs`` is a tensor (``model(inputs)``) or a mapping of keyword tensors
(``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``).  The model's output is a tensor, a tuple whose first
item is the logits, or an object with ``.logits`` (Hugging Face).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def model_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in the model output of type {type(out).__name__}")


def row_mask(inputs: Any) -> torch.Tensor | None:
    """(B, T) bool mask of real (non-padding) positions, from ``attention_mask`` when the inputs carry one."""
    if isinstance(inputs, Mapping) and inputs.get("attention_mask") is not None:
        return inputs["attention_mask"].bool()
    return None


def to_device(obj: Any, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Any:
    """Move a tensor or a mapping/tuple of tensors; floating tensors are cast to ``float_dtype`` when given."""
    if isinstance(obj, torch.Tensor):
        if float_dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=float_dtype)
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, float_dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device, float_dtype) for v in obj)
    return obj


def first_rows(obj: Any, n: int, batch: int) -> Any:
    """The first ``n`` rows of every tensor (or mapping/tuple of tensors) whose leading dimension is ``batch``."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, Mapping):
        return {k: first_rows(v, n, batch) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(first_rows(v, n, batch) for v in obj)
    return obj


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).shape[0]
    return inputs.shape[0]


@contextlib.contextmanager
def second_order_attention():
    """Scaled-dot-product attention through the MATH kernel, which supports double backward and forward-mode AD
    (the fused CPU flash kernel supports neither)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


EXACT_DTYPES = ("float32", "float64", "model")


def exact_torch_dtype(exact_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the exact HVPs: ``model`` keeps the model's; float32/float64 upcast (never down: a float64
    model keeps float64 under ``float32``, so validation runs stay exact)."""
    if exact_dtype not in EXACT_DTYPES:
        raise ValueError(f"exact_dtype={exact_dtype!r}: choose one of {', '.join(EXACT_DTYPES)}")
    if exact_dtype == "model":
        return model_dtype
    want = torch.float64 if exact_dtype == "float64" else torch.float32
    return want if torch.finfo(want).bits >= torch.finfo(model_dtype).bits else model_dtype


@contextlib.contextmanager
def parameters_in(module: nn.Module, dtype: torch.dtype):
    """Cast ``module``'s parameters (not its buffers: rotary frequencies and the like keep their dtype) to ``dtype``
    inside the block and back after.  Casting up and back is lossless, so the module computes as before after."""
    params = list(module.parameters())
    old = [p.dtype for p in params]
    if all(d == dtype for d in old):
        yield module
        return
    try:
        for p in params:
            p.data = p.data.to(dtype)
        yield module
    finally:
        for p, d in zip(params, old):
            p.data = p.data.to(d)
