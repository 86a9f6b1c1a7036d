"""curvdist.runner.cost: FLOPs against counts made here from LLaMA-2-7B's shapes, scaling in K and replicas, bytes
between stages, and the time at a stated throughput."""
from pathlib import Path

import pytest

from curvdist.config import load_config
from curvdist.runner import estimate, planning
from curvdist.runner.cost import PassCost, Throughput, Work

ROOT = Path(__file__).resolve().parents[1]
LLAMA7B = ROOT / "configs" / "llama2-7b-8gpu.yaml"
H, F, V = 4096, 11008, 32000


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _est(*overrides):
    cfg = load_config(LLAMA7B, list(overrides))
    plan = planning.plan_from_config(cfg)
    return plan, estimate.estimate(cfg, plan)


def _pass(est, name):
    return next(p for p in est.cost.passes if p.name == name)


def test_statistics_pass_is_six_flops_per_parameter_and_token_plus_the_factors():
    _, est = _est()
    tokens = 64 * 512
    matrices = 32 * (4 * H * H + 3 * H * F) + V * H              # every analysed weight (the embedding does no FLOPs)
    stats = _pass(est, "statistics")
    fwd_bwd = sum(w.forward for w in stats.stages)               # forward 2P, input gradients 2P, attention on top
    assert 1.0 < fwd_bwd / (4 * matrices * tokens) < 1.06
    layers = 32 * ([(H, H)] * 4 + [(F, H)] * 2 + [(H, F)]) + [(V, H)]
    G = sum(2 * m * n for m, n in layers) * tokens
    factors = sum(2 * (n * n + m * m) for m, n in layers) * tokens
    assert sum(w.stat for w in stats.stages) == pytest.approx(G + factors, rel=1e-12)
    assert 1.0 < (fwd_bwd + G) / (6 * matrices * tokens) < 1.04   # the 6·params·tokens of a training step


def test_exact_pass_scales_with_directions_and_dominates():
    _, est = _est()
    _, twice = _est("top_k=40")
    ratio = _pass(twice, "exact").flops / _pass(est, "exact").flops
    assert 1.9 < ratio < 2.0                                     # (1 + 2K) per stage and layer
    assert _pass(est, "exact").flops > 100 * _pass(est, "statistics").flops
    _, none = _est("exact=false")
    assert [p.name for p in none.cost.passes] == ["statistics", "spectral", "projections"]


def test_replicas_split_the_micro_batches_and_all_reduce_the_factors():
    _, one = _est("stages=2", "hardware.gpus=2", "hardware.gpu=H200-141")
    plan4, four = _est("stages=2", "hardware.gpus=8", "hardware.gpu=H200-141")
    assert (one.layout.replicas, four.layout.replicas) == (1, 4)
    s1, s4 = _pass(one, "statistics"), _pass(four, "statistics")
    assert [w.forward / 4 for w in s1.stages] == pytest.approx([w.forward for w in s4.stages])
    assert four.cost.total_flops() == pytest.approx(one.cost.total_flops())
    assert all(w.reduced == 0 for w in s1.stages)
    for st, w in zip(plan4.stages, s4.stages):
        assert w.reduced == pytest.approx(2 * 3 / 4 * st.factor_bytes)   # ring all-reduce of G, C_A, C_δ


def test_bytes_between_stages():
    _, est = _est()
    t, M = 2 * 512, 32                                           # micro_batch 2 × seq_len 512, 64 sequences
    hop = t * H * 4                                              # bf16 hidden states travel as float32
    sent = [w.sent for w in _pass(est, "statistics").stages]
    assert sent[0] == M * hop and sent[-1] == M * hop             # forward only / backward only
    assert all(s == 2 * M * hop for s in sent[1:-1])
    _, mc = _est("fisher=mc", "mc_samples=2")
    assert _pass(mc, "statistics").stages[1].sent == (1 + 3) * M * hop   # true seed + 2 sampled seeds back


def test_time_at_a_stated_throughput():
    rate = Throughput("test", forward_tflops=100, stat_tflops=10, utilization=0.5, solver_efficiency=0.1)
    w = Work(forward=1e15, stat=1e14, solver=1e13)
    assert w.seconds(rate) == pytest.approx(1e15 / 50e12 + 1e14 / 5e12 + 1e13 / 1e12)
    p = PassCost("statistics", [w, Work(forward=2e15)], steps=8)
    assert p.seconds(rate, "sequential") == pytest.approx(w.seconds(rate) + 40)
    assert p.seconds(rate, "pipelined") == pytest.approx(50 * (8 + 1) / 8)
    _, est = _est("hardware.device_tflops=500", "hardware.utilization=0.5")
    _, slow = _est("hardware.device_tflops=250", "hardware.utilization=0.5")
    assert est.cost.throughput.source == "hardware.device_tflops"
    assert slow.cost.total_s("pipelined") > 1.9 * est.cost.total_s("pipelined")
    assert est.cost.total_s("sequential") > est.cost.total_s("pipelined")
    _, none = _est("hardware.gpu=null")
    assert none.cost.throughput is None and none.cost.total_s("pipelined") is None


def test_exact_pass_over_a_sample_of_the_sequences():
    """data.exact_sequences: the exact pass costs n/N of the full one (whole micro-batches, rounded up); the
    statistics and projections passes do not change."""
    _, est = _est()
    _, sub = _est("data.exact_sequences=7")        # 64 sequences in micro-batches of 2: 7 → 4 of 32 micro-batches
    assert sub.workload.exact_microbatches == 4
    assert _pass(sub, "exact").flops == pytest.approx(_pass(est, "exact").flops / 8, rel=1e-12)
    for name in ("statistics", "projections"):
        assert _pass(sub, name).flops == _pass(est, name).flops


def test_exact_dtype_sets_the_exact_pass_rate_and_memory():
    """A bfloat16 model with exact_dtype=float32 (the default): the exact pass runs at the device's float32 rate
    and holds its parameters, activations and tangents in float32; exact_dtype=model at the bfloat16 rate.  At the
    same directions per sweep, float32's exact workspace is larger by at least the upcast parameters, and the
    other passes are unchanged."""
    _, f32 = _est("exact_chunk=8")
    _, bf16 = _est("exact_chunk=8", "exact_dtype=model")
    assert f32.cost.throughput.exact_tflops == 67 and bf16.cost.throughput.exact_tflops == 989   # H100 data sheet
    assert _pass(f32, "exact").flops == _pass(bf16, "exact").flops
    for a, b in zip(_pass(f32, "exact").stages, _pass(bf16, "exact").stages):
        assert a.seconds(f32.cost.throughput) == pytest.approx(b.seconds(bf16.cost.throughput) * 989 / 67, rel=1e-9)
    for a, b in zip(f32.memory.stages, bf16.memory.stages):
        assert a.exact >= 2 * b.exact - 1 and a.exact - 2 * b.exact >= a.weights - 1   # 2× in float32, + weights
        assert (a.factors, a.activations) == (b.factors, b.activations)
