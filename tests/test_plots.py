"""curvdist.plots: every figure is written as a non-empty PNG from a synthetic dataset written through the store."""
import numpy as np
import pytest

from curvdist import plots
from curvdist.io import store

PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(out, run_id, n_blocks=3, K=8, null_alpha=()):
    rng = np.random.default_rng(0)
    layers, dirs = [], []
    for b in range(n_blocks):
        for t in ("attn_q", "attn_out", "mlp_up", "mlp_down"):
            name = f"model.layers.{b}.{t}"
            alpha = None if name in null_alpha else 1.0 + rng.uniform(0, 1)
            beta, phi = 2.0, rng.normal(0, 0.1)
            gamma = 0.5 + rng.uniform(0, 0.3)
            sigma = np.arange(1, K + 1, dtype=float) ** -gamma
            h = sigma ** (alpha or 1.0) * np.exp(rng.normal(0, 0.05, K))
            if alpha is None:
                h[2:] = -h[2:]  # too few positive curvatures to fit
            h_kron = sigma ** (beta + phi)
            layers.append({"layer": name, "layer_type": t, "block": b, "family": "llama", "alpha": alpha,
                           "alpha_kron": beta + phi, "beta": beta, "phi": phi,
                           "chi_slope": None if alpha is None else alpha - beta - phi, "gamma": gamma,
                           "s": None if alpha is None else alpha * gamma + rng.normal(0, 0.02),
                           "status": "ok" if alpha is not None else "fewer than 3 valid directions"})
            dirs.append({"layer": [name] * K, "k": np.arange(1, K + 1), "sigma": sigma, "h": h, "h_kron": h_kron})
    store.write_part(out, "layers", run_id, "stage0", layers)
    cols = {c: np.concatenate([d[c] for d in dirs]) for c in dirs[0]}
    store.write_part(out, "directions", run_id, "stage0", cols)


def _check_png(paths, out, run_id):
    assert sorted(p.name for p in paths) == sorted(plots.FIGURES)
    for p in paths:
        assert p.parent == out / "plots" / run_id
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    assert not [p for p in (out / "plots" / run_id).iterdir() if p.name.startswith(".")]


def test_make_plots_writes_pngs_for_every_run(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_DPI", 60)  # the same drawing, fewer pixels: faster
    _synthetic_run(tmp_path, "a", null_alpha=("model.layers.1.mlp_up",))
    _synthetic_run(tmp_path, "b", n_blocks=1, K=4)
    paths = plots.make_plots(tmp_path)
    assert len(paths) == 2 * len(plots.FIGURES)
    for run_id in ("a", "b"):
        _check_png([p for p in paths if p.parent.name == run_id], tmp_path, run_id)
    with pytest.raises(ValueError, match="runs with layers: a, b"):
        plots.make_plots(tmp_path, "zzz")


def test_all_alpha_null_still_plots(tmp_path):
    store.write_part(tmp_path, "layers", "r", "p", [{"layer": f"l{i}", "layer_type": "mlp_up", "block": i,
                                                      "status": "fewer than 3 valid directions"} for i in range(2)])
    paths = plots.make_plots(tmp_path, "r")
    for p in paths:
        assert p.read_bytes().startswith(PNG)
