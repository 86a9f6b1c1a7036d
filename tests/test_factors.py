"""curvdist.math.factors against curvlinops' KFAC ("expand", mean loss), autograd, and dense projections (float64).

Conventions checked exactly (see the curvdist.math.factors docstring):
- curvlinops' input covariance Σ a aᵀ / (N_data · weight-sharing size) == C_A = Σ a aᵀ / R;
- its gradient covariance == C_δ = Σ δδᵀ / N for CE (empirical / mc / type-2) and MSE (mc, type-2); MSE empirical:
  curvlinops scales the loss by √C, so its factor is C × ours;
- mc: with the same seed, curvlinops' sampler (its own CPU generator, float64 probabilities) draws exactly the labels
  and normals that curvdist.math.losses draws (CPU generator, float32 probabilities), so mc is compared exactly;
- targets -100: curvlinops' empirical matches with ``num_per_example_loss_terms`` = valid terms per sequence;
  its mc / type-2 still draw / expand at ignored positions and divide by all positions, so we compare against a
  model whose ignored logits are detached and rescale by (B·T)/N_valid.
Only the tests against curvlinops need it (and the GPT-2 ones transformers): the others run without them.
Per-unit gradient norms, the split halves and the combination of collectors' states are checked against autograd.
"""
import copy

import pytest
import torch
from torch import nn

from curvdist.math import layers as L
from curvdist.math import losses
from curvdist.math.collect import collect_projections, collect_statistics, run_collector
from curvdist.math.factors import StatisticsCollector
from curvdist.math.sequence import microbatch_generator

DT = torch.float64
SEED = 1234
TOL = {"rtol": 1e-10, "atol": 1e-12}


def kfac_factors(model_func, loss_func, mods, data, fisher, mc_samples=1, **kw):
    """{name: (C_A, C_δ)} from curvlinops for the modules ``mods`` ({name: module inside model_func}).

    ``mc``: curvdist draws the labels of micro-batch b from its own generator (``sequence.microbatch_generator``,
    so that pipelines and replicas draw the same labels in any order); curvlinops draws from one generator over the
    whole batch.  So curvlinops runs once per micro-batch with that micro-batch's seed, and its per-micro-batch
    factors are combined with the micro-batch sizes as weights (every sample has the same rows and loss terms)."""
    KFACLinearOperator = pytest.importorskip("curvlinops").KFACLinearOperator
    names = {id(m): n for n, m in model_func.named_modules()}
    params = [m.weight for m in mods.values()]

    def one(batches, seed):
        op = KFACLinearOperator(model_func, loss_func, params, batches, fisher_type=fisher, mc_samples=mc_samples,
                                kfac_approx="expand", seed=seed, check_deterministic=False, **kw)
        op.compute_kronecker_factors()
        return {n: (op._input_covariances[names[id(m)]], op._gradient_covariances[names[id(m)]])
                for n, m in mods.items()}

    if fisher != "mc":
        return one(data, SEED)
    sizes = [len(y) for _, y in data]
    parts = [one([batch], microbatch_generator(SEED, b).initial_seed()) for b, batch in enumerate(data)]
    return {n: tuple(sum(w * p[n][i] for w, p in zip(sizes, parts)) / sum(sizes) for i in (0, 1)) for n in mods}


CURV_FISHER = {"empirical": "empirical", "mc": "mc", "type2": "type-2"}


def assert_close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or TOL))


# -- models -------------------------------------------------------------------------------------------------------
def mlp(out=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(inplace=True), nn.Linear(7, out)).to(DT)


def mlp_layers(net):
    return {"0": net[0], "2": net[2], "4": net[4]}


def mlp_data(loss, out=4, sizes=(5, 3)):
    g = torch.Generator().manual_seed(1)
    data = []
    for b in sizes:
        x = torch.randn(b, 6, generator=g, dtype=DT)
        y = torch.randint(0, out, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, out, generator=g,
                                                                                                  dtype=DT)
        data.append((x, y))
    return data


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 5)).to(DT)


def gpt2():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(DT).eval()


def gpt2_layers(model):
    return {n: m for n, m in model.named_modules() if L.is_supported(m)}


def with_linear(model):
    """A copy with every GPT-2 Conv1D swapped for the equivalent nn.Linear (weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1]).to(DT)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


class SeqForKFAC(nn.Module):
    """GPT-2 for curvlinops: X = (B, 2, T) stacks ids and the valid-target mask; logits (B, V, T) (CE's class axis 1).
    With ``detach_ignored`` the logits at ignored targets are detached, so they seed no error."""

    def __init__(self, net, detach_ignored=False):
        super().__init__()
        self.net, self.detach_ignored = net, detach_ignored

    def forward(self, X):
        z = self.net(input_ids=X[:, 0]).logits
        if self.detach_ignored:
            z = torch.where(X[:, 1, :, None].bool(), z, z.detach())
        return z.transpose(1, 2)


def seq_data(sizes=(3, 2), T=6, ignored=0, uneven=False):
    g = torch.Generator().manual_seed(2)
    data = []
    for b in sizes:
        ids = torch.randint(0, 11, (b, T), generator=g)
        y = torch.randint(0, 11, (b, T), generator=g)
        for i in range(b):
            k = ignored + (i % 2 if uneven else 0)
            y[i, torch.randperm(T, generator=g)[:k]] = -100
        data.append((ids, y))
    return data


def for_kfac(data):
    return [(torch.stack([ids, (y != -100).long()], 1), y) for ids, y in data]


# -- (a) (b) (c): MLP with CE and MSE, CNN with CE ------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "mc", "type2"])
def test_mlp_cross_entropy_matches_curvlinops(fisher):
    net = mlp()
    data = mlp_data("cross_entropy")
    ours = collect_statistics(net, data, "cross_entropy", fisher=fisher, layers=mlp_layers(net), stat_dtype=DT,
                              mc_samples=2 if fisher == "mc" else 1, seed=SEED)
    ref = kfac_factors(net, nn.CrossEntropyLoss(), mlp_layers(net), data, CURV_FISHER[fisher],
                       mc_samples=2 if fisher == "mc" else 1)
    for name, (A, D) in ref.items():
        assert ours[name].rows == 8 and ours[name].n_terms == 8 and ours[name].status == "ok"
        assert_close(ours[name].C_A, A)
        assert_close(ours[name].C_delta, D)


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type2"])
def test_mlp_mse_matches_curvlinops(fisher):
    C = 3
    net = mlp(out=C)
    data = mlp_data("mse", out=C)
    ours = collect_statistics(net, data, "mse", fisher=fisher, layers=mlp_layers(net), stat_dtype=DT, seed=SEED)
    ref = kfac_factors(net, nn.MSELoss(), mlp_layers(net), data, CURV_FISHER[fisher])
    # curvlinops multiplies the mean MSE by √C before its empirical backward (its Fisher is that of ‖z−y‖² with
    # a 1/C prefactor): its empirical C_δ is C × the second moment of ∇ℓ_t.  mc and type-2 agree exactly.
    factor = C if fisher == "empirical" else 1
    for name, (A, D) in ref.items():
        assert_close(ours[name].C_A, A)
        assert_close(ours[name].C_delta * factor, D)


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_cnn_matches_curvlinops_expand(fisher):
    net = cnn()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(b, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 5, (b,), generator=g)) for b in (3, 2)]
    mods = {"0": net[0], "2": net[2], "5": net[5]}
    ours = collect_statistics(net, data, "cross_entropy", fisher=fisher, layers=mods, stat_dtype=DT)
    ref = kfac_factors(net, nn.CrossEntropyLoss(), mods, data, CURV_FISHER[fisher])
    assert ours["0"].rows == 5 * 36 and ours["2"].rows == 5 * 4 and ours["5"].rows == 5
    assert (ours["0"].m, ours["0"].n) == (3, 18)
    for name, (A, D) in ref.items():
        assert ours[name].n_terms == 5
        assert_close(ours[name].C_A, A)
        assert_close(ours[name].C_delta, D)


# -- (d): tiny GPT-2 with (B, T, V) logits -------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "mc", "type2"])
def test_gpt2_sequence_matches_curvlinops(fisher):
    model = gpt2()
    data = seq_data()
    ours = collect_statistics(model, data, "cross_entropy", fisher=fisher, layers=gpt2_layers(model), stat_dtype=DT,
                              seed=SEED)
    lin = SeqForKFAC(with_linear(model))
    ref = kfac_factors(lin, nn.CrossEntropyLoss(), gpt2_layers(lin.net), for_kfac(data), CURV_FISHER[fisher])
    assert set(ref) == set(ours) and len(ours) == 5
    for name, (A, D) in ref.items():
        assert ours[name].rows == 30 and ours[name].n_terms == 30
        assert_close(ours[name].C_A, A)
        assert_close(ours[name].C_delta, D)


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type2"])
def test_gpt2_ignored_targets(fisher):
    model = gpt2()
    data = seq_data(ignored=2)  # every sequence has T − 2 = 4 valid targets
    B, T, n_valid = 5, 6, 20
    ours = collect_statistics(model, data, "cross_entropy", fisher=fisher, layers=gpt2_layers(model), stat_dtype=DT,
                              seed=SEED)
    if fisher == "empirical":  # curvlinops' CE divides by the valid targets; tell it how many there are per sequence
        lin = SeqForKFAC(with_linear(model))
        ref = kfac_factors(lin, nn.CrossEntropyLoss(), gpt2_layers(lin.net), for_kfac(data), "empirical",
                           num_per_example_loss_terms=n_valid // B)
        scale = 1.0
    else:  # curvlinops seeds every position and divides by B·T: detach ignored logits, rescale by B·T / N_valid
        lin = SeqForKFAC(with_linear(model), detach_ignored=True)
        ref = kfac_factors(lin, nn.CrossEntropyLoss(), gpt2_layers(lin.net), for_kfac(data), CURV_FISHER[fisher])
        scale = B * T / n_valid
    for name, (A, D) in ref.items():
        assert ours[name].rows == B * T and ours[name].n_terms == n_valid
        assert_close(ours[name].C_A, A)
        assert_close(ours[name].C_delta, D * scale)
    if fisher == "type2":  # independent scale check at the head, whose errors are the seeds: tr C_δ = mean tr ∇²ℓ
        tr = 0.0
        for ids, y in data:
            p = model(input_ids=ids).logits.softmax(-1)[y != -100]
            tr += (1 - (p * p).sum(-1)).sum()
        assert_close(ours["lm_head"].C_delta.trace(), tr / n_valid)


@pytest.mark.parametrize("case", ["mlp", "cnn", "gpt2"])
def test_gradient_equals_autograd(case):
    if case == "mlp":
        net, data, loss = mlp(), mlp_data("cross_entropy"), "cross_entropy"
        mods, call = mlp_layers(net), (lambda x: net(x))
    elif case == "cnn":
        net, loss = cnn(), "cross_entropy"
        g = torch.Generator().manual_seed(3)
        data = [(torch.randn(b, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 5, (b,), generator=g))
                for b in (3, 2)]
        mods, call = {"0": net[0], "2": net[2], "5": net[5]}, (lambda x: net(x))
    else:
        net, data, loss = gpt2(), seq_data(ignored=1, uneven=True), "cross_entropy"
        mods, call = gpt2_layers(net), (lambda x: net(input_ids=x).logits)
    ours = collect_statistics(net, data, loss, fisher="type2", layers=mods, stat_dtype=DT)
    total, N = 0.0, 0
    for x, y in data:
        mean, n, _ = losses.loss_terms(call(x), y, loss)
        total, N = total + mean * n, N + n
    grads = torch.autograd.grad(total / N, [m.weight for m in mods.values()])
    for (name, mod), gw in zip(mods.items(), grads):
        assert ours[name].n_terms == N
        assert_close(L.matrix_to_weight(mod, ours[name].G), gw, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in net.parameters())  # parameter .grad untouched


# -- invariances, masks, budget ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_microbatch_invariance(fisher):
    model = gpt2()
    (ids, y), = seq_data(sizes=(8,), ignored=1, uneven=True)
    one = collect_statistics(model, [(ids, y)], "cross_entropy", fisher=fisher, layers=gpt2_layers(model),
                             stat_dtype=DT)
    four = collect_statistics(model, [(ids[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], "cross_entropy",
                              fisher=fisher, layers=gpt2_layers(model), stat_dtype=DT)
    for name in one:
        assert one[name].n_terms == four[name].n_terms == int((y != -100).sum())
        for f in ("G", "C_A", "C_delta"):
            assert_close(getattr(one[name], f), getattr(four[name], f), rtol=0, atol=1e-12)


def test_padding_mask_drops_rows():
    """Right-padded batch with attention_mask == the unpadded sequences one by one (causal attention)."""
    model = gpt2()
    g = torch.Generator().manual_seed(5)
    lengths, T = (5, 3, 4), 5
    seqs = [torch.randint(0, 11, (n,), generator=g) for n in lengths]
    tgts = [torch.randint(0, 11, (n,), generator=g) for n in lengths]
    ids = torch.zeros(3, T, dtype=torch.long)
    y = torch.full((3, T), -100)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, tgts)):
        ids[i, :len(s)], y[i, :len(t)], mask[i, :len(s)] = s, t, 1
    mods = gpt2_layers(model)
    padded = collect_statistics(model, [({"input_ids": ids, "attention_mask": mask}, y)], "cross_entropy",
                                fisher="type2", layers=mods, stat_dtype=DT)
    single = collect_statistics(model, [({"input_ids": s[None]}, t[None]) for s, t in zip(seqs, tgts)],
                                "cross_entropy", fisher="type2", layers=mods, stat_dtype=DT)
    unmasked = collect_statistics(model, [({"input_ids": ids}, y)], "cross_entropy", fisher="type2", layers=mods,
                                  stat_dtype=DT)
    for name in mods:
        assert padded[name].rows == single[name].rows == 12 and unmasked[name].rows == 15
        for f in ("G", "C_A", "C_delta"):
            assert_close(getattr(padded[name], f), getattr(single[name], f))
        assert not torch.allclose(unmasked[name].C_A, single[name].C_A)  # padding rows would pollute C_A


def test_budget_never_allocates_the_factor():
    net = mlp()
    mods = {"2": net[2]}  # m = 7, n = 8: C_δ 7×7 float64 = 392 B, C_A 8×8 = 512 B
    data = mlp_data("cross_entropy")
    col = StatisticsCollector(mods, stat_dtype=DT, factor_budget_bytes=400)
    assert col.layers["2"].cov_A is None and col.layers["2"].cov_delta is not None
    run_collector(col, net, data, "cross_entropy", "empirical", 1, 0, "stats")
    assert col.layers["2"].cov_A is None
    st = col.finalize()["2"]
    full = collect_statistics(net, data, "cross_entropy", layers=mods, stat_dtype=DT)["2"]
    assert st.C_A is None and st.factor_bytes == 392
    assert st.status == ("factor_too_large: C_A is 8×8 float64 = 512 B > budget 400 B; "
                         "raise factor_budget_gb or set factor_mode=auto (a Nyström sketch of it)")
    assert st.modes == (None, "dense")
    assert_close(st.G, full.G)
    assert_close(st.C_delta, full.C_delta)
    big = StatisticsCollector({"h": nn.Linear(8, 49152, device="meta")}, factor_budget_bytes=4 * 10 ** 9)
    assert big.layers["h"].cov_delta is None and big.layers["h"].cov_A is not None
    assert big.layers["h"].status == [("factor_too_large: C_delta is 49152×49152 float32 = 9.66 GB > budget 4.00 GB; "
                                       "raise factor_budget_gb or set factor_mode=auto (a Nyström sketch of it)")]
    # auto: the same factor as a sketch (2 × 49152 × (512 + 10) float32 = 205 MB); a sketch no smaller than the
    # dense factor that did not fit cannot fit either, and the reason names the keys that help
    auto = StatisticsCollector({"h": nn.Linear(8, 49152, device="meta")}, factor_budget_bytes=4 * 10 ** 9,
                               factor_mode="auto")
    assert auto.layers["h"].modes == ("dense", "sketch") and auto.layers["h"].status == []
    assert auto.layers["h"].cov_delta.nbytes == 2 * 49152 * 522 * 4
    tiny = StatisticsCollector(mods, stat_dtype=DT, factor_budget_bytes=400, factor_mode="auto")
    assert tiny.layers["2"].modes == (None, "dense")
    assert tiny.layers["2"].status == [("factor_too_large: C_A is 8×8 float64 = 512 B > budget 400 B, and its "
                                        "sketch (2 × 8×18) = 2.30 kB too; raise factor_budget_gb or lower sketch_rank")]


def test_pipeline_stage_usage():
    """A stage that runs only the first layers and receives its output gradient from the next stage."""
    net = mlp()
    data = mlp_data("cross_entropy")
    stage1, stage2 = net[:3], net[3:]
    col = StatisticsCollector({"0": net[0], "2": net[2]}, stat_dtype=DT)
    with col:
        for x, y in data:
            col.begin_microbatch()
            h = stage1(x)
            h_in = h.detach().requires_grad_()
            z = stage2(h_in.clone())  # stage2 starts with an in-place ReLU
            _, n, _ = losses.loss_terms(z, y, "cross_entropy")
            seeds = [("true", next(losses.error_seeds(z, y, "cross_entropy", "empirical")))]
            seeds += [("fisher", s) for s in losses.error_seeds(z, y, "cross_entropy", "type2")]
            for kind, s in seeds:
                gh, = torch.autograd.grad(z, h_in, s, retain_graph=True)  # "received from the next stage"
                col.seed_kind(kind)
                torch.autograd.grad(h, col.outputs(), gh, retain_graph=True)
                col.seed_kind(None)
            col.end_microbatch(n)
    staged = col.finalize()
    full = collect_statistics(net, data, "cross_entropy", fisher="type2", layers=mlp_layers(net), stat_dtype=DT)
    for name in staged:
        for f in ("G", "C_A", "C_delta"):
            assert_close(getattr(staged[name], f), getattr(full[name], f))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_microbatches_in_flight_and_combined(fisher):
    """Several micro-batches in flight on one stage (all forwards first, backwards in reverse order, as a pipeline
    schedule may run them), and collectors over disjoint micro-batches combined by summing their states (what the
    replicas' all-reduce does): both equal the plain in-process collection."""
    from curvdist.math.sequence import error_seeds

    net = mlp()
    data = mlp_data("cross_entropy") * 2
    mods = mlp_layers(net)
    full = collect_statistics(net, data, "cross_entropy", fisher=fisher, layers=mods, stat_dtype=DT, seed=3)

    def run(col, keys):
        with col:
            open_ = {}
            for b in keys:
                x, y = data[b]
                col.begin_microbatch(key=b)
                open_[b] = (net(x), y)
            assert col.in_flight == len(keys)
            for b in reversed(keys):
                z, y = open_.pop(b)
                _, n, _ = losses.loss_terms(z, y, "cross_entropy")
                for kind, s in error_seeds(z, y, loss="cross_entropy", fisher=fisher, mc_samples=1, seed=3,
                                           pass_kind="stats", microbatch=b):
                    col.seed_kind(kind)
                    torch.autograd.grad(z, col.outputs(b), s, retain_graph=True)
                    col.seed_kind(None)
                col.end_microbatch(n, key=b)
        return col

    keys = list(range(len(data)))
    interleaved = run(StatisticsCollector(mods, stat_dtype=DT), keys).finalize()
    a = run(StatisticsCollector(mods, stat_dtype=DT), keys[::2])
    b = run(StatisticsCollector(mods, stat_dtype=DT), keys[1::2])
    combined = StatisticsCollector(mods, stat_dtype=DT)
    combined.set_state([x + y for x, y in zip(a.state(), b.state())])
    combined = combined.finalize()
    for name in full:
        assert interleaved[name].n_terms == combined[name].n_terms == full[name].n_terms
        assert interleaved[name].rows == combined[name].rows == full[name].rows
        for f in ("G", "C_A", "C_delta"):
            assert_close(getattr(interleaved[name], f), getattr(full[name], f))
            assert_close(getattr(combined[name], f), getattr(full[name], f))
    # one half alone is not the whole: the check above can fail
    assert not torch.allclose(a.finalize()["0"].G, full["0"].G)


# -- projections ---------------------------------------------------------------------------------------------------
def _directions(mods, K=3):
    g = torch.Generator().manual_seed(7)
    return {n: (torch.randn(K, L.shape(m)[0], generator=g, dtype=DT), torch.randn(K, L.shape(m)[1], generator=g,
                                                                                    dtype=DT))
            for n, m in mods.items()}


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type2"])
def test_projections_equal_rayleigh_quotients(fisher):
    net = mlp()
    data = mlp_data("cross_entropy")
    mods = mlp_layers(net)
    dirs = _directions(mods)
    kw = {"fisher": fisher, "layers": mods, "stat_dtype": DT, "mc_samples": 3, "seed": SEED}
    stats = collect_statistics(net, data, "cross_entropy", **kw)
    proj = collect_projections(net, data, "cross_entropy", directions=dirs, **kw)
    for name, (U, V) in dirs.items():
        assert_close(proj[name].rayleigh_delta, torch.einsum("km,mp,kp->k", U, stats[name].C_delta, U))
        assert_close(proj[name].rayleigh_A, torch.einsum("kn,np,kp->k", V, stats[name].C_A, V))
    # h^SoP at the head, whose input rows are the features and whose error rows are the seeds themselves
    U, V = dirs["4"]
    sop, N = 0.0, 0
    for b, (x, y) in enumerate(data):
        a, z = net[:4](x), net(x)
        gen = microbatch_generator(SEED, b)
        for s in losses.error_seeds(z, y, "cross_entropy", fisher, generator=gen, mc_samples=3):
            sop = sop + ((s @ U.T) ** 2 * (a @ V.T) ** 2).sum(0)
        N += x.shape[0]
    assert_close(proj["4"].h_sop, sop / N)
    assert (proj["0"].h_sop > 0).all()


def test_projections_gpt2_with_mask():
    model = gpt2()
    mods = gpt2_layers(model)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    y = torch.where(mask.bool(), ids.roll(-1, 1), torch.full_like(ids, -100))
    data = [({"input_ids": ids, "attention_mask": mask}, y)]
    dirs = _directions(mods, K=2)
    stats = collect_statistics(model, data, "cross_entropy", fisher="type2", layers=mods, stat_dtype=DT)
    proj = collect_projections(model, data, "cross_entropy", fisher="type2", layers=mods, directions=dirs,
                               stat_dtype=DT)
    for name, (U, V) in dirs.items():
        assert stats[name].rows == 8
        assert_close(proj[name].rayleigh_delta, torch.einsum("km,mp,kp->k", U, stats[name].C_delta, U))
        assert_close(proj[name].rayleigh_A, torch.einsum("kn,np,kp->k", V, stats[name].C_A, V))


def test_float32_accumulation_close_to_float64():
    net = mlp()
    data = mlp_data("cross_entropy")
    s64 = collect_statistics(net, data, "cross_entropy", layers=mlp_layers(net), stat_dtype=DT)
    s32 = collect_statistics(net, data, "cross_entropy", layers=mlp_layers(net))
    for name in s64:
        assert s32[name].C_A.dtype == torch.float32 and s32[name].factor_bytes == 4 * (s32[name].m ** 2 +
                                                                                       s32[name].n ** 2)
        for f in ("G", "C_A", "C_delta"):
            torch.testing.assert_close(getattr(s32[name], f).double(), getattr(s64[name], f), rtol=1e-5, atol=1e-7)


def test_dense_factors_of_wide_layers_accumulate_one_triangle():
    """Layers wider than one accumulation block (d ≥ 128: the upper block triangle only, mirrored when read) give
    the full Σ x xᵀ; the running sum keeps zeros below the diagonal blocks, so states of disjoint collectors add."""
    g = torch.Generator().manual_seed(5)
    net = nn.Linear(300, 130, dtype=DT)            # C_A 300 × 300 (8 block rows, a ragged last one), C_δ 130 × 130
    data = [(torch.randn(b, 300, generator=g, dtype=DT), torch.randn(b, 130, generator=g, dtype=DT)) for b in (40, 23)]
    ours = collect_statistics(net, data, "mse", fisher="empirical", layers={"lin": net}, stat_dtype=DT)["lin"]
    X = torch.cat([x for x, _ in data])
    rows = []
    for x, y in data:                              # δ: the gradient of the summed loss at the layer output
        z = net(x)
        mean, n, _ = losses.loss_terms(z, y, "mse")
        rows.append(torch.autograd.grad(mean * n, z)[0])
    D = torch.cat(rows)
    assert_close(ours.C_A, X.T @ X / X.shape[0], rtol=1e-12, atol=1e-14)
    assert torch.equal(ours.C_A, ours.C_A.T) and torch.equal(ours.C_delta, ours.C_delta.T)
    assert_close(ours.C_delta, D.T @ D / ours.n_terms, rtol=1e-12, atol=1e-14)
    parts = []
    for part in data:
        col = StatisticsCollector({"lin": net}, stat_dtype=DT)
        run_collector(col, net, [part], "mse", "empirical", 1, 0, "stats")
        acc = col.layers["lin"].cov_A
        assert acc.block < 300 and not acc.sum[acc.block:, :acc.block].any()   # below the diagonal blocks: zeros
        parts.append(col.state())
    both = StatisticsCollector({"lin": net}, stat_dtype=DT)
    both.set_state([a + b for a, b in zip(*parts)])
    assert_close(both.finalize()["lin"].C_A, ours.C_A, rtol=1e-12, atol=1e-14)


def test_the_mirrored_triangle_is_the_full_second_moment_at_every_width():
    """Every width across the first four block sizes (d < 128: one product; 128: block 16, narrower than the
    64-wide mirror tile; 129–256: 32; 257–384: 48; 385–512: 64), ragged rows included: the triangle read back
    equals Σ x xᵀ.  (d = 128 once lost the upper blocks to not-yet-mirrored zeros.)"""
    from curvdist.math.moments import DenseSecondMoment
    g = torch.Generator().manual_seed(11)
    x = torch.randn(37, 530, generator=g, dtype=DT)
    for d in range(100, 530):
        acc = DenseSecondMoment(d, DT)
        acc.update(x[:20, :d])
        acc.update(x[20:, :d])
        want = x[:, :d].T @ x[:, :d]
        err = (acc.value(1) - want).abs().max().item()
        assert err < 1e-12 * want.abs().max().item(), (d, acc.block, err)


def test_errors():
    net = mlp()
    with pytest.raises(ValueError, match="not supported"):
        StatisticsCollector({"t": nn.Tanh()})
    with pytest.raises(ValueError, match="fisher"):
        collect_statistics(net, mlp_data("cross_entropy"), "cross_entropy", fisher="kfac", layers=mlp_layers(net))
    with pytest.raises(ValueError, match="empty"):
        collect_statistics(net, [], "cross_entropy", layers=mlp_layers(net))
    with pytest.raises(ValueError, match="unknown layers"):
        collect_projections(net, mlp_data("cross_entropy"), "cross_entropy", layers=mlp_layers(net),
                            directions={"nope": (torch.zeros(1, 2), torch.zeros(1, 2))})


# -- per-unit gradient norms, split halves, combining collectors ---------------------------------------------------
def feed(col, model, items, loss="cross_entropy", fisher="type2", call=None):
    """Run ``col`` over ``items`` = [(key, x, y)] with the true seed (G) and the fisher seeds (C_δ), keyed."""
    call = call or (lambda x: model(x))
    with col:
        for key, x, y in items:
            col.begin_microbatch(forward_mask(x), key=key)
            z = call(x)
            _, n, _ = losses.loss_terms(z, y, loss)
            seeds = [("true", next(losses.error_seeds(z, y, loss, "empirical")))]
            seeds += [("fisher", s) for s in losses.error_seeds(z, y, loss, fisher)]
            for kind, s in seeds:
                col.seed_kind(kind)
                torch.autograd.grad(z, col.outputs(key), s, retain_graph=True)
                col.seed_kind(None)
            col.end_microbatch(n, key=key)
    return col


def forward_mask(x):
    return x.get("attention_mask") if isinstance(x, dict) else None


class Reused(nn.Module):
    """One Linear applied twice per forward (weight reuse): its per-unit norms need the cross terms of the calls."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def unit_cases(case):
    """(model, data, layers, call, unit gradients fn) for the per-unit checks."""
    g = torch.Generator().manual_seed(21)
    if case == "mlp":
        net = mlp()
        return net, mlp_data("cross_entropy", sizes=(5, 3, 4)), mlp_layers(net), (lambda x: net(x))
    if case == "cnn":  # many positions per image, small m·n: the explicit per-unit form
        net = cnn()
        data = [(torch.randn(b, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 5, (b,), generator=g))
                for b in (3, 2, 2)]
        return net, data, {"0": net[0], "2": net[2], "5": net[5]}, (lambda x: net(x))
    if case == "reuse":
        torch.manual_seed(3)
        net = Reused().to(DT)
        return net, mlp_data("cross_entropy", sizes=(4, 3)), {"lin": net.lin, "head": net.head}, (lambda x: net(x))
    net = gpt2()  # sequences: ragged valid targets and a padded micro-batch
    data = seq_data(sizes=(3, 2, 2), ignored=1, uneven=True)
    ids, y = data[1]
    data[1] = ({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])},
               torch.where(torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]).bool(), y, torch.full_like(y, -100)))
    data = [(x if isinstance(x, dict) else {"input_ids": x}, t) for x, t in data]
    return net, data, gpt2_layers(net), (lambda x: net(**x).logits)


def unit_gradients(net, data, mods, call):
    """Per unit (item of the leading axis of each micro-batch), the gradient of its summed loss by autograd, in
    the weight's layout, flattened."""
    out = {name: [] for name in mods}
    weights = [m.weight for m in mods.values()]
    for x, y in data:
        for b in range(y.shape[0]):
            xb = {k: v[b:b + 1] for k, v in x.items()} if isinstance(x, dict) else x[b:b + 1]
            mean, n, _ = losses.loss_terms(call(xb), y[b:b + 1], "cross_entropy")
            for name, gw in zip(mods, torch.autograd.grad(mean * n, weights)):
                out[name].append(gw.detach().reshape(-1))
    return out


@pytest.mark.parametrize("case", ["mlp", "cnn", "reuse", "gpt2"])
def test_gradient_noise_from_per_unit_gradients(case):
    """grad_mean_sq, grad_trace_cov, grad_snr and noise_scale equal the McCandlish estimators computed from the
    per-unit gradients g_u of autograd (x_u = (U/N) g_u): per-unit norms from row Grams (or per-unit products) are
    exact, for sequences with padding and -100 targets, convolutions, and a layer called twice per forward."""
    net, data, mods, call = unit_cases(case)
    stats = collect_statistics(net, data, "cross_entropy", layers=mods, stat_dtype=DT)
    per_unit = unit_gradients(net, data, mods, call)
    for name in mods:
        g = torch.stack(per_unit[name])               # (U, m·n)
        U, N = g.shape[0], stats[name].n_terms
        x = (U / N) * g
        G = x.mean(0)
        assert_close(G, L.matrix_to_weight(mods[name], stats[name].G).reshape(-1))
        S = (x * x).sum(1).mean()
        tr, mean_sq = U / (U - 1) * (S - G @ G), (U * (G @ G) - S) / (U - 1)
        gn = stats[name].noise
        assert gn.n_units == U
        assert gn.grad_trace_cov == pytest.approx(float(tr), rel=1e-9)
        assert gn.grad_mean_sq == pytest.approx(float(mean_sq), rel=1e-9, abs=1e-12 * float(S))
        assert gn.grad_snr == pytest.approx(float(G @ G) * U / float(tr), rel=1e-9)
        if gn.noise_scale is not None:
            assert gn.noise_scale == pytest.approx(float(tr / mean_sq), rel=1e-8)
            assert gn.grad_snr == pytest.approx(1 + U / gn.noise_scale, rel=1e-9)


@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_halves_are_the_gradients_of_their_microbatches(case):
    """G_a (even keys) and G_b (odd keys) equal the mean-loss gradients over those micro-batches alone."""
    net, data, mods, _ = unit_cases(case)
    stats = collect_statistics(net, data, "cross_entropy", layers=mods, stat_dtype=DT)
    a = collect_statistics(net, data[0::2], "cross_entropy", layers=mods, stat_dtype=DT)
    b = collect_statistics(net, data[1::2], "cross_entropy", layers=mods, stat_dtype=DT)
    for name in mods:
        G_a, G_b = stats[name].halves
        assert_close(G_a, a[name].G)
        assert_close(G_b, b[name].G)
    one = collect_statistics(net, data[:1], "cross_entropy", layers=mods, stat_dtype=DT)
    assert all(st.halves is None for st in one.values())   # half b is empty


@pytest.mark.parametrize("case", ["mlp", "reuse", "gpt2"])
def test_states_of_disjoint_collectors_sum_to_one_collector(case):
    """Replicas: collectors over disjoint micro-batches (by key), states summed, give the collector of all of them,
    for every statistic: G, C_A, C_δ, G of half a, Σ‖g_u‖², N, N_a, R and the units."""
    net, data, mods, call = unit_cases(case)
    items = [(k, x, y) for k, (x, y) in enumerate(data)]
    whole = feed(StatisticsCollector(mods, stat_dtype=DT), net, items, call=call)
    parts = [feed(StatisticsCollector(mods, stat_dtype=DT), net, items[r::2], call=call) for r in (1, 0)]
    merged = StatisticsCollector(mods, stat_dtype=DT)
    merged.set_state([x + y for x, y in zip(*(p.state() for p in parts))])
    assert len(merged.state()) == len(whole.state())
    for x, y in zip(merged.state(), whole.state()):
        assert_close(x, y)
    want, got = whole.finalize(), merged.finalize()
    for name in mods:
        for f in ("G", "C_A", "C_delta"):
            assert_close(getattr(got[name], f), getattr(want[name], f))
        for x, y in zip(got[name].halves, want[name].halves):
            assert_close(x, y)
        for key, v in want[name].noise.as_dict().items():   # noise_scale is None where ‖μ‖²^ ≤ 0
            assert got[name].noise.as_dict()[key] == (v if v is None else pytest.approx(v, rel=1e-12)), key
