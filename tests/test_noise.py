"""Signal or noise (curvdist.math.noise): the estimators, the split halves, and models whose answer is known.

- the noise estimators are unbiased over seeds on Gaussian toys with known ‖E G‖² and tr Σ;
- a linear softmax layer whose labels are sampled from itself (pure noise) → grad_snr ≈ 1, no stable direction,
  α ≈ α of its null run (gradient_labels="sampled"); the same layer with a teacher at large N → grad_snr ≫ 1,
  stable leading directions, α well below the null's;
- halves holding identical samples → stability 1 and alpha_half_a = alpha_half_b = α.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import curvdist
from curvdist.math import losses, noise
from curvdist.math.collect import collect_statistics

DT = torch.float64


# ------------------------------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("T, m, n", [(5, 3, 4), (2, 6, 7), (9, 2, 3)])   # Gram form, explicit form, both
def test_unit_sq_norms_equal_the_per_unit_gradients(T, m, n):
    g = torch.Generator().manual_seed(T)
    units = torch.tensor([0] * T + [1] * (T - 1) + [3] * 2)      # unit 2 has no row, units of unequal size
    d = torch.randn(len(units), m, generator=g, dtype=DT)
    a = torch.randn(len(units), n, generator=g, dtype=DT)
    want = torch.stack([(d[units == u].T @ a[units == u]).square().sum() for u in range(4)])
    torch.testing.assert_close(noise.unit_sq_norms(d, a, units), want)
    torch.testing.assert_close(noise.unit_sq_norms(d, a, units, 4, max_elements=1), want)   # one unit per chunk
    perm = torch.randperm(len(units), generator=g)                                           # rows interleaved
    torch.testing.assert_close(noise.unit_sq_norms(d[perm], a[perm], units[perm], 5), torch.cat([want, want[:1] * 0]))
    equal = torch.arange(3).repeat_interleave(T)                                             # equal blocks: views
    d, a = torch.randn(3 * T, m, generator=g, dtype=DT), torch.randn(3 * T, n, generator=g, dtype=DT)
    torch.testing.assert_close(noise.unit_sq_norms(d, a, equal),
                               torch.stack([(d[equal == u].T @ a[equal == u]).square().sum() for u in range(3)]))


def test_estimators_unbiased_on_gaussian_unit_gradients():
    """x_u ~ N(μ, Σ) iid: E grad_mean_sq = ‖μ‖², E grad_trace_cov = tr Σ (to 4 standard errors over 400 seeds);
    grad_snr and noise_scale land on 1 + U‖μ‖²/tr Σ and tr Σ/‖μ‖² up to their O(1/U) ratio bias."""
    D, U, N = 40, 32, 96                                   # 32 units of 3 loss terms each
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=g, dtype=DT) * 0.5
    scale = torch.linspace(0.5, 2.0, D, dtype=DT)           # Σ = diag(scale²)
    true_mean_sq, true_tr = float(mu @ mu), float((scale ** 2).sum())
    est = []
    for seed in range(400):
        x = mu + scale * torch.randn(U, D, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
        G = x.mean(0)
        unit_sq = float(((N / U) * x).square().sum())      # Σ_u ‖g_u‖² with g_u = (N/U) x_u
        est.append(noise.gradient_noise(float(G @ G), unit_sq, U, N))
    for key, truth in (("grad_mean_sq", true_mean_sq), ("grad_trace_cov", true_tr)):
        v = np.array([getattr(e, key) for e in est])
        assert abs(v.mean() - truth) < 4 * v.std() / math.sqrt(len(v)), (key, v.mean(), truth)
    snr = np.array([e.grad_snr for e in est])
    assert snr.mean() == pytest.approx(1 + U * true_mean_sq / true_tr, rel=0.05)
    assert np.median([e.noise_scale for e in est]) == pytest.approx(true_tr / true_mean_sq, rel=0.1)
    pure = [noise.gradient_noise(float(x.mean(0) @ x.mean(0)), float((3 * x).square().sum()), U, N)
            for x in (scale * torch.randn(U, D, generator=torch.Generator().manual_seed(s), dtype=DT)
                      for s in range(400, 600))]
    assert np.mean([e.grad_snr for e in pure]) == pytest.approx(1.0, abs=0.05)   # μ = 0: grad_snr ≈ 1
    assert noise.gradient_noise(1.0, 1.0, 1, 3) == noise.GradientNoise(1)        # one unit: nothing to say


def gaussian_sequences(seed, U=32, T=4, n=3, C=5, s=4.0):
    """A linear layer with MSE on sequences: fixed inputs a_t (T, n), targets y_ut = y0_t + s ε_ut, ε ~ N(0, I_C).
    Per sequence g_u = (2/C) Σ_t (W a_t − y_ut) a_tᵀ; with x_u = (U/N) g_u = g_u / T (N = U T terms):
    μ = (2/(C T)) Σ_t (W a_t − y0_t) a_tᵀ, tr Σ = (2s/(C T))² C Σ_t ‖a_t‖²."""
    g0 = torch.Generator().manual_seed(99)
    A0 = torch.randn(T, n, generator=g0, dtype=DT)
    y0 = torch.randn(T, C, generator=g0, dtype=DT)
    layer = nn.Linear(n, C, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(C, n, generator=g0, dtype=DT) * 0.3)
    W = layer.weight.detach()
    mu = (2 / (C * T)) * (A0 @ W.T - y0).T @ A0
    tr = (2 * s / (C * T)) ** 2 * C * float(A0.square().sum())
    g = torch.Generator().manual_seed(seed)
    Y = y0 + s * torch.randn(U, T, C, generator=g, dtype=DT)
    X = A0.expand(U, T, n)
    data = [(X[i:i + 8], Y[i:i + 8]) for i in range(0, U, 8)]
    return layer, data, float(mu.square().sum()), tr


def test_collector_noise_unbiased_on_gaussian_sequences():
    """The same through the collector, with sequences as units (4 rows each, so the Gram form): grad_mean_sq and
    grad_trace_cov unbiased over seeds, grad_snr and noise_scale on target."""
    est = []
    for seed in range(150):
        layer, data, mean_sq, tr = gaussian_sequences(seed)
        st = collect_statistics(layer, data, "mse", layers={"w": layer}, stat_dtype=DT)["w"]
        assert st.noise.n_units == 32 and st.n_terms == 128
        est.append(st.noise)
    for key, truth in (("grad_mean_sq", mean_sq), ("grad_trace_cov", tr)):
        v = np.array([getattr(e, key) for e in est])
        assert abs(v.mean() - truth) < 4 * v.std() / math.sqrt(len(v)), (key, v.mean(), truth)
    assert np.mean([e.grad_snr for e in est]) == pytest.approx(1 + 32 * mean_sq / tr, rel=0.05)
    assert np.median([e.noise_scale for e in est]) == pytest.approx(tr / mean_sq, rel=0.1)


# ------------------------------------------------------------------------------------------------- halves
def test_half_of_is_a_function_of_the_key():
    assert [noise.half_of(k) for k in range(5)] == [0, 1, 0, 1, 0]
    assert noise.half_of(np.int64(7)) == noise.half_of(torch.tensor(7)) == 1
    assert noise.half_of("mb-3") == noise.half_of("mb-3") in (0, 1)


def test_stability_definition():
    """Identical halves → 1; a nearly tied pair swapped or rotated between the halves keeps ≈ 1; independent noise
    → ≈ 0; stable_directions counts the leading run with stability ≥ 0.5."""
    g = torch.Generator().manual_seed(3)
    m, n, K = 30, 40, 6
    Uq, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT))
    Vq, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    s = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.5, 1.0], dtype=DT)
    G = Uq[:, :K] @ torch.diag(s) @ Vq[:, :K].T
    assert torch.allclose(noise.split_half_stability(G, G, K), torch.ones(K, dtype=DT), atol=1e-9)
    assert torch.allclose(noise.split_half_stability(G, 3 * G, K), torch.ones(K, dtype=DT), atol=1e-9)
    tied = torch.tensor([10.0, 5.0, 4.95, 2.0, 1.5, 1.0], dtype=DT)   # pair 2, 3 nearly tied ...
    c, r = math.cos(0.6), math.sin(0.6)                                  # ... and rotated in half b
    R = torch.eye(K, dtype=DT)
    R[1:3, 1:3] = torch.tensor([[c, -r], [r, c]], dtype=DT)
    Ga = Uq[:, :K] @ torch.diag(tied) @ Vq[:, :K].T
    Gb = (Uq[:, :K] @ R) @ torch.diag(tied) @ (Vq[:, :K] @ R).T
    st = noise.split_half_stability(Ga, Gb, K)
    assert st.min() > 0.95
    A, B = (torch.randn(m, n, generator=g, dtype=DT) for _ in range(2))
    st = noise.split_half_stability(A, B, K)
    assert st.max() < 0.3
    assert noise.stable_directions(torch.tensor([0.9, 0.6, 0.4, 0.9])) == 2
    assert noise.stable_directions(torch.tensor([float("nan"), 1.0])) is None and noise.stable_directions(None) is None


# ------------------------------------------------------------------------------------------------- known models
def softmax_toy(N, labels, seed=0, n=256, C=64, micro_batch=512):
    """A linear softmax layer W (C × n) on inputs with a power-law covariance (λ_j ∝ 1/j); labels drawn from a
    teacher W* (signal: E G ≠ 0) or from the model itself (pure noise: E G = 0)."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.arange(1, n + 1, dtype=DT) ** -1.0
    P, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(100), dtype=DT))
    X = torch.randn(N, n, generator=g, dtype=DT) * lam.sqrt() @ P.T
    gw = torch.Generator().manual_seed(101)
    teacher = 3 * torch.randn(C, n, generator=gw, dtype=DT)
    layer = nn.Linear(n, C, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(0.3 * torch.randn(C, n, generator=gw, dtype=DT))
    W = teacher if labels == "teacher" else layer.weight.detach()
    y = torch.multinomial(torch.softmax(X @ W.T, -1), 1, generator=g).squeeze(1)
    return nn.Sequential(layer), [(X[i:i + micro_batch], y[i:i + micro_batch]) for i in range(0, N, micro_batch)]


def test_labels_sampled_from_the_model_are_noise():
    """Pure noise: grad_snr ≈ 1, no stable direction, and α equals that of the null run (labels resampled from the
    model) within the scatter of α between label draws."""
    deltas = []
    for seed in range(3):
        model, data = softmax_toy(4096, "self", seed=seed)
        row = curvdist.analyze(model, data, top_k=20, seed=seed).layer("0")
        null = curvdist.analyze(model, data, top_k=20, seed=seed, gradient_labels="sampled").layer("0")
        for r in (row, null):
            assert 0.85 < r["grad_snr"] < 1.15, r["grad_snr"]
            assert r["stable_directions"] == 0 and r["n_units"] == 4096
        deltas.append(row["alpha"] - null["alpha"])
        assert row["alpha"] > 2.0 and null["alpha"] > 2.0
    assert abs(np.mean(deltas)) < 0.2 and max(abs(d) for d in deltas) < 0.35, deltas


def test_teacher_at_large_n_is_signal():
    """A teacher task at N = 16384: grad_snr ≫ 1, the leading directions reproduced by both halves, α of each half
    close to α, and α well below the null run's."""
    model, data = softmax_toy(16384, "teacher")
    res = curvdist.analyze(model, data, top_k=20)
    row = res.layer("0")
    null = curvdist.analyze(model, data, top_k=20, gradient_labels="sampled").layer("0")
    stability = res.directions.column("stability").to_pylist()
    assert row["grad_snr"] > 30 and row["noise_scale"] == pytest.approx(row["n_units"] / (row["grad_snr"] - 1))
    assert row["stable_directions"] >= 8 and min(stability[:5]) > 0.9
    assert abs(row["alpha_half_a"] - row["alpha"]) < 0.1 and abs(row["alpha_half_b"] - row["alpha"]) < 0.1
    assert row["alpha_se"] < 0.1
    assert null["grad_snr"] < 1.15 and null["stable_directions"] == 0
    assert row["alpha"] < null["alpha"] - 0.8
    small = curvdist.analyze(*softmax_toy(512, "teacher", micro_batch=64), top_k=20).layer("0")
    assert small["grad_snr"] < row["grad_snr"] / 10 and small["stable_directions"] < row["stable_directions"]


def test_identical_halves_give_alpha_half_equal_alpha():
    """Micro-batches 0, 1 hold the same samples, and so do 2, 3: half a (keys 0, 2) and half b (1, 3) are identical,
    so σ of each half along the full directions is σ, its exact h is h, and alpha_half_a = alpha_half_b = α;
    the halves agree on every direction (stability 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4)).double()
    g = torch.Generator().manual_seed(1)
    d0 = (torch.randn(10, 6, generator=g, dtype=DT), torch.randint(0, 4, (10,), generator=g))
    d1 = (torch.randn(7, 6, generator=g, dtype=DT), torch.randint(0, 4, (7,), generator=g))
    res = curvdist.analyze(model, [d0, d0, d1, d1], top_k=4, dtype=DT)
    for row in res.layers.to_pylist():
        assert row["alpha"] is not None
        assert row["alpha_half_a"] == pytest.approx(row["alpha"], abs=1e-8)
        assert row["alpha_half_b"] == pytest.approx(row["alpha"], abs=1e-8)
        stab = [d["stability"] for d in res.directions.to_pylist() if d["layer"] == row["layer"]]
        assert all(abs(s - 1) < 1e-8 for s in stab if s is not None)
        assert row["stable_directions"] == len([s for s in stab if s is not None]) >= 3   # the CE head: rank 3
    one = curvdist.analyze(model, [d0], top_k=4, dtype=DT).layer("2")   # one micro-batch: half b is empty
    assert one["alpha_half_a"] is None and one["stable_directions"] is None and one["alpha"] is not None


# ------------------------------------------------------------------------------------------------- sampled labels
def test_sampled_targets():
    """CE: labels drawn from softmax(z) (frequencies over many draws), -100 kept; MSE: y ~ N(z, C/2 I); the draw is
    a function of (seed, micro-batch key) only."""
    z = torch.tensor([[2.0, 0.0, -1.0]], dtype=DT).expand(20000, 3).clone()
    y = torch.zeros(20000, dtype=torch.long)
    y[:5] = -100
    ys = losses.sampled_targets(z, y, "cross_entropy", losses.label_generator(0, 3))
    assert (ys[:5] == -100).all() and ys.dtype == torch.long
    freq = torch.bincount(ys[5:], minlength=3).double() / (20000 - 5)
    torch.testing.assert_close(freq, torch.softmax(z[0], -1), atol=0.01, rtol=0)
    again = losses.sampled_targets(z, y, "cross_entropy", losses.label_generator(0, 3))
    other = losses.sampled_targets(z, y, "cross_entropy", losses.label_generator(0, 4))
    assert torch.equal(ys, again) and not torch.equal(ys, other)
    zm = torch.zeros(20000, 4, dtype=DT)
    ym = losses.sampled_targets(zm, zm, "mse", losses.label_generator(1, 0))
    assert abs(float(ym.mean())) < 0.03 and float(ym.var()) == pytest.approx(2.0, rel=0.03)
