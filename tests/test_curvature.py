"""Exact directional curvature (curvdist.math.curvature) against dense truth, curvlinops, and stage chaining (float64)."""
from __future__ import annotations

import oracle
import pytest
import torch
from torch import nn

from curvdist.math import dense
from curvdist.math import layers as L
from curvdist.math.curvature import Curvature, exact_curvature
from curvdist.math.forward import model_logits
from curvdist.math.stage_tangents import Perturbation, jet_slices, layer_param_tangent, loss_jet, stage_jet

DT = torch.float64
RTOL = 1e-10


def close(a, b, rtol=RTOL):
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err <= rtol * float(b.abs().max()), f"max abs err {err:.3e} vs scale {float(b.abs().max()):.3e}\n{a}\n{b}"


def random_dirs(layers, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in layers.items():
        m, n = L.shape(mod)
        out[name] = (torch.randn(K, m, generator=g, dtype=DT), torch.randn(K, n, generator=g, dtype=DT))
    return out


def check_dense(model, data, loss, layers, K=3, gn=True, methods=("output", "taylor")):
    """Both routes (the default Taylor mode and the double backward) against the dense Hessian and GGN."""
    dirs = random_dirs(layers, K)
    for method in methods:
        res = exact_curvature(model, data, loss, dirs, layers=layers, gn=gn, method=method)
        for name, mod in layers.items():
            U, V = dirs[name]
            close(res[name].h, dense.quadratic(dense.layer_hessian(model, data, oracle.LOSSES[loss], mod), U, V))
            if gn:
                close(res[name].h_gn, dense.quadratic(dense.layer_ggn(model, data, oracle.LOSSES[loss], mod), U, V))
    return res, dirs


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Sigmoid(), nn.Linear(6, 4)).to(DT).eval()


def mlp_layers(model):
    return {"0": model[0], "2": model[2], "4": model[4]}


def mlp_data(loss, sizes=(6, 3, 5)):
    g = torch.Generator().manual_seed(1)
    out = []
    for b in sizes:
        x = torch.randn(b, 5, generator=g, dtype=DT)
        y = torch.randint(0, 4, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, 4, generator=g,
                                                                                                dtype=DT)
        out.append((x, y))
    return out


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mlp_matches_dense_over_microbatches(loss):
    model = mlp()
    res, _ = check_dense(model, mlp_data(loss), loss, mlp_layers(model))
    assert all(isinstance(r, Curvature) and r.h.dtype == DT and r.h.shape == (3,) for r in res.values())


def test_microbatch_weighting_is_by_loss_terms():
    """L = (1/N) Σ_t ℓ_t: h over two micro-batches is the term-weighted mean of the per-micro-batch h."""
    model = mlp()
    lay = mlp_layers(model)
    data = mlp_data("cross_entropy", sizes=(7, 2))
    dirs = random_dirs(lay, 4)
    both = exact_curvature(model, data, "cross_entropy", dirs, layers=lay)
    parts = [exact_curvature(model, [d], "cross_entropy", dirs, layers=lay) for d in data]
    for name in lay:
        close(both[name].h, (7 * parts[0][name].h + 2 * parts[1][name].h) / 9)
        close(both[name].h_gn, (7 * parts[0][name].h_gn + 2 * parts[1][name].h_gn) / 9)


def test_options_and_chunking():
    model = mlp()
    lay = mlp_layers(model)
    data = mlp_data("cross_entropy")
    dirs = random_dirs(lay, 5)
    full = exact_curvature(model, data, "cross_entropy", dirs, layers=lay)
    chunked = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, chunk_size=2)
    single = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, chunk_size=1)  # one row per jet
    double = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method="output", chunk_size=1)
    h_only = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, gn=False)
    gn_only = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, hessian=False)
    for name in lay:
        close(chunked[name].h, full[name].h, 1e-13)
        close(chunked[name].h_gn, full[name].h_gn, 1e-13)
        close(single[name].h, full[name].h, 1e-13)
        close(single[name].h_gn, full[name].h_gn, 1e-13)
        close(double[name].h, full[name].h, 1e-13)       # a plain double backward
        close(double[name].h_gn, full[name].h_gn, 1e-13)
        close(h_only[name].h, full[name].h, 1e-13)
        close(gn_only[name].h_gn, full[name].h_gn, 1e-13)
        assert h_only[name].h_gn is None and gn_only[name].h is None
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    with pytest.raises(ValueError):
        exact_curvature(model, data, "cross_entropy", {"0": (torch.randn(2, 3), torch.randn(2, 5))}, layers=lay)


def test_last_linear_layer_with_mse_gn_is_exact():
    """z = W a + b with squared loss: ∇²_W L = Jᵀ H_ℓ J exactly, so h == h^GN."""
    model = mlp()
    res = exact_curvature(model, mlp_data("mse"), "mse", random_dirs({"4": model[4]}, 6), layers={"4": model[4]})
    close(res["4"].h, res["4"].h_gn, 1e-12)
    inner = exact_curvature(model, mlp_data("mse"), "mse", random_dirs({"0": model[0]}, 6), layers={"0": model[0]})
    assert (inner["0"].h - inner["0"].h_gn).abs().max() > 1e-6  # not so for an inner layer


class Reuse(nn.Module):
    """One Linear applied twice (weight reuse inside one forward): h has cross terms between the two uses."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))


def test_module_called_twice_matches_dense():
    torch.manual_seed(3)
    model = Reuse().to(DT).eval()
    check_dense(model, mlp_data("cross_entropy"), "cross_entropy", {"a": model.a}, methods=("auto",))  # param route


def test_module_called_twice_output_method_refuses():
    torch.manual_seed(3)
    model = Reuse().to(DT).eval()
    with pytest.raises(ValueError, match="more than once"):
        exact_curvature(model, mlp_data("cross_entropy"), "cross_entropy",
                        random_dirs({"a": model.a}, 2), layers={"a": model.a}, method="output")


def test_param_method_equals_output_method():
    model = mlp()
    lay = mlp_layers(model)
    data = mlp_data("cross_entropy")
    dirs = random_dirs(lay, 4)
    out = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method="output")
    par = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method="param", chunk_size=3)
    for name in lay:
        close(par[name].h, out[name].h, 1e-12)
        close(par[name].h_gn, out[name].h_gn, 1e-12)


def test_tied_lm_head():
    """GPT-2's lm_head shares its weight with the token embedding.  The default (output) route measures the
    lm_head's own use, like G and the Kronecker factors: the dense Hessian of an untied copy.  method="param"
    gives the Hessian w.r.t. the shared tensor (both uses): the dense Hessian of the tied model."""
    import copy

    model = tiny_gpt2(n_layer=1)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    data = lm_data(11)
    dirs = random_dirs({"lm_head": model.lm_head}, 2)
    U, V = dirs["lm_head"]
    own = exact_curvature(model, data, "cross_entropy", dirs, layers={"lm_head": model.lm_head})["lm_head"]
    close(own.h, dense.quadratic(dense.layer_hessian(untied, data, oracle.cross_entropy, untied.lm_head), U, V))
    shared = exact_curvature(model, data, "cross_entropy", dirs, layers={"lm_head": model.lm_head}, method="param")
    ce = oracle.cross_entropy
    close(shared["lm_head"].h, dense.quadratic(dense.layer_hessian(model, data, ce, model.lm_head), U, V))
    close(shared["lm_head"].h_gn, dense.quadratic(dense.layer_ggn(model, data, ce, model.lm_head), U, V))


def test_cnn_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(b, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (b,), generator=g)) for b in (3, 2)]
    check_dense(model, data, "cross_entropy", {"0": model[0], "2": model[2], "5": model[5]})


def lm_data(vocab, seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t in ((2, 6), (1, 5)):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        y = torch.cat([ids[:, 1:], torch.full((b, 1), -100)], 1)
        y[0, 1] = -100
        inputs = ids
        if mask and b == 2:  # right padding on the second sequence: its last two positions are not loss terms
            am = torch.ones(b, t, dtype=torch.long)
            am[1, -2:] = 0
            y[1, -3:] = -100
            inputs = {"input_ids": ids, "attention_mask": am}
        out.append((inputs, y))
    return out


def tiny_gpt2(n_layer=2, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=4, n_head=2, n_layer=n_layer, vocab_size=11, n_positions=8, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.4, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).to(DT).eval()


def test_gpt2_conv1d_matches_dense():
    model = tiny_gpt2()
    h = model.transformer.h
    check_dense(model, lm_data(11, mask=True), "cross_entropy",
                {"h0.c_attn": h[0].attn.c_attn, "h0.c_fc": h[0].mlp.c_fc, "h1.mlp.c_proj": h[1].mlp.c_proj}, K=2)


def test_llama_matches_dense(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    # Llama's RMSNorm and eager softmax compute in float32 whatever the model's dtype, which limits any float64
    # comparison to ~1e-7; run them in the working dtype so that 1e-10 tests the curvature code, not HF's casts.
    def rms_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key, value = ml.repeat_kv(key, module.num_key_value_groups), ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(ml, "eager_attention_forward", eager)
    cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=11, max_position_embeddings=16,
                                   initializer_range=0.3, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DT).eval()
    lay = model.model.layers
    check_dense(model, lm_data(11, seed=1), "cross_entropy",
                {"q0": lay[0].self_attn.q_proj, "gate0": lay[0].mlp.gate_proj, "down1": lay[1].mlp.down_proj}, K=2)


@pytest.mark.parametrize("loss,cls", [("cross_entropy", "CrossEntropyLoss"), ("mse", "MSELoss")])
def test_matches_curvlinops_operators(loss, cls):
    curvlinops = pytest.importorskip("curvlinops")
    model = mlp()
    lay = mlp_layers(model)
    data = mlp_data(loss, sizes=(6, 3))
    dirs = random_dirs(lay, 3)
    res = exact_curvature(model, data, loss, dirs, layers=lay)
    loss_func = getattr(nn, cls)()
    for name, mod in lay.items():
        U, V = dirs[name]
        X = layer_param_tangent(mod, U, V).reshape(U.shape[0], -1).T  # (numel, K) in the weight's layout
        for op, got in ((curvlinops.HessianLinearOperator, res[name].h), (curvlinops.GGNLinearOperator, res[name].h_gn)):
            A = op(model, loss_func, [mod.weight], data, check_deterministic=False)
            close(got, (X * (A @ X)).sum(0))


# ---------------------------------------------------------------------------------------------------------------
# Stage chaining: forward tangents stage to stage, then the reverse pass with tangent adjoints, no shared graph
# ---------------------------------------------------------------------------------------------------------------

class Embed(nn.Module):
    def __init__(self, v, d):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.lin = nn.Linear(d, d)

    def forward(self, ids):
        return torch.tanh(self.lin(self.emb(ids)))


class Block(nn.Module):
    def __init__(self, d, act=nn.functional.gelu):
        super().__init__()
        self.act = act
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        T = x.shape[1]
        s = self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        x = x + self.o(torch.softmax(s, -1) @ self.v(x))
        return x + self.down(self.act(self.up(self.ln(x))))


class Head(nn.Module):
    def __init__(self, d, v):
        super().__init__()
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, v)

    def forward(self, x):
        return self.out(self.ln(x))


def chained(stages, data, loss, j, mods, dirs, chunk=None, call=None):
    """h, h^GN ({layer: (K,)}) of ``mods`` (layers of stage j) through the stages one by one: the stage_tangents
    route (seeded jets, stage_jet, loss_jet), a sweep per micro-batch and chunk."""
    pert = Perturbation(mods)
    h = {n: torch.zeros(dirs[n][0].shape[0], dtype=DT) for n in mods}
    hgn = {n: torch.zeros_like(v) for n, v in h.items()}
    N = 0
    try:
        for x, y in data:
            with torch.no_grad():
                for s in stages[:j]:
                    x = s(x)
            for sl in jet_slices([(n, dirs[n][0].shape[0]) for n in mods], {}, "cpu", cap=chunk):
                xd = xdd = None
                with pert.of(sl, dirs):
                    x1, xd, xdd = stage_jet(stages[j], x, T=len(sl), call=call)
                for s in stages[j + 1:]:
                    x1, xd, xdd = stage_jet(s, x1, xd, xdd, T=len(sl))
                hb, gnb, nb = loss_jet(x1, xd, xdd, y, loss, len(sl))
                for t, (n, k) in enumerate(sl.entries):
                    h[n][k] += nb * hb[t]
                    hgn[n][k] += nb * gnb[t]
            N += nb
    finally:
        pert.close()
    return {n: v / N for n, v in h.items()}, {n: v / N for n, v in hgn.items()}


@pytest.mark.parametrize("j,path", [(0, "lin"), (1, "q"), (1, "down"), (2, "out")])
def test_stage_chaining_equals_in_process(j, path):
    torch.manual_seed(0)
    stages = [Embed(9, 6), Block(6), Head(6, 9)]
    model = nn.Sequential(*stages).to(DT).eval()
    mod = getattr(stages[j], path)
    data = lm_data(9, seed=4)
    dirs = random_dirs({path: mod}, 3, seed=5)
    ref = exact_curvature(model, data, "cross_entropy", dirs, layers={path: mod}, method="output")[path]
    h, hgn = chained(stages, data, "cross_entropy", j, {path: mod}, dirs)
    close(h[path], ref.h)
    close(hgn[path], ref.h_gn)
    if j == 1 and path == "q":  # and both agree with the dense Hessian of the composed model
        close(h[path], dense.quadratic(dense.layer_hessian(model, data, oracle.cross_entropy, mod), *dirs[path]))


def test_stage_chaining_silu_under_callers_no_grad():
    """A SiLU stage (Llama's MLP) chained inside torch.no_grad(), as a stage actor may call it."""
    torch.manual_seed(1)
    stages = [Embed(9, 6), Block(6, act=nn.functional.silu), Head(6, 9)]
    model = nn.Sequential(*stages).to(DT).eval()
    data = lm_data(9, seed=6)
    dirs = random_dirs({"up": stages[1].up}, 2, seed=7)
    ref = exact_curvature(model, data, "cross_entropy", dirs, layers={"up": stages[1].up}, method="output")["up"]
    with torch.no_grad():
        h, hgn = chained(stages, data, "cross_entropy", 1, {"up": stages[1].up}, dirs)
    close(h["up"], ref.h)
    close(hgn["up"], ref.h_gn)
    close(h["up"], dense.quadratic(dense.layer_hessian(model, data, oracle.cross_entropy, stages[1].up), *dirs["up"]))


def test_stage_jets_through_a_whole_gpt2():
    """One stage = the whole GPT-2 (Conv1D layers, tanh GELU, eager attention with its causal mask, LayerNorm, the
    tied head): every direction of three layers in two blocks and the head in one sweep, equal to the in-process
    double backward to float64 rounding."""
    model = tiny_gpt2(n_layer=2, seed=1)
    mods = {n: m for n, m in model.named_modules() if n in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                                                            "transformer.h.1.attn.c_proj", "lm_head")}
    data = lm_data(11, seed=2)
    dirs = random_dirs(mods, 2)
    ref = exact_curvature(model, data, "cross_entropy", dirs, layers=mods, method="output")   # double backward
    h, hgn = chained([model], data, "cross_entropy", 0, mods, dirs, call=model_logits)
    for n in mods:
        close(h[n], ref[n].h)
        close(hgn[n], ref[n].h_gn)


@pytest.mark.parametrize("chunk", [None, 2])
def test_stacked_directions_of_several_layers_in_one_sweep(chunk):
    """Every direction of two layers of stage 1 as rows of one jet (stage_tangents module docstring), one sweep per
    micro-batch (and chunk, which may cut a layer's directions): h and h^GN equal the in-process route, layer by
    layer."""
    torch.manual_seed(0)
    stages = [Embed(9, 6), Block(6), Head(6, 9)]
    model = nn.Sequential(*stages).to(DT).eval()
    mods = {"q": stages[1].q, "down": stages[1].down}
    data = lm_data(9, seed=4)
    dirs = random_dirs(mods, 3, seed=5)
    ref = exact_curvature(model, data, "cross_entropy", dirs, layers=mods, method="output")
    assert len(jet_slices([(n, 3) for n in mods], {}, "cpu", cap=chunk)) == (1 if chunk is None else 3)
    h, hgn = chained(stages, data, "cross_entropy", 1, mods, dirs, chunk)
    for n in mods:
        close(h[n], ref[n].h)
        close(hgn[n], ref[n].h_gn)
    assert not torch.allclose(ref["q"].h, ref["down"].h)


def test_exact_dtype_float32_on_a_bfloat16_model():
    """The exact HVPs of a bfloat16 model, upcast to float32 for the pass (``exact_dtype``), agree with float64 on
    the same (bfloat16) weights, directions and data to 1e-3 relative (median); in bfloat16 itself they are off
    by far more, which is why the runner defaults to float32.  The parameters come back bfloat16, unchanged."""
    import copy

    from curvdist.math.forward import exact_torch_dtype, parameters_in

    model = tiny_gpt2(n_layer=2, seed=3).to(torch.bfloat16)
    layers = {n: m for n, m in model.named_modules() if n.endswith(("c_attn", "c_fc", "mlp.c_proj"))}
    dirs = random_dirs(layers, 4, seed=2)
    data = lm_data(11, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wide = copy.deepcopy(model).to(DT)   # the same (bfloat16-representable) weights in float64
    ref = exact_curvature(wide, data, "cross_entropy", dirs, layers={n: wide.get_submodule(n) for n in layers})
    errs = {}
    for name in ("float32", "model"):
        with parameters_in(model, exact_torch_dtype(name, torch.bfloat16)):
            got = exact_curvature(model, data, "cross_entropy", dirs, layers=layers)
        rel = torch.cat([(got[n].h.double() - ref[n].h).abs() / ref[n].h.abs().clamp_min(1e-30) for n in layers])
        errs[name] = float(rel.median())
    print(f"median relative error of h against float64: float32 {errs['float32']:.2e}, bfloat16 {errs['model']:.2e}")
    assert errs["float32"] < 1e-3 < errs["model"] or errs["float32"] < errs["model"] / 10
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == model.state_dict()[k].dtype
               for k, v in before.items())


class RuleZoo(nn.Module):
    """Elementwise ops a transformer's forward decomposes into, each with its own Taylor-mode rule (float64 here,
    unlike transformers' RMSNorm): an RMS norm (pow, mean, rsqrt), the gelu_new formula (pow, tanh, products of
    two jets), rotary-style halves (split, neg, cat, sin/cos of a jet), SiLU, sigmoid, exp, log, sqrt, division by a
    jet, where, and causal scaled-dot-product attention (the MATH kernel: _safe_softmax, bmm)."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.a(x)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        h1, h2 = h.chunk(2, dim=-1)
        h = torch.cat([-h2 * torch.sin(h1), h1 * torch.cos(h2)], dim=-1) + torch.sigmoid(h)
        u = self.b(h)
        u = nn.functional.silu(u) + torch.exp(-u * u) + torch.log(1 + u * u) + torch.sqrt(2 + u * u) / (3 + u * u)
        u = torch.where(u > 0, u, 0.5 * u)
        x = x + self.c(u)
        q, k = self.q(x).unsqueeze(1), self.k(x).unsqueeze(1)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            att = nn.functional.scaled_dot_product_attention(q, k, x.unsqueeze(1), is_causal=True)
        return x + att.squeeze(1).permute(0, 2, 1).permute(0, 2, 1)


def test_taylor_rules_of_elementwise_ops_equal_the_double_backward():
    torch.manual_seed(2)
    stages = [Embed(9, 6), RuleZoo(6), Head(6, 9)]
    model = nn.Sequential(*stages).to(DT).eval()
    mods = {"emb.lin": stages[0].lin, "a": stages[1].a, "b": stages[1].b, "q": stages[1].q}
    data = lm_data(9, seed=3)
    dirs = random_dirs(mods, 3, seed=4)
    ref = exact_curvature(model, data, "cross_entropy", dirs, layers=mods, method="output")
    got = exact_curvature(model, data, "cross_entropy", dirs, layers=mods, method="taylor", chunk_size=4)
    for n in mods:
        close(got[n].h, ref[n].h)
        close(got[n].h_gn, ref[n].h_gn)
    U, V = dirs["b"]
    close(got["b"].h, dense.quadratic(dense.layer_hessian(model, data, oracle.cross_entropy, stages[1].b), U, V))


def test_a_model_op_without_a_taylor_rule_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return torch.cumsum(self.lin(x), -1)

    model = Odd().to(DT).eval()
    data = [(torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))]
    dirs, lay = random_dirs({"lin": model.lin}, 2), {"lin": model.lin}
    with pytest.raises(NotImplementedError, match="cumsum"):
        exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method="taylor")
    auto = exact_curvature(model, data, "cross_entropy", dirs, layers=lay)
    out = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method="output")
    close(auto["lin"].h, out["lin"].h, 1e-14)
    U, V = dirs["lin"]
    close(auto["lin"].h, dense.quadratic(dense.layer_hessian(model, data, oracle.cross_entropy, model.lin), U, V))


def test_taylor_route_on_transformers_equals_the_double_backward():
    """The Taylor route in process (jets: block replay upstream of the seeds, the head's second part left to the
    loss) against the double backward, on GPT-2 (tied head, eager attention) and Llama (GQA, rotary, sdpa) with
    layers in first and last blocks and the head.  Llama to float32 rounding: transformers' RMSNorm computes in
    float32 whatever the input dtype, and the two routes round there differently."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from curvdist.math.stage_tangents import output_head

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=3, vocab_size=11,
                                         attn_implementation="sdpa")).to(DT).eval()
    for model, tol in ((tiny_gpt2(n_layer=3, seed=2), 1e-12), (llama, 1e-5)):
        assert output_head(model) is model.lm_head
        mods = {n: m for n, m in model.named_modules()
                if L.is_supported(m) and (".0." in n or ".2." in n or n == "lm_head")}
        dirs = random_dirs(mods, 3, seed=1)
        data = lm_data(11, seed=6)
        ref = exact_curvature(model, data, "cross_entropy", dirs, layers=mods, method="output")
        got = exact_curvature(model, data, "cross_entropy", dirs, layers=mods, chunk_size=4, method="taylor")
        for n in mods:
            close(got[n].h, ref[n].h, tol)
            close(got[n].h_gn, ref[n].h_gn, tol)


class Capped(nn.Module):
    """A head followed by a logit soft-cap: the head's second part is needed, so the split must step aside."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.lm_head = nn.Embedding(9, 6), nn.Linear(6, 6), nn.Linear(6, 9, bias=False)

    def forward(self, ids):
        return 3 * torch.tanh(self.lm_head(torch.tanh(self.mid(self.emb(ids)))) / 3)


def test_head_split_steps_aside_when_an_op_follows_the_head():
    torch.manual_seed(4)
    model = Capped().to(DT).eval()
    check_dense(model, lm_data(9, seed=2), "cross_entropy", {"mid": model.mid, "lm_head": model.lm_head})


def test_head_split_engages_on_gpt2():
    """On GPT-2 the logits are lm_head's own output: the jet leaves the head with first derivatives only and hands
    ḧ to the loss."""
    from curvdist.math.stage_tangents import HeadSplit, Perturbation

    model = tiny_gpt2(n_layer=2, seed=1)
    mod = model.transformer.h[0].mlp.c_fc
    dirs = random_dirs({"fc": mod}, 2)
    ids = lm_data(11, seed=1)[0][0]
    pert, head = Perturbation({"fc": mod}), HeadSplit(model)
    try:
        (sl,) = jet_slices([("fc", 2)], {}, "cpu")
        with pert.of(sl, dirs):
            z, zd, zdd = stage_jet(model, ids, T=2, call=model_logits, head=head)
        assert zd is not None and zdd is None
        hdd, W = head.term()
        assert W is model.lm_head.weight and hdd.shape == (2, *ids.shape, 4)
    finally:
        head.close()
        pert.close()


class Looped(nn.Module):
    """Blocks in a ModuleList, the first called twice (a weight-shared loop), the layers keyed by the caller's own
    names: block replay must key its outputs by call and match seeded layers by identity."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.out = nn.Linear(6, 9)

    def forward(self, ids):
        x = self.emb(ids)
        for b in (self.blocks[0], self.blocks[0], self.blocks[1]):
            x = torch.tanh(b(x))
        return self.out(x)


def test_block_replay_keys_calls_and_matches_layers_by_identity():
    torch.manual_seed(5)
    model = Looped().to(DT).eval()
    data = lm_data(9, seed=7)
    lay = {"second": model.blocks[1], "head": model.out}         # caller keys, not module names
    dirs = random_dirs(lay, 3, seed=8)
    ref = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method="output")
    for chunk in (None, 2):
        got = exact_curvature(model, data, "cross_entropy", dirs, layers=lay, method="taylor", chunk_size=chunk)
        for n in lay:
            close(got[n].h, ref[n].h)
            close(got[n].h_gn, ref[n].h_gn)
    close(ref["second"].h, dense.quadratic(dense.layer_hessian(model, data, oracle.cross_entropy, model.blocks[1]),
                                           *dirs["second"]))


def test_fallback_keeps_auto_for_a_reused_layer():
    """A model with an op without a Taylor rule and a layer called twice: auto measures the one by the double
    backward and the other by the param route (method='output' would refuse it), both equal to the dense Hessian."""
    class OddReuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return torch.cumsum(self.b(torch.tanh(self.a(torch.tanh(self.a(x))))), -1)

    torch.manual_seed(6)
    model = OddReuse().to(DT).eval()
    check_dense(model, [(torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))], "cross_entropy",
                {"a": model.a, "b": model.b}, methods=("auto",))


def test_products_with_a_lower_rank_jet_broadcast_after_the_rows():
    """x (N, D) carrying T rows times a plain (B, N, D) with T = B: the rows must not line up with B."""
    from curvdist.math import jet
    g = torch.Generator().manual_seed(0)
    p, a, b = (torch.randn(3, 4, generator=g, dtype=DT) for _ in range(3))
    a, b = a[None].repeat(2, 1, 1), b[None].repeat(2, 1, 1) * torch.tensor([1.0, 2.0], dtype=DT)[:, None, None]
    c = torch.randn(2, 3, 4, generator=g, dtype=DT)
    for op in (torch.mul, torch.div):
        y = op(jet.seed(p, a, b), c)
        _, ya, yb = jet.parts(y, 2)
        want = op(a[:, None], c)                                   # (T, B, N, D): each row against all of c
        assert ya.shape == (2, 2, 3, 4)
        close(ya, want, 1e-14)
        close(yb, op(b[:, None], c), 1e-14)
