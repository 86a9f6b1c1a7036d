"""Checks of a run's inputs before anything starts: no Ray, no stage actor, no output written.

    check(cfg)        # `curvdist run` (first thing in curvdist.runner.driver.main): output, model, plan, data
    check_plan(cfg)   # `curvdist plan`: the model directory only (planning may go from a config.json alone)

Every failure is a :class:`PreflightError` (a ``ValueError``, which the command line turns into one line on stderr
and exit status 2) whose message names the problem and the fix.  What is checked, in order:

- ``out``: not an existing file; writable (a hidden file is created and removed in it or in its nearest existing
  parent, which is never created here); an existing dataset has this curvdist's schema version;
- the checkpoint: the directory exists and holds config.json; no remote code (``auto_map``) unless
  ``--trust-remote-code``; a supported architecture; every shard the index names exists; every safetensors
  header parses and the file is as long as its header says (a truncated download is caught without reading a
  weight);
- the plan: ``layers`` and ``exact_layers`` patterns match analysable layers; ``stages`` <= blocks;
- memory: every stage's estimated peak (:mod:`curvdist.runner.memory`: weights, factors, activations of the
  micro-batches in flight, cached inputs, spectral and exact workspaces) fits the device memory, read from the GPU
  the driver sees (or the host's RAM for device=cpu, shared by every stage of a local cluster); on a remote cluster
  the driver may see no GPU, or another kind than the workers': then ``hardware.device_memory_gb`` or
  ``hardware.gpu`` is used, and without either the check is skipped with a warning;
- the data: the file exists and is not empty, a tokenizer is there when the source is text, and there are enough
  tokens for ``data.sequences`` × ``data.seq_len`` (text files up to 16 MB are tokenized here; larger ones and the
  builtin sources are checked by the driver, still before Ray starts).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

from curvdist.config import FILE_SOURCES, RunConfig
from curvdist.io import query, store
from curvdist.vocab import STAGE_MODEL_TYPES, STAGE_MODELS_TEXT, matches

_TOKENIZE_MAX_BYTES = 16 * 2**20
_REFETCH = "download, copy or convert the checkpoint again"


class PreflightError(ValueError):
    """A run's input is unusable; the message names the problem and the fix (one line)."""


class MemoryCheckSkipped(UserWarning):
    """The device memory is unknown (a remote cluster without hardware.gpu / hardware.device_memory_gb)."""


def check(cfg: RunConfig):
    """Every check a run needs before Ray starts; raises PreflightError.  Materialises a builtin model (into the
    cache, atomically) as the run would.  Returns ``(checkpoint directory, CheckpointIndex)`` for the run to use."""
    from curvdist.io import sources
    from curvdist.io.checkpoint import CheckpointIndex
    from curvdist.io.sources import resolve_checkpoint

    check_output(cfg.out)
    m = cfg.model
    if m.path:
        p = Path(m.path).expanduser()
        if not p.exists():
            raise PreflightError(f"model.path={m.path!r} does not exist; point model.path at a Hugging Face "
                                 f"checkpoint directory (config.json + *.safetensors), or use a builtin model "
                                 f"(model.name=tiny-gpt2)")
        if p.is_file() and p.suffix != ".gguf":
            raise PreflightError(f"model.path={m.path!r} is a file, not a checkpoint directory; point it at the "
                                 f"directory that holds config.json, or convert it: `curvdist convert {m.path} DST`")
    ckpt = resolve_checkpoint(m)
    index = check_deepspeed(ckpt, m)
    if index is None:
        check_checkpoint(ckpt, trust_remote_code=m.trust_remote_code)
        index = CheckpointIndex.open(ckpt)
    index.trust_remote_code = m.trust_remote_code
    check_architecture(index)
    plan = check_layers(index, cfg)
    check_data(cfg, sources.tokenizer_dir(m, ckpt, index), index.config.get("vocab_size"))
    check_memory(cfg, plan)
    return ckpt, index


def check_plan(cfg: RunConfig) -> None:
    """The checks that apply to `curvdist plan`: a local checkpoint directory is whole and runnable; a plan from
    ``model.config_json`` alone (the checkpoint is elsewhere) checks that file's architecture."""
    m = cfg.model
    if m.path:
        p = Path(m.path).expanduser()
        if p.is_dir() and not m.gguf_file and (p / "config.json").is_file():
            check_checkpoint(p, trust_remote_code=m.trust_remote_code,
                             weights=any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists())
        elif not p.exists() and not m.config_json:
            raise PreflightError(f"model.path={m.path!r} does not exist; point it at the checkpoint directory, or "
                                 f"set model.config_json to plan from its config.json alone")
    if m.config_json:
        f = Path(m.config_json).expanduser()
        f = f / "config.json" if f.is_dir() else f
        if f.is_file():
            _check_config(_read_json(f, "model.config_json"), f, m.trust_remote_code)


# ------------------------------------------------------------------------------------------------------ output
def check_output(out: str | os.PathLike) -> None:
    """``out`` can be written to (without creating it) and holds no dataset of another schema version."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise PreflightError(f"out={str(out)!r} is an existing file, not a directory; choose another out (a new "
                             f"directory, or the directory of an earlier run to add to it)")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PreflightError(f"out={str(out)!r}: {parent} is a file, so the directory cannot be created; choose "
                             f"another out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".curvdist-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(f"out={str(out)!r} is not writable (cannot create a file in {parent}: "
                             f"{e.strerror or e}); choose another out or fix the directory's permissions") from None
    if p.is_dir() and query.is_dataset(p):
        try:
            found, where = query.dataset_schema_version(p)
        except ValueError as e:
            raise PreflightError(f"out={str(out)!r}: {e}") from None
        if where is not None and found != store.SCHEMA_VERSION:
            raise PreflightError(f"out={str(out)!r} holds a curvdist dataset of schema version {found} (in {where}); "
                                 f"this curvdist writes schema version {store.SCHEMA_VERSION}; use another out "
                                 f"(or the curvdist that wrote it)")


# -------------------------------------------------------------------------------------------------- checkpoint
def _read_json(f: Path, what: str) -> dict:
    try:
        d = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreflightError(f"{what}: {f} is not readable JSON ({e}); {_REFETCH}") from None
    if not isinstance(d, dict):
        raise PreflightError(f"{what}: {f} holds {type(d).__name__}, not a JSON object; {_REFETCH}")
    return d


def _check_config(config: dict, where: Path, trust_remote_code: bool) -> None:
    if "auto_map" in config and not trust_remote_code:
        raise PreflightError(f"{where} asks for remote code (auto_map: {', '.join(config['auto_map'])}); curvdist "
                             f"runs no code from a checkpoint unless you pass --trust-remote-code on the command line")
    mt = config.get("model_type")
    if mt not in STAGE_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) or "no architectures"
        raise PreflightError(f"{where}: unsupported architecture (model_type {mt!r}, {arch}); curvdist runs "
                             f"{STAGE_MODELS_TEXT}; use a checkpoint of one of these")


def check_checkpoint(path: Path, *, trust_remote_code: bool = False, weights: bool = True) -> None:
    """config.json is there, supported and asks for no remote code; shards are present and whole."""
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise PreflightError(f"checkpoint {path} is not a directory; point model.path at the directory that holds "
                             f"config.json and *.safetensors")
    if not cfg_file.is_file():
        raise PreflightError(f"checkpoint {path} has no config.json, so it is not a Hugging Face model directory; "
                             f"point model.path at the directory that holds config.json and *.safetensors (a GGUF "
                             f"file: set model.gguf_file; other formats: `curvdist convert SRC DST`)")
    _check_config(_read_json(cfg_file, "config.json"), cfg_file, trust_remote_code)
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file() and not trust_remote_code and "auto_map" in _read_json(tok_cfg, "tokenizer_config.json"):
        raise PreflightError(f"{tok_cfg} asks for remote code (auto_map); curvdist runs no code from a checkpoint "
                             f"unless you pass --trust-remote-code on the command line")
    if weights:
        for f in shard_files(path):
            check_shard(f)


def check_deepspeed(path: Path, m):
    """The index of a DeepSpeed checkpoint at ``path`` (its metadata read weights-only, its config.json supported
    and asking for no remote code), or None when ``path`` holds safetensors or is no DeepSpeed checkpoint."""
    from curvdist.io import zero
    from curvdist.io.checkpoint import CheckpointIndex

    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    try:
        if zero.tag_folder(path) is None:
            return None
        index = CheckpointIndex.open(path, m.config_json)
    except (FileNotFoundError, ValueError) as e:   # UnsafeCheckpointError included: nothing ran
        raise PreflightError(str(e)) from None
    _check_config(index.config, index.config_dir / "config.json", m.trust_remote_code)
    return index


def shard_files(path: Path) -> list[Path]:
    """The safetensors files a checkpoint directory is read from (every shard its index names must exist)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = _read_json(index, index.name).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise PreflightError(f"{index} has no weight_map; {_REFETCH}")
        names = sorted(set(map(str, wm.values())))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise PreflightError(f"{index} names {len(missing)} shard(s) that do not exist in {path}: "
                                 f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}; {_REFETCH}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        has = f" (it has {', '.join(other[:3])})" if other else ""
        raise PreflightError(f"checkpoint {path} holds no *.safetensors{has}; convert it once: "
                             f"`curvdist convert {path} DST` and point model.path at DST")
    return files


def check_shard(f: Path) -> None:
    """A safetensors file's header parses and the file holds every byte the header's offsets promise."""
    from curvdist.io.checkpoint import read_header

    try:
        read_header(f)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_architecture(index) -> None:
    """A stage can be built from the checkpoint's class (``config.architectures``)."""
    from curvdist.io import slice as stages

    try:
        stages.model_class(index)
    except (NotImplementedError, ValueError, AttributeError, KeyError) as e:
        raise PreflightError(f"checkpoint {index.path}: unsupported architecture "
                             f"({index.architecture or index.config.get('model_type')}: {e}); curvdist runs "
                             f"{STAGE_MODELS_TEXT}") from None


def check_layers(index, cfg: RunConfig):
    """``layers`` and ``exact_layers`` select analysable layers and ``stages`` <= blocks (the plan's own errors).
    Returns the :class:`curvdist.runner.planning.Plan`."""
    from curvdist.runner.planning import plan_from_index

    plan = plan_from_index(index, cfg)  # stages > blocks and layer patterns that match nothing raise here
    names = [c.name for c in plan.layers]
    for pat in (cfg.exact_layers or []) if cfg.exact else []:
        if not any(matches(n, [pat]) for n in names):
            raise PreflightError(f"exact_layers: pattern {pat!r} matches none of the analysed layers ("
                                 f"{', '.join(names[:4])} … {len(names)} in all); fix the pattern, or use "
                                 f"exact_layers=null for every analysed layer")
    return plan


def check_memory(cfg: RunConfig, plan) -> None:
    """Every stage's estimated peak fits the device memory (:mod:`curvdist.runner.estimate` says where the figure
    comes from at run time); the error names the stage, the pass, its largest parts and the fix."""
    from curvdist.runner.estimate import estimate
    from curvdist.runner.memcheck import OverMemory

    if plan.arch is None:
        warnings.warn(f"device memory not checked: no memory model for family {plan.family!r}", MemoryCheckSkipped,
                      stacklevel=2)
        return
    est = estimate(cfg, plan, at_run_time=True)
    if est.device_memory.bytes is None:
        warnings.warn(f"device memory not checked: {est.device_memory.source}", MemoryCheckSkipped, stacklevel=2)
        return
    try:
        est.check()
    except OverMemory as e:
        raise PreflightError(str(e)) from None


# -------------------------------------------------------------------------------------------------------- data
def check_data(cfg: RunConfig, ckpt: Path, vocab_size: int | None = None) -> None:
    """The data file exists and is not empty, a text source has a tokenizer, and there are enough tokens."""
    from curvdist.io import data as D
    from curvdist.io.sources import load_tokenizer

    d = cfg.data
    size = None
    if d.source in FILE_SOURCES:
        p = Path(str(d.path)).expanduser()
        if not p.exists():
            raise PreflightError(f"data.path={d.path!r} does not exist (data.source={d.source!r}); point data.path "
                                 f"at an existing file, or use data.source=pydoc or synthetic")
        if not p.is_file():
            raise PreflightError(f"data.path={d.path!r} is not a file (data.source={d.source!r}); point it at a file")
        size = p.stat().st_size
        if size == 0:
            raise PreflightError(f"data.path={d.path!r} is empty (0 bytes, data.source={d.source!r}); give a file "
                                 f"with {'token ids' if d.source == 'npy' else 'text'}, or use data.source=pydoc "
                                 f"or synthetic")
    tok = None
    if d.source in D.TEXT_SOURCES:
        tok = load_tokenizer(ckpt, trust_remote_code=cfg.model.trust_remote_code)
        if tok is None:
            raise PreflightError(f"data.source={d.source!r} needs the model's tokenizer but checkpoint {ckpt} has "
                                 f"none (no tokenizer.json / tokenizer_config.json); use data.source=npy (token "
                                 f"ids) or synthetic, or add the model's tokenizer files to {ckpt}")
    if d.source == "npy" or (size is not None and size <= _TOKENIZE_MAX_BYTES):
        try:
            D.token_matrix(d, tok, vocab_size)  # "not enough tokens: … has N tokens …, needs M" and the like
        except (TypeError, KeyError) as e:
            raise PreflightError(str(e.args[0] if e.args else e)) from None
