"""curvdist.config: defaults, YAML, dotted overrides, validation messages, hashing; every file in configs/."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from curvdist.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RayConfig,
    RunConfig,
    config_hash,
    config_help,
    from_dict,
    load_config,
    resolve_run_id,
    to_dict,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml"))


def test_defaults_are_valid_and_documented():
    cfg = RunConfig()
    assert cfg == load_config()
    assert (cfg.top_k, cfg.fisher, cfg.stages, cfg.layers, cfg.device) == (20, "empirical", 1, None, "auto")
    assert cfg.model.attn_implementation == "sdpa" and cfg.model.name == "tiny-gpt2"
    for cls in (RunConfig, ModelConfig, DataConfig, RayConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert "data.sequences" in config_help() and "ray.placement_strategy" in config_help()


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"top_k": 5, "data": {"source": "synthetic", "seq_len": 16},
                                 "ray": {"cpus_per_stage": 0.5}}))
    cfg = load_config(p, ["stages=2", "top_k=10", "data.sequences=32", "layers=[a.*,b]", "ray.address=null",
                          "run_id=007", "fisher=mc", "mc_samples=4", "exact=false"])
    assert cfg.top_k == 10 and cfg.stages == 2 and cfg.layers == ["a.*", "b"]
    assert cfg.data.source == "synthetic" and cfg.data.seq_len == 16 and cfg.data.sequences == 32
    assert cfg.data.micro_batch == DataConfig().micro_batch  # untouched keys keep their defaults
    assert cfg.ray.cpus_per_stage == 0.5 and cfg.ray.address is None
    assert cfg.run_id == "007" and cfg.fisher == "mc" and cfg.mc_samples == 4 and cfg.exact is False
    assert load_config(None, ["layers=model.layers.0.*"]).layers == ["model.layers.0.*"]
    assert isinstance(load_config(None, ["factor_budget_gb=2"]).factor_budget_gb, float)
    assert load_config(None, ["row_cache_gb=0"]).row_cache_gb == 0.0   # no row cache: the projections pass streams


def test_model_path_replaces_builtin_name():
    cfg = load_config(None, ["model.path=/models/llama"])
    assert cfg.model.path == "/models/llama" and cfg.model.name is None
    assert resolve_run_id(cfg).startswith("llama-")
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["model.name=null"])


@pytest.mark.parametrize("override, key, words", [
    (["fisher=foo"], "fisher", "empirical, mc, type2"),
    (["data.source=csv"], "data.source", "pydoc, text, jsonl, parquet, npy, synthetic"),
    (["model.name=gpt5"], "model.name", "tiny-gpt2"),
    (["model.dtype=float16"], "model.dtype", "bfloat16"),
    (["device=tpu"], "device", "auto, cpu, cuda"),
    (["ray.placement_strategy=ANY"], "ray.placement_strategy", "PACK, SPREAD"),
    (["data.sequencs=3"], "data.sequencs", "did you mean 'sequences'"),
    (["topk=3"], "topk", "valid keys: model, data"),
    (["stages=0"], "stages", "> 0"),
    (["top_k=2.5"], "top_k", "integer"),
    (["gn=maybe"], "gn", "true or false"),
    (["data.source=jsonl"], "data.path", "required"),
    (["data.seq_len=1"], "data.seq_len", ">= 2"),
    (["layers=[]"], "layers", "null"),
    (["run_id=a/b"], "run_id", "letters"),
    (["ray.cpus_per_stage=0"], "ray.cpus_per_stage", "> 0"),
    (["row_cache_gb=-1"], "row_cache_gb", ">= 0"),
    (["row_cache_gb=.inf"], "row_cache_gb", "or 0 to keep no rows"),
    (["data=3"], "data", "mapping"),
    (["stages"], "stages", "key=value"),
])
def test_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert e.value.key == key and repr(key) in str(e.value) and words in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  nmae: x\n")
    with pytest.raises(ConfigError, match=r"'model.nmae'.*valid keys under 'model': path, name"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_roundtrip_and_hash():
    cfg = load_config(None, ["stages=2", "data.sequences=16", "layers=[x]"])
    d = to_dict(cfg)
    assert from_dict(RunConfig, d) == cfg
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    h = config_hash(cfg)
    assert h == config_hash(load_config(None, ["layers=[x]", "data.sequences=16", "stages=2"])) and len(h) == 16
    assert h == config_hash(from_dict(RunConfig, d))
    # where and how a run executes does not change what it measures
    assert h == config_hash(load_config(None, ["stages=4", "data.sequences=16", "layers=[x]", "out=/elsewhere",
                                               "ray.address=auto", "plots=false", "run_id=mine"]))
    assert h != config_hash(load_config(None, ["stages=2", "data.sequences=17", "layers=[x]"]))
    assert h != config_hash(load_config(None, ["stages=2", "data.sequences=16", "layers=[x]", "fisher=type2"]))


def test_resolve_run_id():
    cfg = RunConfig()
    assert resolve_run_id(cfg) == f"tiny-gpt2-{config_hash(cfg)[:10]}"
    assert resolve_run_id(load_config(None, ["run_id=mine"])) == "mine"


def test_nested_construction_validates():
    with pytest.raises(ConfigError, match="sequences"):
        DataConfig(sequences=0)
    cfg = RunConfig(data={"source": "synthetic"}, ray=RayConfig(num_cpus=2))
    assert isinstance(cfg.data, DataConfig) and cfg.ray.num_cpus == 2


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert resolve_run_id(cfg)


def test_gradient_labels_key_hash_and_null_pairs(tmp_path):
    """gradient_labels: true | sampled (YAML's boolean true accepted); the default leaves every config hash as it
    was before the key existed; sampled is its own run; null_pairs finds a run's null run."""
    import hashlib
    import json

    from curvdist.config import HASH_EXCLUDE, null_pairs

    p = tmp_path / "c.yaml"
    p.write_text("gradient_labels: true\n")
    assert load_config(p).gradient_labels == "true"
    p.write_text("gradient_labels: sampled\n")
    assert load_config(p).gradient_labels == "sampled"
    assert load_config(None, ["gradient_labels=true"]).gradient_labels == "true"
    with pytest.raises(ConfigError, match=r"'gradient_labels'.*true, sampled"):
        load_config(None, ["gradient_labels=noise"])
    cfg = load_config(None, ["data.sequences=16"])
    old = to_dict(cfg)
    for key in ("gradient_labels", "factor_mode", "sketch_rank"):   # keys added since
        old.pop(key)
    for key in HASH_EXCLUDE:
        *parents, last = key.split(".")
        sub = old
        for q in parents:
            sub = sub.get(q) or {}
        sub.pop(last, None)
    assert config_hash(cfg) == hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
                                              ).hexdigest()[:16]
    null = load_config(None, ["data.sequences=16", "gradient_labels=sampled", "stages=3", "out=elsewhere"])
    assert config_hash(null) != config_hash(cfg) and resolve_run_id(null) != resolve_run_id(cfg)
    other = load_config(None, ["data.sequences=32"])
    legacy = to_dict(other)
    for key in ("gradient_labels", "factor_mode", "sketch_rank"):   # a run written before the keys existed
        legacy.pop(key)
    pairs = null_pairs({"t": to_dict(cfg), "n": to_dict(null), "o": legacy})
    assert pairs == {"t": "n"}


def test_factor_mode_and_sketch_rank_keys():
    """factor_mode: dense | sketch | auto (default auto); sketch_rank ≥ top_k + 2.  Both change what is measured,
    so a non-default value changes the hash; the defaults leave the hashes of runs written before the keys existed
    as they were (those measured every factor they could hold densely, as auto does within the budget)."""
    cfg = load_config(None, [])
    assert cfg.factor_mode == "auto" and cfg.sketch_rank >= cfg.top_k + 2
    with pytest.raises(ConfigError, match=r"'factor_mode'.*dense, sketch, auto"):
        load_config(None, ["factor_mode=nystrom"])
    with pytest.raises(ConfigError, match=r"'sketch_rank'.*top_k \+ 2 = 22"):
        load_config(None, ["sketch_rank=21"])
    hashes = {config_hash(load_config(None, o)) for o in ([], ["factor_mode=dense"], ["factor_mode=sketch"],
                                                          ["sketch_rank=256"])}
    assert len(hashes) == 4
    assert config_hash(load_config(None, ["factor_budget_gb=1"])) == config_hash(cfg)   # where, not what


def test_null_pairs_tolerates_in_process_runs():
    """A dataset mixing runner runs with runs written in process (curvdist.analyze: ``model`` is a plain string)."""
    from curvdist.config import null_pairs

    runs = {"a": {"model": {"path": "m"}, "top_k": 5}, "a-null": {"model": {"path": "m"}, "top_k": 5,
                                                                  "gradient_labels": "sampled"},
            "minilm": {"model": "all-MiniLM-L6-v2", "top_k": 20}}
    assert null_pairs(runs) == {"a": "a-null"}
