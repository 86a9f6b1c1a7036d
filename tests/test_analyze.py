"""The in-process API: tables, statuses for degenerate layers, the factor budget, the decomposition identity."""
import math

import pytest
import torch
from torch import nn

import curvdist


def mlp_data(seed=0, n=3, B=16, d=10, C=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, d, generator=g, dtype=torch.float64), torch.randint(0, C, (B,), generator=g))
            for _ in range(n)]


def mlp(seed=0, d=10, h=24, C=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, C)).double()


def test_tables_and_identity_mlp():
    res = curvdist.analyze(mlp(), mlp_data(), top_k=4)
    layers = res.layers.to_pylist()
    assert [r["layer"] for r in layers] == ["0", "2", "4"]
    assert [r["layer_type"] for r in layers][-1] == "head"
    for r in layers:
        assert r["fisher"] == "empirical" and r["rows"] == 48 and r["n_terms"] == 48
        if r["alpha_kron"] is not None and r["beta"] is not None:
            assert abs(r["alpha_kron"] - (r["beta"] + r["phi"])) <= 1e-9
        if r["chi_slope"] is not None:
            assert abs(r["alpha"] - (r["alpha_kron"] + r["chi_slope"])) <= 1e-9
    d = res.directions.to_pylist()
    assert {c for c in d[0]} >= {"sigma", "h", "h_gn", "h_kron", "h_sop", "rho_delta", "rho_A", "phi", "Lambda", "chi"}
    for row in d:  # h_kron = Φ Λ exactly, χ = h / h_kron
        assert math.isclose(row["h_kron"], row["phi"] * row["Lambda"], rel_tol=1e-10)
        assert math.isclose(row["chi"], row["h"] / row["h_kron"], rel_tol=1e-10)
    # the head of a linear + CE network: exact Hessian = Gauss–Newton there
    for row in d:
        if row["layer"] == "4":
            assert math.isclose(row["h"], row["h_gn"], rel_tol=1e-9)


def test_top_k_above_rank_fits_the_available_directions():
    """min(m, n) < K: the layer is fitted on its min(m, n) directions (as the seed paper fitted its 10-class
    heads), n_valid says how many, and the numbers equal those of top_k = min(m, n)."""
    res = curvdist.analyze(mlp(), mlp_data(), top_k=8)   # the head is 5 × 24
    head = res.layer("4")
    assert head["status"] == "ok" and head["n_valid"] == 4   # a CE head's G has rank C − 1: σ_5 = 0
    assert head["alpha"] is not None and head["alpha_kron"] is not None
    assert len([r for r in res.directions.to_pylist() if r["layer"] == "4"]) == 5
    five = curvdist.analyze(mlp(), mlp_data(), top_k=5).layer("4")
    for key in ("alpha", "alpha_kron", "beta", "phi", "gamma", "n_valid", "grad_snr"):
        assert head[key] == pytest.approx(five[key], rel=1e-9), key
    tiny = curvdist.analyze(nn.Sequential(nn.Linear(10, 2)).double(), mlp_data(C=2), top_k=8).layer("0")
    assert tiny["n_valid"] == 1 and tiny["alpha"] is None and tiny["status"].startswith("too_few_valid")


def test_zero_and_non_finite_gradients():
    model = mlp()
    with torch.no_grad():
        model[4].weight.zero_()          # nothing flows back into layer "2" and "0"
    res = curvdist.analyze(model, mlp_data(), top_k=3)
    for name in ("0", "2"):
        r = res.layer(name)
        assert r["status"].startswith("zero_gradient") and r["alpha"] is None
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    res = curvdist.analyze(model, mlp_data(), top_k=3, exact=False)
    assert res.layer("0")["status"].startswith("non_finite_gradient")


def test_factor_budget_never_allocates_and_run_goes_on():
    model = mlp()
    budget = 20 * 20 * 8                  # C_A of layers "2", "4" (24²) and C_δ of "0", "2" (24²) exceed it
    res = curvdist.analyze(model, mlp_data(), top_k=4, factor_budget_bytes=budget)
    r = res.layer("2")
    assert r["status"].startswith("factor_too_large")
    assert r["beta"] is None and r["phi"] is None
    assert r["alpha"] is not None and r["alpha_kron"] is not None   # projected Rayleigh quotients still give h^Kron
    full = curvdist.analyze(model, mlp_data(), top_k=4)
    a = [x["h_kron"] for x in res.directions.to_pylist() if x["layer"] == "2"]
    b = [x["h_kron"] for x in full.directions.to_pylist() if x["layer"] == "2"]
    assert all(math.isclose(x, y, rel_tol=1e-10) for x, y in zip(a, b))


def test_exact_false_and_exact_layers():
    res = curvdist.analyze(mlp(), mlp_data(), top_k=3, exact=False)
    assert all(r["h"] is None and r["h_gn"] is None for r in res.directions.to_pylist())
    assert all(r["alpha"] is None for r in res.layers.to_pylist())
    res = curvdist.analyze(mlp(), mlp_data(), top_k=3, exact_layers=["4"])
    assert {r["layer"] for r in res.directions.to_pylist() if r["h"] is not None} == {"4"}


def test_cnn_and_gpt2_run_with_identity():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 3 * 3, 4)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g))]
    res = curvdist.analyze(cnn, data, top_k=4)
    assert [r["layer_type"] for r in res.layers.to_pylist()] == ["conv", "conv", "head"]
    assert res.layer("0")["rows"] == 6 * 64
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    tgt = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
    res = curvdist.analyze(model, [({"input_ids": ids}, tgt)], top_k=5, dtype=torch.float64)
    types = {r["layer"]: (r["layer_type"], r["block"]) for r in res.layers.to_pylist()}
    assert types["transformer.h.1.mlp.c_fc"] == ("mlp_up", 1) and types["lm_head"][0] == "head"
    for r in res.layers.to_pylist():
        if r["beta"] is not None:
            assert abs(r["alpha_kron"] - (r["beta"] + r["phi"])) <= 1e-9


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss"):
        curvdist.analyze(mlp(), mlp_data(), loss="hinge")
    with pytest.raises(ValueError, match="fisher"):
        curvdist.analyze(mlp(), mlp_data(), fisher="kfac")
    with pytest.raises(ValueError, match="empty"):
        curvdist.analyze(mlp(), [])
    with pytest.raises(ValueError, match="matches no"):
        curvdist.analyze(mlp(), mlp_data(), layers=["nope*"])
