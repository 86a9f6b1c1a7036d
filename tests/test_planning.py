"""curvdist.runner.planning: a plan from config.json alone (meta-device skeleton) equals the plan from the checkpoint index."""
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import tiny

from curvdist.config import config_hash, load_config
from curvdist.io import checkpoint as ckpt
from curvdist.runner import planning
from curvdist.runner.plan import LayerCost, plan_stages

ROOT = Path(__file__).resolve().parents[1]
MAKERS = tiny.makers(4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random checkpoints of each family, sharded (several safetensors files and an index)."""
    return tiny.save_sharded(tmp_path_factory, MAKERS)


def _comparable(plan):
    d = plan.as_dict()
    d.pop("model"), d.pop("source")
    return d


@pytest.mark.parametrize("family", list(MAKERS))
@pytest.mark.parametrize("overrides", [["stages=2"], ["stages=3", "model.dtype=bfloat16", "stat_dtype=float64",
                                                       "factor_budget_gb=0.000002"]])
def test_config_json_plan_equals_checkpoint_plan(saved, tmp_path, family, overrides):
    path = saved[family]
    from_ckpt = planning.plan_from_config(load_config(None, [f"model.path={path}", *overrides]))
    assert from_ckpt.source == "checkpoint"
    # the same model without its weights: config.json alone, as model.config_json or as model.path's own
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path / "config.json", bare / "config.json")
    for extra in ([f"model.config_json={bare / 'config.json'}", "model.path=/nowhere"], [f"model.path={bare}"]):
        from_json = planning.plan_from_config(load_config(None, [*extra, *overrides]))
        assert from_json.source == "config.json"
        assert _comparable(from_json) == _comparable(from_ckpt)
        assert [l.name for l in from_json.layers] == [l.name for l in from_ckpt.layers]
    idx, meta = ckpt.CheckpointIndex.open(path), planning.index_from_hf_config(json.loads((path / "config.json")
                                                                                          .read_text()))
    key = lambda d: d["name"]
    assert sorted(idx.matrix_layers(), key=key) == sorted(meta.matrix_layers(), key=key)
    assert (meta.block_bytes, meta.embed_bytes, meta.head_bytes) == (idx.block_bytes, idx.embed_bytes, idx.head_bytes)


def test_plan_counts_the_forward_dtype_and_covers_the_model(saved):
    path = saved["llama"]
    idx = ckpt.CheckpointIndex.open(path)
    p32 = planning.plan_from_config(load_config(None, [f"model.path={path}", "stages=3"]))
    p16 = planning.plan_from_config(load_config(None, [f"model.path={path}", "stages=3", "model.dtype=bfloat16"]))
    # float32 on disk: the float32 plan holds exactly the stored bytes (+ the tied head's copy of the embedding)
    tied = idx.tensors[idx.names["model.embed_tokens.weight"]].nbytes
    assert p32.total_param_bytes == idx.total_bytes + tied == 2 * p16.total_param_bytes
    assert p32.total_factor_bytes == p16.total_factor_bytes
    s = p32.stages
    assert s[0].first_block == 0 and s[-1].last_block == idx.num_blocks - 1
    assert all(a.last_block + 1 == b.first_block for a, b in itertools.pairwise(s))
    assert sorted(n for x in s for n in x.layers) == sorted(l.name for l in p32.layers)
    assert s[0].has_embedding and s[-1].has_head and "lm_head" in s[-1].layers
    assert all(p32.worker_bytes(x) >= x.param_bytes for x in s)


def test_layer_selection_and_the_head_side(saved):
    path = saved["llama"]
    p = planning.plan_from_config(load_config(None, [f"model.path={path}", "stages=2", "layers=[lm_head]"]))
    assert p.stages[0].layers == [] and p.stages[1].layers == ["lm_head"]  # the head stays on the last stage
    p = planning.plan_from_config(load_config(None, [f"model.path={path}", "stages=2",
                                                     "layers=[model.layers.0.mlp.*]"]))
    assert p.stages[0].layers == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj",
                                  "model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="matches no analysable layer"):
        planning.plan_from_config(load_config(None, [f"model.path={path}", "layers=[model.layers.9.*]"]))
    # plan_stages itself: a side given explicitly wins over the position in the list
    plans = plan_stages([1, 1], 2, layers=[LayerCost("head", None, 2, 2, "head"), LayerCost("b0", 0, 2, 2)])
    assert plans[0].layers == ["b0"] and plans[1].layers == ["head"]


def test_passes_split_on_the_budget(saved):
    path = saved["llama"]
    big = planning.plan_from_config(load_config(None, [f"model.path={path}", "stages=1"]))
    assert [len(s.passes) for s in big.stages] == [1]
    small = planning.plan_from_config(load_config(None, [f"model.path={path}", "stages=1",
                                                         "factor_budget_gb=0.000005"]))  # ~5 kB
    assert len(small.stages[0].passes) > 1
    assert all(b <= small.factor_budget_bytes for s in small.stages for b in small.pass_bytes(s)
               if len(s.passes) > 1)
    assert small.over_budget() == ["lm_head"]  # C_δ 48×48×4 = 9 kB > 5 kB


def test_errors(tmp_path, saved, monkeypatch):
    monkeypatch.setenv("CURVDIST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="model.config_json"):
        planning.plan_from_config(load_config(None, [f"model.path={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        planning.plan_from_config(load_config(None, [f"model.config_json={tmp_path / 'x.json'}"]))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no model_type"):
        planning.plan_from_config(load_config(None, [f"model.config_json={tmp_path / 'bad.json'}"]))
    with pytest.raises(ValueError, match="stages<=4"):
        planning.plan_from_config(load_config(None, [f"model.path={saved['gpt2']}", "stages=5"]))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_builtin_plan_before_and_after_materialising(tmp_path, monkeypatch, name):
    from curvdist.io import sources

    monkeypatch.setenv("CURVDIST_CACHE", str(tmp_path))
    cfg = load_config(None, [f"model.name={name}", "stages=2"])
    before = planning.plan_from_config(cfg)  # from sources.TINY, nothing written
    assert before.source == "config.json" and not any(tmp_path.iterdir())
    sources.resolve_checkpoint(cfg.model)  # what a run does first
    after = planning.plan_from_config(cfg)
    assert after.source == "checkpoint" and _comparable(after) == _comparable(before)


def test_config_json_is_a_planning_aid_only():
    a = load_config(None, ["model.path=/m"])
    b = load_config(None, ["model.path=/m", "model.config_json=configs/models/llama2-7b.json"])
    assert b.model.config_json == "configs/models/llama2-7b.json" and config_hash(a) == config_hash(b)
    with pytest.raises(ValueError, match="model.config_json"):
        load_config(None, ["model.config_json=' '"])


@pytest.mark.parametrize("name, params", [("llama2-7b", 6_738_415_616), ("llama2-70b", 68_976_648_192)])
def test_shipped_llama2_configs_have_the_published_sizes(name, params):
    idx = planning.index_from_hf_config(planning.read_hf_config(ROOT / "configs" / "models" / f"{name}.json"))
    assert sum(math.prod(t.shape) for t in idx.tensors.values()) == params
