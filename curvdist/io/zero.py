"""DeepSpeed ZeRO checkpoints as an input format, read with weights-only unpickling.

    state = read_zero_checkpoint("ckpt/global_step1000")   # fp32 state dict via DeepSpeed's zero_to_fp32
    model.load_state_dict(state); model.save_pretrained(dst)  # then analyse dst like any checkpoint
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def read_zero_checkpoint(path: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 state dict of a DeepSpeed ZeRO (stage 1-3) checkpoint directory, via DeepSpeed's own zero_to_fp32.
    Save it with ``save_pretrained`` (or :func:`convert` from the saved directory) to analyse it.

    Every ``torch.load`` DeepSpeed makes meanwhile is forced to ``weights_only=True`` (tensors, containers and
    plain values; DeepSpeed's own enums are allow-listed), so a crafted checkpoint cannot run code."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ImportError("reading DeepSpeed ZeRO checkpoints needs deepspeed: pip install curvdist[deepspeed]") from e
    if not Path(path).is_dir():
        raise FileNotFoundError(f"ZeRO checkpoint {path}: no such directory")
    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)


@contextlib.contextmanager
def weights_only_loads():
    """Inside, ``torch.load`` ignores ``weights_only=False`` (and pickled code) from any caller: weights only."""
    original = torch.load
    safe: list = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum  # DeepSpeed stores it in its optimizer states
        safe.append(ZeroStageEnum)
    except ImportError:
        pass

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(safe):
            yield
    finally:
        torch.load = original
