"""curvdist.runner.memory and the layout: numbers derived independently (shapes, the checkpoint's bytes, autograd's
saved tensors), scaling laws, the over-memory message, and one measurement of a real stage's resident memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from safetensors import safe_open

from curvdist.config import load_config
from curvdist.math.forward import second_order_attention
from curvdist.runner import estimate, planning
from curvdist.runner.memcheck import OverMemory, check_memory
from curvdist.runner.memory import block_saved, memory_plan
from curvdist.runner.plan import Layout, resolve_layout

ROOT = Path(__file__).resolve().parents[1]
LLAMA7B = ROOT / "configs" / "llama2-7b-8gpu.yaml"


def _est(path=LLAMA7B, *overrides):
    cfg = load_config(path, list(overrides))
    plan = planning.plan_from_config(cfg)
    return cfg, plan, estimate.estimate(cfg, plan)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name configs/models/*.json relative to the repository root


# ------------------------------------------------------------------------------------------------------ layout
def test_resolve_layout():
    assert resolve_layout(2, None, None, 8, 1.0) == Layout(2, 4, 2, 1.0)          # as many replicas as GPUs allow
    assert resolve_layout(3, None, None, 8, 1.0).replicas == 2                     # floor(8 / 3)
    assert resolve_layout(4, None, None, 2, 0.5).replicas == 1                     # fractional GPUs per stage
    assert resolve_layout(4, None, None, 4, 0.5).replicas == 2
    assert resolve_layout(8, None, None, 4, 1.0).replicas == 1                     # at least one
    assert resolve_layout(2, None, 3, 0, 0.0) == Layout(2, 1, 3, 0.0)             # CPU: one replica
    assert resolve_layout(2, 5, None, 8, 1.0).replicas == 5                        # the config wins
    lay = resolve_layout(4, 2, None, 8, 1.0)
    assert lay.gpus == 8 and [lay.held(j, 100) for j in range(4)] == [4, 3, 2, 1]  # 1F1B: in_flight − j
    assert lay.held(0, 2) == 2 and resolve_layout(4, 1, 2, 0, 0).held(3, 10) == 1


def test_layout_of_the_config():
    _, _, est = _est(LLAMA7B, "hardware.gpus=32", "stages=4")
    assert est.layout == Layout(4, 8, 4, 1.0)
    _, _, est = _est(LLAMA7B, "hardware.gpus=32", "stages=4", "replicas=2", "in_flight=6")
    assert est.layout == Layout(4, 2, 6, 1.0)
    assert _est(LLAMA7B, "device=cpu", "hardware.gpus=8")[2].layout.replicas == 1


# --------------------------------------------------------------------------------------------- known numbers
def test_factor_bytes_of_the_7b_stages():
    """Stage factors = G + C_A + C_δ of its layers in fp32, counted here from LLaMA-2-7B's shapes."""
    _, plan, est = _est()
    h, f, V = 4096, 11008, 32000
    block = 4 * (h * h + h * h + h * h) + 2 * (f * h + h * h + f * f) + (h * f + f * f + h * h)  # q k v o, gate up, down
    for st, mem in zip(plan.stages, est.memory.stages):
        n_blocks = st.last_block - st.first_block + 1
        expect = n_blocks * block + (V * h + h * h + V * V if st.has_head else 0)
        assert mem.factors == 4 * expect
        assert mem.weights == st.param_bytes
    assert sum(s.weights for s in est.memory.stages) == pytest.approx(2 * 6.738e9, rel=0.01)


def test_weights_equal_the_checkpoint(tmp_path_factory):
    """The weights of every stage add up to the stored tensors (an untied GPT-NeoX, float32 as stored)."""
    path = tiny.save_sharded(tmp_path_factory, {"gpt_neox": tiny.makers(4)["gpt_neox"]})["gpt_neox"]
    stored = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            stored += sum(st.get_tensor(k).nbytes for k in st.keys())  # noqa: SIM118 (safe_open has no __iter__)
    _, _, est = _est(None, f"model.path={path}", "stages=3", "device=cpu")
    assert sum(s.weights for s in est.memory.stages) == stored


# --------------------------------------------------------------------------------------------------- scaling
def _stage(est, j=1):
    return est.memory.stages[j]


def test_activations_scale_with_micro_batch_in_flight_and_seq_len():
    base = _est(LLAMA7B, "data.micro_batch=2", "data.seq_len=512")[2]
    double_b = _est(LLAMA7B, "data.micro_batch=4", "data.seq_len=512")[2]
    assert _stage(double_b).activations == 2 * _stage(base).activations           # linear in the micro-batch
    assert _stage(double_b).activations_autograd == 2 * _stage(base).activations_autograd
    # in flight: stage j holds in_flight − j micro-batches; the statistics peak grows by that many activations
    more = _est(LLAMA7B, "data.micro_batch=2", "in_flight=12")[2]
    s0, s1 = _stage(base), _stage(more)
    assert (s0.held, s1.held) == (7, 11)
    assert s1.pass_peaks()["statistics"] - s0.pass_peaks()["statistics"] == 4 * s0.activations
    # sequence length: linear per token except the scores, B·heads·T² in float32 per block
    half_t = _est(LLAMA7B, "data.micro_batch=2", "data.seq_len=256")[2]
    blocks = 4
    scores_at_256 = blocks * 2 * 32 * 256 * 256 * 4
    assert _stage(base).activations_autograd - 2 * _stage(half_t).activations_autograd == 2 * scores_at_256


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_match_autograd(family, dtype):
    """block_saved's per-token formula against what autograd keeps, counted with saved-tensor hooks: the bytes of a
    two-block model minus those of a one-block model (eval mode, sdpa through the MATH kernel)."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    h, f, a, V, B, T = 64, 176, 4, 100, 2, 48
    common = {"vocab_size": V, "hidden_size": h, "intermediate_size": f, "num_attention_heads": a,
              "max_position_embeddings": 128}
    make = {"llama": lambda L: LlamaForCausalLM(LlamaConfig(num_hidden_layers=L, num_key_value_heads=2, **common)),
            "gpt2": lambda L: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=h, n_inner=f, n_layer=L, n_head=a,
                                                         n_positions=128, bos_token_id=0, eos_token_id=0)),
            "gpt_neox": lambda L: GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=L, **common)),
            "bert": lambda L: BertModel(BertConfig(num_hidden_layers=L, **common))}[family]

    def saved(n_layers):
        torch.manual_seed(0)
        model = make(n_layers).to(dtype).eval()
        model.config._attn_implementation = "sdpa"
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        ids = torch.randint(0, V, (B, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), second_order_attention():
            model(input_ids=ids, attention_mask=torch.ones(B, T, dtype=torch.long))
        return sum(seen.values()), model.config.to_dict(), type(model).__name__

    one, config, arch = saved(1)
    two, _, _ = saved(2)
    model = planning.arch_from_config(config, family, arch)
    per_token = block_saved(model, T).bytes_per_token(torch.empty((), dtype=dtype).element_size())
    assert (two - one) == pytest.approx(per_token * B * T, rel=0.05)


def test_stage_memory_against_resident_memory(tmp_path):
    """One real measurement: a Llama stage's resident memory on the CPU (tests/probe_memory.py, every allocation of
    64 kB or more mmap'd) for a micro-batch's forward, its backward, a jet of K directions (the exact sweep), and the
    spectral solvers, against the model."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read peak resident memory")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).save_pretrained(tmp_path / "model")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "probe_memory.py"), str(tmp_path / "model"), dtype,
                            str(out)], env=env, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        got = {k: model / measured for k, (measured, model) in json.loads(out.read_text()).items()}
        assert 0.9 < got.pop("activations") < 1.1, dtype        # measured 1.00–1.04
        for k, ratio in got.items():                             # backward 1.2–1.3, exact 1.26–1.30, spectral 0.94–1.06
            assert 0.75 < ratio < 1.5, (dtype, k, ratio)


def test_row_cache_held_from_the_statistics_pass_to_a_replayed_projections_pass():
    """row_cache_gb: each worker keeps r·R·Σ(n + f·m) bytes of rows (R rows per replica, f fisher seeds) on its
    device through the spectral step; the replayed projections pass holds them and their K projections instead of
    activations, the exact pass nothing.  Over the budget the statistics pass holds the budget at most and the
    projections pass streams; row_cache_gb=0 counts nothing."""
    over = ["data.sequences=64", "data.micro_batch=4", "data.seq_len=512", "exact=false"]
    _, plan, est = _est(LLAMA7B, *over, "hardware.gpus=16", "layers=[model.layers.*.mlp.down_proj]",
                        "fisher=mc", "mc_samples=2", "row_cache_gb=40")
    lay, by = est.layout, {l.name: l for l in plan.layers}
    assert lay.replicas == 2
    rows, r = 32 * 512, 4                                # 64 sequences over 2 replicas, float32
    for st, m in zip(plan.stages, est.memory.stages):
        assert m.rows == r * rows * sum(by[n].n + 2 * by[n].m for n in st.layers) > 0
        assert m.replay == rows * 20 * r and m.kept
        pk = m.pass_peaks()
        assert pk["projections"] == m.weights + m.ritz + m.rows + m.replay
        assert pk["spectral"] == m.weights + m.factors + max(m.finalize, m.spectral) + m.rows
    _, _, small = _est(LLAMA7B, *over, "hardware.gpus=16", "layers=[model.layers.*.mlp.down_proj]", "fisher=mc",
                       "mc_samples=2", "row_cache_gb=0.5")
    _, _, off = _est(LLAMA7B, *over, "hardware.gpus=16", "layers=[model.layers.*.mlp.down_proj]", "fisher=mc",
                     "mc_samples=2", "row_cache_gb=0")
    for a, b in zip(small.memory.stages, off.memory.stages):
        assert (a.rows, a.replay, a.kept, b.rows, b.replay, b.kept) == (2**29, 0, False, 0, 0, False)
        pa, pb = a.pass_peaks(), b.pass_peaks()
        assert pa["statistics"] == pb["statistics"] + 2**29
        assert pa["spectral"] == pb["spectral"] and pa["projections"] == pb["projections"]
        assert pb["projections"] == b.weights + b.ritz + b.held * b.activations_projections + b.backward
    assert all(s.pass_peaks()["exact"] == t.pass_peaks()["exact"] for s, t in zip(est.memory.stages,
                                                                                 off.memory.stages))
    # the cost estimate: a replayed projections pass sends nothing and runs no forward or backward
    proj, streamed = est.cost.passes[2], off.cost.passes[2]
    assert proj.replayed and not streamed.replayed and all(w.forward == w.sent == 0 for w in proj.stages)
    assert [w.stat for w in proj.stages] == [w.stat for w in streamed.stages] and streamed.sent > 0
    # a device the cache overfills: the message offers to turn it off, and without it the plan fits
    device = int((max(s.peak for s in est.memory.stages) - 2**30) / 0.9)
    with pytest.raises(OverMemory, match=r"fix: .*no row cache \(row_cache_gb=0: the projections pass streams"):
        check_memory(est.memory, device, 0.9)
    check_memory(off.memory, device, 0.9)


# ---------------------------------------------------------------------------------------------- the check
def test_shipped_configs_fit_their_gpu():
    for path in (LLAMA7B, ROOT / "configs" / "llama2-70b.yaml"):
        _, _, est = _est(path)
        assert est.device_memory.bytes == 80e9 and est.device_memory.source.startswith("H100-80")
        assert est.memory.peak <= 0.9 * 80e9
        est.check()


def test_over_memory_names_the_fix_and_the_fix_works():
    # exact-bound: on a 40 GB device the jets the budget allows (32 directions each for this config) do not fit
    # through the last stage (exact layers in block 0 only: the last stage runs sweeps, not its own double backward);
    # the message names exact_chunk, and with exact_chunk=null the plan picks the largest chunk that fits
    small = ("hardware.device_memory_gb=40", "exact_layers=[model.layers.0.*]")
    _, _, est = _est(LLAMA7B, "exact_chunk=400", *small)
    with pytest.raises(OverMemory) as e:
        est.check()
    msg = str(e.value)
    assert "\n" not in msg and "exact pass" in msg and "exact workspace" in msg and "exact_chunk" in msg
    _, _, est = _est(LLAMA7B, *small)
    est.check()
    chunk = est.workload.exact_chunk
    assert 1 <= chunk < 32
    with pytest.raises(OverMemory):
        _est(LLAMA7B, f"exact_chunk={chunk + 1}", *small)[2].check()      # the largest that fits: one more does not
    # the jets' rows are capped by the budget, not by exact_chunk: 400 needs no more memory than the cap (80 GB fits)
    big = [m.exact for m in _est(LLAMA7B, "exact_chunk=400")[2].memory.stages]
    assert big == [m.exact for m in _est(LLAMA7B, "exact_chunk=32")[2].memory.stages]
    assert big != [m.exact for m in _est(LLAMA7B, "exact_chunk=31")[2].memory.stages]
    # activation-bound: a large micro-batch; the suggested micro-batch fits
    _, _, est = _est(LLAMA7B, "data.micro_batch=8")
    with pytest.raises(OverMemory) as e:
        est.check()
    msg = str(e.value)
    assert "fix:" in msg
    b = int(msg.split("data.micro_batch=")[1].split(")")[0])
    assert 1 <= b < 8
    _est(LLAMA7B, f"data.micro_batch={b}")[2].check()
    # statistics-bound: no exact pass, many micro-batches in flight on a small device
    _, _, est = _est(LLAMA7B, "exact=false", "in_flight=16", "hardware.gpu=A100-40")
    with pytest.raises(OverMemory) as e:
        est.check()
    msg = str(e.value)
    assert "statistics pass" in msg and "in_flight=" in msg
    f = int(msg.split("in_flight=")[1].split(")")[0])
    _est(LLAMA7B, "exact=false", f"in_flight={f}", "hardware.gpu=A100-40")[2].check()


def test_shared_host_adds_every_stage():
    _, plan, est = _est(None, "model.name=tiny-gpt2", "stages=2", "device=cpu")
    mem = est.memory
    assert est.device_memory.shared_host and mem.host_total == sum(s.peak for s in mem.stages)
    check_memory(mem, mem.host_total + 1, 1.0, shared_host=True)
    with pytest.raises(OverMemory, match="sharing this host"):
        check_memory(mem, max(s.peak for s in mem.stages) + 1, 1.0, shared_host=True)
    check_memory(mem, max(s.peak for s in mem.stages) + 1, 1.0)   # one device per stage: fits
    more = memory_plan(plan, Layout(2, 3, 2, 0.0), est.workload, "cpu")
    assert more.host_total == 3 * sum(s.peak for s in more.stages)


def test_remote_cluster_without_a_known_device_skips_with_a_warning(monkeypatch):
    from curvdist import preflight
    from curvdist.runner import devices

    monkeypatch.setattr(devices, "cuda_memory_bytes", lambda index=0: None)   # the driver sees no GPU
    cfg = load_config(LLAMA7B, ["ray.address=10.0.0.1:6379", "hardware.gpu=null"])
    plan = planning.plan_from_config(cfg)
    with pytest.warns(preflight.MemoryCheckSkipped, match="hardware.gpu or hardware.device_memory_gb"):
        preflight.check_memory(cfg, plan)
    cfg = load_config(LLAMA7B, ["ray.address=10.0.0.1:6379", "data.micro_batch=8"])  # hardware.gpu: H100-80
    with pytest.raises(preflight.PreflightError, match="statistics pass"):
        preflight.check_memory(cfg, planning.plan_from_config(cfg))


def test_exact_pass_over_a_sample_holds_only_the_sampled_inputs():
    """data.exact_sequences: the last stage moves only the sampled micro-batches' inputs to the device in the exact
    pass, so 4096 sequences with 64 of them measured fit the same directions per sweep as 64 sequences."""
    _, _, small = _est(LLAMA7B)
    _, _, big = _est(LLAMA7B, "data.sequences=4096", "data.exact_sequences=64")
    assert big.workload.exact_chunk == small.workload.exact_chunk >= 8
    assert big.memory.stages[-1].exact == small.memory.stages[-1].exact


def test_jet_rows_of_the_plan_are_the_rows_the_runtime_cuts(monkeypatch):
    """The memory model's rows per jet (memory.jet_rows) are what jet_slices cuts from widest_after on the real
    model, here where the MATH kernel's attention scores (B·heads·T²) are the widest tensor, wider than the MLP and
    than any module output: counting module outputs only would give more rows than the budget allows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from curvdist.math.stage_tangents import JET_BUDGET, jet_slices, widest_after
    from curvdist.runner.memory import jet_rows

    h, f, heads, V, B, T = 64, 176, 4, 100, 2, 128
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=2,
                                         num_attention_heads=heads, num_key_value_heads=2,
                                         max_position_embeddings=T)).eval()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, V, (B, T))
    name = "model.layers.0.self_attn.q_proj"
    scores = B * heads * T * T
    monkeypatch.setitem(JET_BUDGET, "cpu", 3 * scores)
    widest = widest_after(model, lambda: model(input_ids=ids[:1]).logits, {name: model.get_submodule(name)},
                          scale=B)
    assert widest[name] == (scores, B * T * V)            # the scores, not the MLP's B·T·f, nor a module output
    arch = planning.arch_from_config(model.config.to_dict(), "llama", "LlamaForCausalLM")
    rows = len(jet_slices([(name, 20)], widest, "cpu")[0].entries)
    assert rows == jet_rows(20, B * T, T, arch, "cpu") == 3
    assert JET_BUDGET["cpu"] // (B * T * f) > 3              # by the MLP alone it would have been more
