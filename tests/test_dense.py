"""Dense truth (curvdist.math.dense) against closed forms, in float64."""
from __future__ import annotations

import oracle
import pytest
import torch
from torch import nn

from curvdist.math import dense
from curvdist.math import layers as L

DT = torch.float64


def close(a, b, rtol=1e-11):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err <= rtol * float(b.abs().max()), f"max abs err {err:.3e} vs scale {float(b.abs().max()):.3e}"


def test_quadratic_is_rowmajor_vec_rank_one():
    g = torch.Generator().manual_seed(0)
    m, n, K = 3, 4, 5
    M = torch.randn(m * n, m * n, generator=g, dtype=DT)
    U, V = torch.randn(K, m, generator=g, dtype=DT), torch.randn(K, n, generator=g, dtype=DT)
    want = torch.stack([torch.outer(U[k], V[k]).reshape(-1) @ M @ torch.outer(U[k], V[k]).reshape(-1)
                        for k in range(K)])
    close(dense.quadratic(M, U, V), want)
    close(dense.quadratic(M, U, V), torch.stack([torch.kron(U[k], V[k]) @ M @ torch.kron(U[k], V[k]) for k in range(K)]))


def linear_data(loss, sizes=(5, 3), n=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        x = torch.randn(b, n, generator=g, dtype=DT)
        y = torch.randint(0, c, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, c, generator=g,
                                                                                                dtype=DT)
        out.append((x, y))
    return out


def test_linear_mse_closed_form_over_microbatches():
    """z = W x + b, L = (1/(N C)) Σ ‖z − y‖²  ⇒  H = G = I_m ⊗ (2/(N C)) Σ x xᵀ (row-major vec)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    data = linear_data("mse")
    X = torch.cat([x for x, _ in data])
    want = torch.kron(torch.eye(3, dtype=DT), 2.0 / (X.shape[0] * 3) * X.T @ X)
    close(dense.layer_hessian(model, data, oracle.mse, model), want)
    close(dense.layer_ggn(model, data, oracle.mse, model), want)


def test_linear_softmax_closed_form():
    """z = W x with CE: H = G = (1/N) Σ_t (diag p_t − p_t p_tᵀ) ⊗ x_t x_tᵀ; targets −100 are not terms."""
    torch.manual_seed(1)
    model = nn.Linear(4, 3, bias=False).to(DT)
    data = linear_data("cross_entropy", sizes=(6, 4))
    data[0][1][2] = -100
    want = torch.zeros(12, 12, dtype=DT)
    N = 0
    for x, y in data:
        p = torch.softmax(model(x).detach(), -1)
        for t in range(x.shape[0]):
            if y[t] != -100:
                want += torch.kron(torch.diag(p[t]) - torch.outer(p[t], p[t]), torch.outer(x[t], x[t]))
                N += 1
    want /= N
    close(dense.layer_hessian(model, data, oracle.cross_entropy, model), want)
    close(dense.layer_ggn(model, data, oracle.cross_entropy, model), want)


def test_conv2d_closed_form_via_im2col():
    """Conv2d + flatten with MSE: H = I_m ⊗ (2/(B C)) Σ_rows a aᵀ with a the unfolded input rows."""
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).to(DT)
    model = nn.Sequential(conv, nn.Flatten())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 5, 5, generator=g, dtype=DT)
    C = model(x).shape[1]
    y = torch.randn(2, C, generator=g, dtype=DT)
    A = L.input_rows(conv, x)  # (R, n)
    want = torch.kron(torch.eye(3, dtype=DT), 2.0 / (2 * C) * A.T @ A)
    close(dense.layer_hessian(model, [(x, y)], oracle.mse, conv), want)


def test_hessian_symmetric_and_ggn_psd_and_microbatch_weighting():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    data = linear_data("cross_entropy", sizes=(6, 2), seed=5)
    H = dense.layer_hessian(model, data, oracle.cross_entropy, model[0])
    G = dense.layer_ggn(model, data, oracle.cross_entropy, model[0])
    close(H, H.T, 1e-13)
    close(G, G.T, 1e-13)
    assert torch.linalg.eigvalsh(G).min() > -1e-12 * torch.linalg.eigvalsh(G).max()
    assert (H - G).abs().max() > 1e-6  # an inner layer's Hessian is not its GGN
    parts = [dense.layer_hessian(model, [d], oracle.cross_entropy, model[0]) for d in data]
    close(H, (6 * parts[0] + 2 * parts[1]) / 8)


def test_conv1d_layout_matches_linear():
    """GPT-2 Conv1D stores (in, out): its (m, n) Hessian equals that of the equivalent nn.Linear."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(6)
    c1 = Conv1D(5, 4).to(DT)
    lin = nn.Linear(4, 5).to(DT)
    with torch.no_grad():
        lin.weight.copy_(c1.weight.T)
        lin.bias.copy_(c1.bias)
    m_c = nn.Sequential(c1, nn.Tanh(), nn.Linear(5, 3)).to(DT)
    m_l = nn.Sequential(lin, nn.Tanh(), m_c[2])
    data = linear_data("cross_entropy", sizes=(7,), seed=7)
    ce = oracle.cross_entropy
    close(dense.layer_hessian(m_c, data, ce, c1), dense.layer_hessian(m_l, data, ce, lin))
    close(dense.layer_ggn(m_c, data, ce, c1), dense.layer_ggn(m_l, data, ce, lin))


def test_matches_curvlinops_dense_matrices():
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    data = linear_data("cross_entropy", sizes=(6, 3), seed=9)
    w = model[0].weight  # nn.Linear: the (out, in) layout is already row-major W
    for op, ours in ((curvlinops.HessianLinearOperator, dense.layer_hessian),
                     (curvlinops.GGNLinearOperator, dense.layer_ggn)):
        A = op(model, nn.CrossEntropyLoss(), [w], data, check_deterministic=False)
        close(ours(model, data, oracle.cross_entropy, model[0]), A @ torch.eye(w.numel(), dtype=DT))


def test_oracle_is_the_loss_of_torch_and_of_curvdist():
    """The hand-written oracle (tests/oracle.py) equals torch.nn.functional's losses, and curvdist.math.losses equals
    the oracle: sequences with -100 targets, (B, C) logits, MSE over rows; the dense truth with the oracle equals the
    one with curvdist's own loss."""
    import torch.nn.functional as F

    from curvdist.math import losses

    g = torch.Generator().manual_seed(11)
    z = torch.randn(3, 5, 7, generator=g, dtype=DT)
    y = torch.randint(0, 7, (3, 5), generator=g)
    y[0, 1], y[2, 4], y[1, 0] = -100, -100, -100
    mean, n = oracle.cross_entropy(z, y)
    assert n == 12
    close(mean, F.cross_entropy(z.reshape(-1, 7), y.reshape(-1), ignore_index=-100))
    ours, n_ours, _ = losses.loss_terms(z, y, "cross_entropy")
    close(ours, mean)
    assert n_ours == n
    t = torch.randn(3, 5, 7, generator=g, dtype=DT)
    mean, n = oracle.mse(z, t)
    close(mean, F.mse_loss(z, t))
    assert n == 15 and losses.loss_terms(z, t, "mse")[1] == 15
    close(losses.loss_terms(z, t, "mse")[0], mean)
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    data = linear_data("cross_entropy", sizes=(5, 3), seed=13)
    data[1][1][0] = -100
    close(dense.layer_hessian(model, data, oracle.cross_entropy, model[0]),
          dense.layer_hessian(model, data, "cross_entropy", model[0]))
