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
