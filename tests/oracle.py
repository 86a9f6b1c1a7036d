"""An independent loss oracle for the dense truth: cross-entropy and squared error written out by hand.

curvdist.math.dense accepts ``loss`` as a callable ``(logits, targets) -> (mean loss, number of loss terms)``; the tests
that check code built on ``curvdist.math.losses.loss_terms`` pass these, so that the truth and the code under test
do not share their loss.  Written with explicit loops over loss terms (slow, tiny sizes only), and differentiable
twice (torch.func.hessian goes through them).

- cross-entropy: logits (B, C) with targets (B,), or (B, T, V) with targets (B, T); target -100 is not a term;
  ℓ_t = −log softmax(z_t)[y_t] = log Σ_c exp(z_tc − max z_t) + max z_t − z_t[y_t].
- MSE: logits and targets of the same shape (..., C); one term per row of the last axis, ℓ_t = (1/C) Σ_c (z_tc − y_tc)².
L = (1/N) Σ_t ℓ_t over the N terms.
"""
import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor):
    C = logits.shape[-1]
    z = logits.reshape(-1, C)
    y = targets.reshape(-1).tolist()
    terms = []
    for t, label in enumerate(y):
        if label == -100:
            continue
        row = z[t]
        top = row.max().detach()
        terms.append(torch.log(torch.exp(row - top).sum()) + top - row[label])
    if not terms:
        raise ValueError("no loss terms")
    return torch.stack(terms).sum() / len(terms), len(terms)


def mse(logits: torch.Tensor, targets: torch.Tensor):
    C = logits.shape[-1]
    z = logits.reshape(-1, C)
    y = targets.reshape(-1, C).to(z.dtype)
    terms = [((z[t] - y[t]) * (z[t] - y[t])).sum() / C for t in range(z.shape[0])]
    return torch.stack(terms).sum() / len(terms), len(terms)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}
