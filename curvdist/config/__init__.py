"""Run configuration: one dataclass per concern, a default and help text on every field, validation in
``__post_init__``.  YAML files and ``key=value`` overrides only override the defaults.

    cfg = load_config("configs/quickstart.yaml", ["stages=2", "data.sequences=32", "layers=[h.0.*,h.1.*]"])
    run_id = resolve_run_id(cfg)          # cfg.run_id, or <model>-<config_hash[:10]>

Every field's help is in its metadata (``config_help()`` prints them all with their dotted keys).

The package's public face: the schema (the dataclasses, their choices, :class:`ConfigError`) lives in
:mod:`curvdist.config.schema`, loading and what is derived from a config (hash, run id, help) in
:mod:`curvdist.config.load`; callers import both through ``curvdist.config``.
"""
from curvdist.config.load import (
    HASH_DEFAULTS,
    HASH_EXCLUDE,
    config_hash,
    config_help,
    load_config,
    null_pairs,
    parse_override,
    resolve_run_id,
    to_dict,
)
from curvdist.config.schema import (
    ATTN_IMPLEMENTATIONS,
    BUILTIN_MODELS,
    DATA_SOURCES,
    DEVICES,
    DTYPES,
    EXACT_DTYPES,
    FILE_SOURCES,
    FISHERS,
    GRADIENT_LABELS,
    LOSSES,
    PLACEMENT_STRATEGIES,
    STAT_DTYPES,
    TRANSPORTS,
    ConfigError,
    DataConfig,
    HardwareConfig,
    ModelConfig,
    RayConfig,
    RunConfig,
    from_dict,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS", "BUILTIN_MODELS", "DATA_SOURCES", "DEVICES", "DTYPES", "EXACT_DTYPES", "FILE_SOURCES",
    "FISHERS", "GRADIENT_LABELS", "HASH_DEFAULTS", "HASH_EXCLUDE", "LOSSES", "PLACEMENT_STRATEGIES", "STAT_DTYPES",
    "TRANSPORTS", "ConfigError", "DataConfig", "HardwareConfig", "ModelConfig", "RayConfig", "RunConfig",
    "config_hash", "config_help", "from_dict", "load_config", "null_pairs", "parse_override", "resolve_run_id",
    "to_dict",
]
