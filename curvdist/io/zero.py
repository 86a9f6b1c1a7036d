"""DeepSpeed checkpoints read in place: ZeRO stage 1, 2 and 3 ``global_stepN/`` folders and universal checkpoints.

    zc = open_zero("run/")                       # run/latest → run/global_step1000; reads no weights
    zc.tensors["model.layers.0.mlp.up_proj.weight"].shape
    zc.read(["model.layers.0.mlp.up_proj.weight"])   # only that tensor's fragments, from each rank file

Why: ZeRO keeps the fp32 master weights of a model as one flat vector per parameter group, cut into one partition per
data-parallel rank (``*_optim_states.pt``).  DeepSpeed's ``zero_to_fp32`` rebuilds the whole state dict in host
memory (≈ 280 GB for a 70B).  Here every rank file is unpickled on the ``meta`` device, which gives each stored
tensor's shape, dtype and byte offset inside the file (``untyped_storage()._checkpoint_offset``) without reading a
weight; the layout DeepSpeed uses (below) then says where each parameter's elements lie, and a stage reads exactly
those bytes (``readinto``), so no process ever holds more than its own parameters.

Layouts (W ranks, parameters in ``param_shapes`` order, n_p elements each):

- ZeRO 1/2: group g's full vector is the concatenation over ranks of ``single_partition_of_fp32_groups[g]``;
  parameter p occupies [o_p, o_p + n_p) of it, o_p = Σ_{q<p} (n_q + param_alignment_paddings[g][q]).
- ZeRO 3: parameter p has ⌈n_p / W⌉ elements on every rank, at the same offset of each rank's ``fp32_flat_groups``
  (groups concatenated); its full vector is the ranks' pieces concatenated, cut to n_p.
- Frozen parameters: ``frozen_param_fragments`` of the model-states file (ZeRO 3: one piece per rank, as above).
- Universal (``ds_to_universal``): one file per parameter, ``zero/<name>/fp32.pt``; converted from ZeRO 1/2 it
  holds ``{"param": tensor, "cat_dim": 0}`` (the tensor shaped), from ZeRO 3 the flat tensor itself.  Only the
  stage's own parameters' files are opened; ``exp_avg.pt`` and the other optimizer files beside them never.
- Tied parameters (``shared_params``) are not stored twice; the index reports them as tied.

Safety: every file is unpickled with ``torch.load(weights_only=True)``.  The few DeepSpeed objects its checkpoints
carry (loss scaler, ZeRO stage enum, fragment addresses) are mapped to an inert placeholder class, so neither
DeepSpeed's code nor anything a crafted file names runs; any other global is refused with
:class:`UnsafeCheckpointError`.  Reading needs no DeepSpeed installed.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

#: DeepSpeed globals its checkpoints pickle (metadata only): mapped to :class:`_Inert`, never imported.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.checkpoint.constants.CheckpointType")

#: Bytes read by :meth:`ZeroCheckpoint.read` in this process, by tensor name (tests assert what a stage read).
BYTES_READ: Counter = Counter()

_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_MODEL_STATES = re.compile(r"(?:^|_)mp_rank_\d+_model_states\.pt$")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file pickles a global that is not a plain value, tensor or known DeepSpeed metadata."""


class _Inert:
    """Stands for a DeepSpeed metadata object while unpickling: keeps the arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _safe_globals() -> list:
    return [(type(n.rsplit(".", 1)[1], (_Inert,), {}), n) for n in DEEPSPEED_GLOBALS]


def load_meta(file: Path):
    """Unpickle ``file`` (a ``torch.save`` zip) with every tensor on the meta device: shapes, dtypes and byte
    offsets, no weights read.  Weights only: anything but plain values, tensors and DeepSpeed metadata is refused."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(file, map_location="meta", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError for the same refusals
        msg = str(e)
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", msg)
        if m or "Weights only load failed" in msg:
            what = m.group(1) if m else "an object that is not a tensor or plain value"
            raise UnsafeCheckpointError(
                f"DeepSpeed checkpoint file {file} pickles {what}, which is code, not weights; curvdist loads "
                f"weights only and ran nothing. Re-save the checkpoint from a trusted DeepSpeed run, or convert a "
                f"trusted copy to safetensors (`curvdist convert`)") from None
        raise ValueError(f"DeepSpeed checkpoint file {file} cannot be read ({type(e).__name__}: {msg[:200]}); "
                         f"copy or save the checkpoint again") from None


@dataclass(frozen=True)
class Fragment:
    """``nbytes`` contiguous bytes of one tensor, at byte ``offset`` of ``file``."""
    file: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ZeroTensor:
    """One full parameter: the concatenation of its fragments, in order, reshaped."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fragments: tuple[Fragment, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ZeroCheckpoint:
    """A DeepSpeed checkpoint's parameters and where their bytes lie; built from metadata only."""
    path: Path                         # the tag folder (``global_stepN`` or a universal folder)
    kind: str                          # "zero1", "zero2", "zero3" or "universal"
    world_size: int
    tensors: dict[str, ZeroTensor]
    shared: dict[str, str]             # tied name → the stored name it equals
    ds_version: str | None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each read fragment by fragment into one buffer (counted in :data:`BYTES_READ`)."""
        out, handles = {}, {}
        try:
            for name in names:
                t = self.tensors[name]
                buf = torch.empty(math.prod(t.shape), dtype=t.dtype)
                view = memoryview(buf.view(torch.uint8).numpy())
                pos = 0
                for fr in t.fragments:
                    fh = handles.get(fr.file) or handles.setdefault(fr.file, open(fr.file, "rb"))  # noqa: SIM115
                    fh.seek(fr.offset)
                    got = fh.readinto(view[pos:pos + fr.nbytes])
                    if got != fr.nbytes:
                        raise ValueError(f"DeepSpeed checkpoint {self.path}: {fr.file.name} is truncated (tensor "
                                         f"{name}); copy or save the checkpoint again")
                    pos += fr.nbytes
                BYTES_READ[name] += pos
                out[name] = buf.view(t.shape)
        finally:
            for fh in handles.values():
                fh.close()
        return out


def open_index(path: Path, config_json: str | os.PathLike | None = None):
    """The :class:`curvdist.io.checkpoint.CheckpointIndex` of a DeepSpeed checkpoint: names and shapes from its
    metadata; config.json from ``config_json``, else from ``path``, the tag folder or the folder above it (an HF
    Trainer ``checkpoint-N`` holds it)."""
    from curvdist.io import checkpoint as ckpt

    zc = open_zero(path)
    if config_json is not None:
        cfg_file = Path(config_json).expanduser()
        cfg_file = cfg_file / "config.json" if cfg_file.is_dir() else cfg_file
        if not cfg_file.is_file():
            raise FileNotFoundError(f"model.config_json {config_json}: no such config.json")
    else:
        found = [d / "config.json" for d in (path, zc.path, zc.path.parent) if (d / "config.json").is_file()]
        if not found:
            raise FileNotFoundError(f"DeepSpeed checkpoint {path} has no config.json beside it (looked in {path}, "
                                    f"{zc.path} and {zc.path.parent}); set model.config_json to the model's "
                                    f"config.json (save it with `model.config.save_pretrained(DIR)`)")
        cfg_file = found[0]
    tensors = {n: ckpt.TensorInfo(n, t.shape, _DTYPE_CODES[t.dtype], t.nbytes, zc.path.name)
               for n, t in zc.tensors.items()}
    return ckpt._index(path, json.loads(cfg_file.read_text()), tensors, zero=zc, config_dir=cfg_file.parent)


# ------------------------------------------------------------------------------------------------- detection
def tag_folder(path: str | os.PathLike) -> Path | None:
    """The folder holding a DeepSpeed checkpoint's files, or None when ``path`` is not a DeepSpeed checkpoint:
    ``path`` itself (a ``global_stepN`` or universal folder), or the tag that ``path/latest_universal`` or
    ``path/latest`` names (universal first: it is what ``ds_to_universal`` wrote last)."""
    p = Path(path)
    if not p.is_dir():
        return None
    if _is_tag(p):
        return p
    for latest in ("latest_universal", "latest"):
        f = p / latest
        if f.is_file():
            tag = p / f.read_text().strip()
            if not _is_tag(tag):
                raise FileNotFoundError(f"DeepSpeed checkpoint {p}: {latest} names {tag.name}, which is not a "
                                        f"checkpoint folder here; copy the whole checkpoint, or point model.path at "
                                        f"one global_stepN folder")
            return tag
    return None


def _is_tag(p: Path) -> bool:
    return p.is_dir() and any(_MODEL_STATES.search(f.name) for f in p.iterdir())


def _steps(files: list[Path]) -> list[Path]:
    def rank(f: Path) -> int:
        m = re.search(r"zero_pp_rank_(\d+)_", f.name)
        return int(m.group(1)) if m else 0
    return sorted(files, key=rank)


# -------------------------------------------------------------------------------------------------- the index
def open_zero(path: str | os.PathLike) -> ZeroCheckpoint:
    """The parameters of the DeepSpeed checkpoint at ``path`` (see :func:`tag_folder`) and where they lie."""
    tag = tag_folder(path)
    if tag is None:
        raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint (no `latest` file and no "
                                f"*model_states.pt); point model.path at the folder DeepSpeed saved into")
    model_files = _steps([f for f in tag.iterdir() if _MODEL_STATES.search(f.name)])
    states = load_meta(model_files[0])
    if not isinstance(states, dict) or "param_shapes" not in states:
        raise ValueError(f"{model_files[0]} is not a DeepSpeed model-states file (no param_shapes)")
    shared = {str(k): str(v) for k, v in (states.get("shared_params") or {}).items()}
    version = states.get("ds_version")
    shapes = [(str(n), tuple(int(d) for d in s)) for g in states["param_shapes"] for n, s in g.items()]
    if (tag / "zero").is_dir():
        return ZeroCheckpoint(tag, "universal", 1, _universal(tag, shapes), shared, version)
    optim_files = _steps(sorted(tag.glob("*_optim_states.pt")))
    if not optim_files:
        raise FileNotFoundError(f"DeepSpeed checkpoint {tag}: no *_optim_states.pt (ZeRO keeps the fp32 weights "
                                f"there); copy the whole checkpoint folder")
    optims = [load_meta(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(_value(optims[0].get("zero_stage")))
    world = optims[0].get("partition_count")
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optim_files):
        raise ValueError(f"DeepSpeed checkpoint {tag}: {len(optim_files)} optimizer files for a world size of "
                         f"{world}; a rank's file is missing (an interrupted save?); use another global_stepN")
    if stage <= 2:
        groups = [[(f, t) for t in o["single_partition_of_fp32_groups"]] for f, o in zip(optim_files, optims)]
        tensors = _zero12(states["param_shapes"], groups, optims[0].get("param_alignment_paddings"), tag)
    else:
        groups = [[(f, t) for t in o["fp32_flat_groups"]] for f, o in zip(optim_files, optims)]
        tensors = _zero3(shapes, groups, tag)
    tensors.update(_frozen(states, model_files, stage, world))
    return ZeroCheckpoint(tag, f"zero{stage}", world, tensors, shared, version)


def _value(v):
    return v.args[0] if isinstance(v, _Inert) else v


def _span(file: Path, flat: torch.Tensor, start: int, count: int) -> Fragment:
    """``count`` elements of the 1-D stored tensor ``flat`` from element ``start``."""
    size = flat.dtype.itemsize
    base = flat.untyped_storage()._checkpoint_offset + flat.storage_offset() * size
    return Fragment(file, base + start * size, count * size)


def _pieces(parts: list[tuple[Path, torch.Tensor]], start: int, count: int) -> list[Fragment]:
    """Fragments of elements [start, start + count) of the concatenation of the 1-D tensors ``parts``."""
    out, at = [], 0
    for f, t in parts:
        n = t.numel()
        lo, hi = max(start, at), min(start + count, at + n)
        if lo < hi:
            out.append(_span(f, t, lo - at, hi - lo))
        at += n
    if sum(fr.nbytes for fr in out) != count * parts[0][1].dtype.itemsize:
        raise ValueError("DeepSpeed checkpoint: a parameter lies beyond its flat group (the files do not match "
                         "param_shapes); copy or save the checkpoint again")
    return out


def _zero12(param_shapes, groups, paddings, tag: Path) -> dict[str, ZeroTensor]:
    out = {}
    for g, shapes in enumerate(param_shapes):
        parts = [rank[g] for rank in groups]   # the group's full vector: rank partitions in rank order
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            shape = tuple(int(d) for d in shape)
            n = math.prod(shape)
            out[str(name)] = ZeroTensor(str(name), shape, parts[0][1].dtype, tuple(_pieces(parts, offset, n)))
            offset += n + (paddings[g][i] if paddings else 0)
        total = sum(t.numel() for _, t in parts)
        align = 2 * len(groups)
        if math.ceil(offset / align) * align != math.ceil(total / align) * align:
            raise ValueError(f"DeepSpeed checkpoint {tag}: param group {g} holds {total} elements but its "
                             f"parameters need {offset}; the files do not belong together")
    return out


def _zero3(shapes, groups, tag: Path) -> dict[str, ZeroTensor]:
    world = len(groups)
    out, offset = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        per_rank = math.ceil(n / world)
        frags, left = [], n
        for rank in groups:   # each rank holds ⌈n/W⌉ elements at the same offset; the last ones are padding
            take = min(per_rank, left)
            if take > 0:
                frags += _pieces(rank, offset, take)
            left -= take
        out[name] = ZeroTensor(name, shape, groups[0][0][1].dtype, tuple(frags))
        offset += per_rank
    held = sum(t.numel() for _, t in groups[0])
    if offset != held:
        raise ValueError(f"DeepSpeed checkpoint {tag}: each rank holds {held} elements but the parameters need "
                         f"{offset}; the files do not belong together")
    return out


def _frozen(states: dict, model_files: list[Path], stage: int, world: int) -> dict[str, ZeroTensor]:
    shapes = states.get("frozen_param_shapes") or {}
    if not shapes:
        return {}
    out = {}
    per_file = [load_meta(f).get("frozen_param_fragments") or {} for f in model_files] if stage == 3 \
        else [states.get("frozen_param_fragments") or {}]
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        pieces = [(f, frags[name].reshape(-1)) for f, frags in zip(model_files, per_file)]
        out[str(name)] = ZeroTensor(str(name), shape, pieces[0][1].dtype, tuple(_pieces(pieces, 0, n)))
    return out


def _universal(tag: Path, shapes: list[tuple[str, tuple]]) -> dict[str, ZeroTensor]:
    out = {}
    for name, shape in shapes:
        f = tag / "zero" / name / "fp32.pt"
        if not f.is_file():
            raise FileNotFoundError(f"universal checkpoint {tag}: no zero/{name}/fp32.pt; run ds_to_universal "
                                    f"again or copy the whole folder")
        held = load_meta(f)
        t = held.get("param") if isinstance(held, dict) else held
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"universal checkpoint {tag}: zero/{name}/fp32.pt holds no tensor (neither "
                             f"{{'param': tensor}} nor a tensor); run ds_to_universal again")
        # ZeRO 1/2 conversions store the shaped tensor; ZeRO 3 conversions the flat one (same elements, same order)
        if tuple(t.shape) not in (shape, (math.prod(shape),)) or not t.is_contiguous():
            raise ValueError(f"universal checkpoint {tag}: zero/{name}/fp32.pt holds shape {tuple(t.shape)}, "
                             f"param_shapes says {shape}")
        out[name] = ZeroTensor(name, shape, t.dtype, (_span(f, t.reshape(-1), 0, t.numel()),))
    return out
