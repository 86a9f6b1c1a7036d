"""Load: a deep, narrow model (64 blocks) over 4 stage actors on this 2-CPU machine completes, every layer is
written once, and each stage reports its peak memory (``benchmarks/bench_deep.py`` prints the figures)."""
import json

import pytest

from curvdist import config as C
from curvdist.io import query
from curvdist.runner import driver

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_64_blocks_over_4_stages(tmp_path, monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    torch.manual_seed(0)
    blocks = 64
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=blocks,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(tmp_path / "deep", max_shard_size="200KB")
    cfg = C.load_config(None, [f"model.path={tmp_path / 'deep'}", "stages=4", "data.source=synthetic",
                               "data.sequences=4", "data.seq_len=16", "data.micro_batch=2", "top_k=4", "plots=false",
                               "ray.num_cpus=2", f"exact_layers=[model.layers.{blocks - 1}.*]",
                               f"out={tmp_path / 'out'}"])
    import ray
    try:
        run_id = driver.main(cfg)
    finally:
        ray.shutdown()
    con = query.open(tmp_path / "out")
    rows = con.sql(f"select layer, stage, block, status, alpha from layers where run_id='{run_id}'").fetchall()
    measured = con.sql(f"select count(*) from directions where run_id='{run_id}' and h is not null "
                       f"and layer like 'model.layers.{blocks - 1}.%'").fetchall()[0][0]
    con.close()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)) == 7 * blocks + 1          # 7 matrices per block, plus the tied head
    assert {r[1] for r in rows} == {0, 1, 2, 3}
    assert {r[2] for r in rows if r[2] is not None} == set(range(blocks))
    assert measured == 7 * 4                                         # the last block got exact h (K = 4)
    timings = json.loads(query.read_run(tmp_path / "out", run_id)["timings_json"])
    peaks = timings["peak_rss_gb_per_worker"]
    assert len(peaks) == 4 and all(0 < p for p in peaks)
