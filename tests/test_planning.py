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


def test_factor_modes_of_the_70b_config():
    """factor_mode=auto sketches a stage's largest factors until it needs as few passes as with every factor
    sketched: the shipped 70B config goes from 3 groups to 1 in float32.  In float64 the G matrices alone of a
    3-block stage (20.6 GB) exceed the 16 GiB budget, so two groups are the least any mode can plan; dense needs 9.  With a 24 GiB budget
    (and 16 micro-batches in flight, so that an 80 GB GPU holds it) float64 needs one group too."""
    idx = planning.index_from_hf_config(planning.read_hf_config(ROOT / "configs" / "models" / "llama2-70b.json"))

    def plan(*o):
        return planning.plan_from_index(idx, load_config(ROOT / "configs" / "llama2-70b.yaml", list(o)), "config.json")

    groups = {}
    for o in [(), ("factor_mode=dense",), ("stat_dtype=float64",), ("stat_dtype=float64", "factor_mode=dense")]:
        p = plan(*o)
        groups[o] = max(len(s.passes) for s in p.stages)
        assert all(b <= p.factor_budget_bytes for s in p.stages for b in p.pass_bytes(s))
        assert p.over_budget() == []
    assert groups == {(): 1, ("factor_mode=dense",): 3, ("stat_dtype=float64",): 2,
                      ("stat_dtype=float64", "factor_mode=dense"): 9}
    p = plan("stat_dtype=float64")
    three = next(s for s in p.stages if len(s.blocks) == 3)
    by = {l.name: l for l in p.layers}
    assert sum(by[n].m * by[n].n * 8 for n in three.layers) > p.factor_budget_bytes   # G alone needs two passes
    roomy = plan("stat_dtype=float64", "factor_budget_gb=24", "in_flight=16")   # what the config comment offers
    assert max(len(s.passes) for s in roomy.stages) == 1 and roomy.over_budget() == []
    for st in p.stages:                            # largest first: no dense factor wider than a sketched one
        dims = [(d, m) for n in st.layers for d, m in zip((by[n].n, by[n].m), by[n].modes)]
        assert min(d for d, m in dims if m == "sketch") >= max((d for d, m in dims if m == "dense" and d > 1044),
                                                               default=0)
    assert p.as_dict()["sketched_factors"] == sum(m == "sketch" for l in p.layers for m in l.modes) > 0


def test_a_128k_vocabulary_head_is_planned_in_sketch_mode(tmp_path):
    """C_δ of a 128000-word head is 128000² float32 = 65.5 GB: over any budget dense (factor_mode=dense: not
    measured), a sketch of 2 × 128000 × 522 float32 = 0.53 GB under auto."""
    cfg_json = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128000,
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    auto = planning.plan_from_config(load_config(None, [f"model.path={tmp_path}", "layers=[lm_head]"]))
    (head,) = auto.layers
    assert (head.m, head.n) == (128000, 64) and head.modes == ("dense", "sketch")
    assert auto.over_budget() == [] and auto.sketched() == ["lm_head"]
    assert auto.stages[0].modes["lm_head"] == ("dense", "sketch")
    assert head.factor_bytes(4) == 128000 * 64 * 4 + 64 * 64 * 4 + 2 * 128000 * 522 * 4
    dense = planning.plan_from_config(load_config(None, [f"model.path={tmp_path}", "layers=[lm_head]",
                                                         "factor_mode=dense"]))
    assert dense.over_budget() == ["lm_head"] and dense.layers[0].modes == ("dense", None)


def test_auto_sketches_largest_factors_first_and_only_as_needed():
    layers = [LayerCost("a", 0, 2000, 2000), LayerCost("b", 0, 3000, 1000), LayerCost("c", 1, 100, 100)]
    budget = 50_000_000   # float32: G 16 + 12 + 0.04 MB, C 16 / 16 / 36 / 4 MB dense, sketch (l = 64) ~1-2 MB
    plans = plan_stages([1, 1], 1, layers=layers, stat_bytes=4, factor_budget_bytes=budget,
                        worker_budget_bytes=budget, factor_mode="auto", sketch_rank=64)
    modes = plans[0].modes
    assert len(plans[0].passes) == 1
    assert modes["b"] == ("dense", "sketch") and modes["c"] == ("dense", "dense")   # 3000² first, then enough
    assert sum(l.factor_bytes(4) for l in layers) <= budget
    dense = plan_stages([1, 1], 1, layers=layers, stat_bytes=4, factor_budget_bytes=budget,
                        worker_budget_bytes=budget, factor_mode="dense")
    assert len(dense[0].passes) == 3 and dense[0].modes["b"] == ("dense", "dense")
    every = plan_stages([1, 1], 1, layers=layers, stat_bytes=4, factor_budget_bytes=budget,
                        worker_budget_bytes=budget, factor_mode="sketch", sketch_rank=64)
    assert all(m == ("sketch", "sketch") for m in every[0].modes.values())
