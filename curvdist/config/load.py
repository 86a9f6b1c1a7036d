"""Where a :class:`~curvdist.config.schema.RunConfig` comes from and what is derived from it: the defaults
overridden by a YAML file and ``key=value`` items (:func:`load_config`), the plain dict (:func:`to_dict`), the hash
of what a run measures (:func:`config_hash`), the run id (:func:`resolve_run_id`), null-run pairs
(:func:`null_pairs`) and the help of every dotted key (:func:`config_help`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from curvdist.config.schema import ConfigError, RunConfig, from_dict

# keys dropped from the config hash at these values, so that runs written before the keys existed keep their hash:
# they measured every factor they could hold densely, as auto does within the budget (each row says its factor_mode)
HASH_DEFAULTS = {"gradient_labels": "true", "factor_mode": "auto", "sketch_rank": 512}
# keys that change where or how a run executes, not what it measures (distributed equals serial), so they do not
# enter config_hash and a run can be resumed with, e.g., more stages or another Ray cluster.  factor_budget_gb also
# decides, under factor_mode=auto, which factors are sketched; each row records its factor_mode and the error
# estimate of a sketched λ_k, so a resumed run with another budget stays readable (factor_mode itself is hashed)
HASH_EXCLUDE = ("out", "run_id", "plots", "ray", "stages", "replicas", "in_flight", "exact_chunk",
                "factor_budget_gb", "row_cache_gb", "hardware", "model.config_json",
                "model.trust_remote_code")


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of the config (JSON/YAML serialisable)."""
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def _field_type(cls: type, key: str) -> Any:
    """The annotation of a dotted key, or None when the key is unknown (from_dict then names it)."""
    tp: Any = cls
    for p in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if p not in hints:
            return None
        tp = hints[p]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` → (key, YAML-parsed value); a string field keeps the raw text (``run_id=007``)."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like key=value (e.g. stages=2, data.sequences=32)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse {raw!r} as YAML: {e}") from None
    if _field_type(RunConfig, key) is str and value is not None and not isinstance(value, str):
        value = raw.strip()
    return key, value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                trust_remote_code: bool = False) -> RunConfig:
    """Defaults, overridden by the YAML file at ``path`` (if any), overridden by ``key=value`` items.

    ``model.trust_remote_code`` comes only from ``trust_remote_code`` (the command line's ``--trust-remote-code``):
    a file or an override that turns it on is refused, so that a shared config cannot run code on its own."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ConfigError("<root>", f"{str(p)!r} must hold a mapping of config keys, got {type(d).__name__}")
    for item in overrides:
        _set_dotted(d, *parse_override(item))
    model = d.get("model")
    if isinstance(model, dict) and model.get("trust_remote_code") not in (None, False) and not trust_remote_code:
        raise ConfigError("model.trust_remote_code", "cannot be set in a config file or a key=value override (it "
                                                     "runs Python code from the checkpoint); pass "
                                                     "--trust-remote-code on the command line instead")
    if trust_remote_code:
        _set_dotted(d, "model.trust_remote_code", True)
    return from_dict(RunConfig, d)


def _measured(d: dict, drop: Sequence[str] = ()) -> dict:
    """A copy of a config dict without HASH_EXCLUDE and ``drop``, and without the keys of HASH_DEFAULTS at those
    values (so that the hashes of runs written before the keys existed stay valid)."""
    d = json.loads(json.dumps(d))
    for key, default in HASH_DEFAULTS.items():
        if d.get(key) == default or (key == "gradient_labels" and d.get(key) is True):
            d.pop(key, None)
    for key in (*HASH_EXCLUDE, *drop):
        *parents, last = key.split(".")
        sub = d
        for p in parents:   # a run written in process (curvdist.analyze) may hold a plain value there
            sub = (sub.get(p) if isinstance(sub, dict) else None) or {}
        if isinstance(sub, dict):
            sub.pop(last, None)
    return d


def config_hash(cfg: RunConfig) -> str:
    """Stable hash (16 hex digits) of what the run measures; ignores HASH_EXCLUDE (out, run_id, execution)."""
    d = _measured(to_dict(cfg))
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def null_pairs(configs: dict[str, dict]) -> dict[str, str]:
    """run_id → the run_id of its null run: among ``configs`` ({run_id: config dict, as stored in config_json}), a
    run with gradient_labels=sampled that measures the same thing otherwise (same config but for HASH_EXCLUDE)."""
    def key(d):
        return json.dumps(_measured(d, ("gradient_labels",)), sort_keys=True)

    nulls = {key(d): r for r, d in sorted(configs.items()) if d.get("gradient_labels") == "sampled"}
    return {r: nulls[key(d)] for r, d in sorted(configs.items())
            if d.get("gradient_labels", "true") in ("true", True) and key(d) in nulls}


def resolve_run_id(cfg: RunConfig) -> str:
    """``cfg.run_id``, or ``<model slug>-<config_hash[:10]>``."""
    if cfg.run_id:
        return cfg.run_id
    base = cfg.model.name or Path(str(cfg.model.gguf_file or cfg.model.path).rstrip("/")).name
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "-", base).strip(".-") or "run"
    return f"{slug}-{config_hash(cfg)[:10]}"


def config_help(cls: type = RunConfig, prefix: str = "") -> str:
    """One line per dotted key: default, choices and help."""
    lines = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines.append(config_help(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        lines.append(f"{key} = {json.dumps(default)}{extra}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
