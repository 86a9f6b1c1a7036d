"""The seed paper's frozen per-layer results (``shared/paper-results/*.json``, MIT) as an external test vector.

Every α, R², γ, s, n_valid and BIC stored next to raw (σ_k, h_k) arrays is recomputed with
:func:`curvdist.math.fit.fit_exponents` / :func:`curvdist.math.fit.rank_model_bics` and must agree to 1e-6.
Conventions the numbers pin down (all consistent with SPEC §1):

- natural logs; k = position 1..K of σ in the (descending) SVD order;
- α over directions with σ > 0 and h > 0 only; n_valid counts them;
- γ and the rank-model BICs over the whole window k = 1..K, including directions whose h ≤ 0 (e.g. the 10-class
  ``fc``/``classifier.3`` heads, whose 10th direction has h < 0: γ over valid directions only would be 1.83, not 3.72);
- s over the positive h sorted descending, ranks 1..#(h > 0);
- BIC = n log(RSS/n) + p log n with p = 2, 2, 3; the files' log-normal "a" is the (log k)² coefficient (np.polyfit
  order), i.e. SPEC's b.

Stored numbers without the arrays they came from (ImageNet-1K and Tiny-ImageNet α maps; the Kronecker file's
BICs, computed over 64/100 directions of which only 30 are stored; ``s_weight``, fitted to weight singular values
that are not stored) cannot be recomputed; for them only the internal relations are checked
(predicted_s = αγ, triangle_error = |s − αγ|, relative error = that / s, best = min BIC).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

from curvdist.math.fit import RANK_MODELS, fit_exponents, rank_model_bics, summarize_layer

TOL = 1e-6


def _folder() -> Path:
    """The copy shipped in tests/data/paper-results (MIT, with its LICENSE); CURVDIST_PAPER_RESULTS overrides."""
    env = os.environ.get("CURVDIST_PAPER_RESULTS")
    return Path(env) if env else Path(__file__).resolve().parent / "data" / "paper-results"


FOLDER = _folder()
if not (FOLDER / "results_alpha_triangle.json").is_file():
    pytest.skip(f"seed-paper results not found in {FOLDER} (set CURVDIST_PAPER_RESULTS to the folder holding "
                "results_*.json)", allow_module_level=True)


def _load(name: str):
    return json.loads((FOLDER / name).read_text())


def _close(pairs: dict, tol: float = TOL):
    bad = {k: (ours, theirs) for k, (ours, theirs) in pairs.items()
           if ours is None or not math.isclose(ours, theirs, rel_tol=0, abs_tol=tol)}
    assert not bad, f"not reproduced (ours, paper): {bad}"


TRIANGLE = [(e["experiment"], r) for e in _load("results_alpha_triangle.json") for r in e["results"]]
TRIANGLE_BY_NAME = {(exp, r["name"]): r for exp, r in TRIANGLE}


def _alpha_cases():
    hyp = _load("results_hypothesis.json")
    cases = [(f"{group}/{sub}", r) for group, subs in hyp.items() for sub, rows in subs.items() for r in rows]
    cases += [(e["arch"], r) for e in _load("results_predictions.json") for r in e["results"]]
    return cases


ALPHA = _alpha_cases()
GAP = _load("results_conv_gap_v2.json")
GAP = GAP["conv_results"] + [GAP["fc_result"]]
MODEL_FIT = _load("results_model_fit_comparison.json")
NO_ARRAYS = ([("imagenet1k", r) for r in _load("results_imagenet1k_pretrained.json")["results"]]
             + [("tiny_imagenet", r) for r in _load("results_tiny_imagenet_alpha_map.json")["results"]])
KRON = _load("results_kronecker_spectral.json")["layers"]


@pytest.mark.parametrize("exp,r", TRIANGLE, ids=[f"{e}:{r['name']}" for e, r in TRIANGLE])
def test_alpha_triangle(exp, r):
    e = fit_exponents(r["sigma"], r["h_exact"])
    assert e.status == "ok"
    assert e.n_valid == sum(1 for s, h in zip(r["sigma"], r["h_exact"]) if s > 0 and h > 0)
    _close({"alpha": (e.alpha, r["alpha"]), "r2_alpha": (e.r2_alpha, r["r2_alpha"]),
            "gamma": (e.gamma, r["gamma"]), "r2_gamma": (e.r2_gamma, r["r2_gamma"]),
            "s": (e.s, r["s_hessian"]), "r2_s": (e.r2_s, r["r2_s_hessian"])})
    summary = summarize_layer(r["sigma"], r["h_exact"])
    _close({"predicted_s": (summary.alpha * summary.gamma, r["predicted_s"]),
            "triangle_error": (summary.triangle_error, r["triangle_error"]),
            "triangle_rel_error": (summary.triangle_rel_error, r["triangle_relative_error"])})


@pytest.mark.parametrize("tag,r", ALPHA, ids=[f"{t}:{r['name']}" for t, r in ALPHA])
def test_alpha_r2_n_valid(tag, r):
    e = fit_exponents(r["sigma"], r["h_exact"])
    assert e.n_valid == r["n_valid"]
    assert len(r["sigma"]) == r["top_k"]
    # these files' α were computed in float32 arithmetic: float64 OLS on the stored arrays differs by ≤ 2e-7
    _close({"alpha": (e.alpha, r["alpha"]), "r2": (e.r2_alpha, r["r2"])})


@pytest.mark.parametrize("r", GAP, ids=[r["name"] for r in GAP])
def test_conv_gap_alpha_and_decomposition(r):
    e = fit_exponents(r["sigma"], r["h_exact"])
    _close({"alpha": (e.alpha, r["alpha_exact"]), "r2": (e.r2_alpha, r["r2_exact"])})
    # with h_kron the decomposition is fitted on the common set, α stays the paper's α on its own set
    s = summarize_layer(r["sigma"], r["h_exact"], h_kron=r["h_kron"])
    assert s.status == "ok" and s.n_valid_kron == s.n_valid == e.n_valid
    _close({"alpha": (s.alpha, r["alpha_exact"])})
    assert abs(s.alpha - (s.alpha_kron + s.chi_slope)) < 1e-9


MF_LAYERS = MODEL_FIT["layers"]


@pytest.mark.parametrize("L", MF_LAYERS, ids=[f"{L['experiment']}:{L['name']}" for L in MF_LAYERS])
def test_rank_model_bics(L):
    sigma = TRIANGLE_BY_NAME[(L["experiment"], L["name"])]["sigma"]
    b = rank_model_bics(sigma)
    assert b["best"] == L["best_model_bic"]
    pairs = {"gamma_reported": (fit_exponents(sigma).gamma, L["gamma_reported"])}
    for m in RANK_MODELS:
        f = L["fits"][m]
        assert f["valid"] and b["n"] == f["n"] == L["top_k"]
        pairs.update({f"{m}.bic": (b[m]["bic"], f["bic"]), f"{m}.rss": (b[m]["rss"], f["rss"]),
                      f"{m}.log_c": (b[m]["log_c"], f["log_c"])})
    pairs["power_law.gamma"] = (b["power_law"]["gamma"], L["fits"]["power_law"]["gamma"])
    pairs["exponential.b"] = (b["exponential"]["b"], L["fits"]["exponential"]["beta"])
    pairs["lognormal.logk"] = (b["lognormal"]["a"], L["fits"]["lognormal"]["b"])       # files: polyfit order
    pairs["lognormal.logk2"] = (b["lognormal"]["b"], L["fits"]["lognormal"]["a"])
    d = L["delta_bic"]
    pairs["exp_minus_pl"] = (b["exponential"]["bic"] - b["power_law"]["bic"], d["exp_minus_pl"])
    pairs["ln_minus_pl"] = (b["lognormal"]["bic"] - b["power_law"]["bic"], d["ln_minus_pl"])
    pairs["ln_minus_exp"] = (b["lognormal"]["bic"] - b["exponential"]["bic"], d["ln_minus_exp"])
    _close(pairs)
    s = summarize_layer(sigma)
    _close({"bic_power_law": (s.bic_power_law, L["fits"]["power_law"]["bic"]),
            "bic_exponential": (s.bic_exponential, L["fits"]["exponential"]["bic"]),
            "bic_lognormal": (s.bic_lognormal, L["fits"]["lognormal"]["bic"])})
    assert s.rank_model == L["best_model_bic"]


def test_rank_model_wins_summary():
    wins = Counter(rank_model_bics(TRIANGLE_BY_NAME[(L["experiment"], L["name"])]["sigma"])["best"]
                   for L in MF_LAYERS)
    assert dict(wins) == {k: v for k, v in MODEL_FIT["summary"]["wins_by_bic"].items() if v}


@pytest.mark.parametrize("tag,r", NO_ARRAYS, ids=[f"{t}:{r['name']}" for t, r in NO_ARRAYS])
def test_stored_triangle_relations(tag, r):
    """No raw arrays stored: only the relations between the stored numbers can be checked."""
    _close({"predicted_s": (r["alpha"] * r["gamma"], r["predicted_s"]),
            "triangle_error": (abs(r["s_hessian"] - r["predicted_s"]), r["triangle_error"]),
            "triangle_rel_error": (r["triangle_error"] / abs(r["s_hessian"]), r["triangle_relative_error"])},
           tol=1e-12)
    if "bic" in r:
        assert r["best_bic"] == min(r["bic"], key=r["bic"].get)


@pytest.mark.parametrize("L", KRON, ids=[L["name"] for L in KRON])
def test_kronecker_best_model_is_min_bic(L):
    """BICs there were fitted on top_k_grad (64/100) values, of which only 30 are stored: relations only."""
    names = {"bic_pl": "power_law", "bic_exp": "exponential", "bic_ln": "lognormal"}
    for key in ("sigma", "delta", "A"):
        bic = L[f"{key}_bic"]
        assert L[f"{key}_bic_best"] == names[min(bic, key=bic.get)]
