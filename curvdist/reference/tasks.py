"""Seeded synthetic tasks for the reference models (pure numpy/torch; same seed → same data).

- :class:`MarkovLM`: a "language" of ``vocab`` tokens.  Each token follows a sparse 2nd-order Markov chain: the
  context (x_{t-2}, x_{t-1}) allows ``support`` next tokens, drawn once (seeded) from a Zipf(``zipf``) law over the
  vocabulary and weighted by a Zipf law over their rank, so that token frequencies are heavy-tailed as in text.
  On top, every sequence with probability ``copy_prob`` ends with a *copied span*: after the marker token 0, the
  ``copy_len`` tokens that followed an earlier position are repeated — predictable only by attending back to that
  position (induction), not from the Markov context.  Token 0 never occurs elsewhere.
- :func:`image_task`: 10 classes of 3×``size``×``size`` images.  Class c is an oriented sinusoidal grating with its
  own orientation, spatial frequency and colour mix, with a random phase, a random shift of up to ``size``/4
  pixels, a random contrast and Gaussian noise; the label is the class.
- :func:`vector_task`: ``dim``-dimensional Gaussian inputs labelled by the argmax of a fixed random teacher
  network (two tanh layers), a nonlinear but learnable 10-class problem.

Every generator takes an explicit ``seed``; the task's definition (the chain, the class templates, the teacher)
depends on ``task_seed`` only, so train and evaluation sets with different ``seed`` come from the same task.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MARKER = 0  # the copy marker token of MarkovLM


@dataclass(frozen=True)
class MarkovLM:
    vocab: int = 256
    support: int = 6
    zipf: float = 1.1
    copy_prob: float = 0.5
    copy_len: int = 6
    task_seed: int = 1234

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.task_seed)
        tokens = np.arange(1, self.vocab)                       # 0 is the marker
        p_tok = 1.0 / np.arange(1, tokens.size + 1) ** self.zipf
        p_tok = p_tok / p_tok.sum()
        perm = rng.permutation(tokens)                          # which token gets which frequency rank
        nxt = rng.choice(perm, size=(self.vocab * self.vocab, self.support), p=p_tok)
        w = 1.0 / np.arange(1, self.support + 1) ** 1.5
        cdf = np.cumsum(w / w.sum())
        return nxt, cdf

    def sample(self, n: int, seq_len: int, seed: int) -> np.ndarray:
        """(n, seq_len) int64 token ids."""
        if seq_len < 2 * self.copy_len + 4:
            raise ValueError(f"seq_len={seq_len} is too short for copy_len={self.copy_len}")
        nxt, cdf = self._tables()
        rng = np.random.default_rng(seed)
        x = np.empty((n, seq_len), dtype=np.int64)
        x[:, :2] = rng.integers(1, self.vocab, size=(n, 2))
        for t in range(2, seq_len):
            ctx = x[:, t - 2] * self.vocab + x[:, t - 1]
            j = np.searchsorted(cdf, rng.random(n), side="right").clip(max=self.support - 1)
            x[:, t] = nxt[ctx, j]
        copy = rng.random(n) < self.copy_prob
        L = self.copy_len
        start = seq_len - L - 1                                 # marker at start, copy fills the last L tokens
        src = rng.integers(1, start - L, size=n)                # copied span x[src : src+L]
        rows = np.nonzero(copy)[0]
        x[rows, start] = MARKER
        for i in range(L):
            x[rows, start + 1 + i] = x[rows, src[rows] + i]
        return x


def image_task(n: int, seed: int, size: int = 32, classes: int = 10, noise: float = 0.5,
               task_seed: int = 4321) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, size, size) float32, labels (n,) long)."""
    trng = np.random.default_rng(task_seed)
    theta = np.pi * (np.arange(classes) + trng.uniform(-0.2, 0.2, classes)) / classes
    freq = trng.uniform(1.5, 4.0, classes) * 2 * np.pi / size
    colour = trng.normal(size=(classes, 3))
    colour /= np.linalg.norm(colour, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    shift = rng.integers(-size // 4, size // 4 + 1, size=(n, 2))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    contrast = rng.uniform(0.7, 1.3, size=n)
    px = (xx[None] + shift[:, :1, None]) * np.cos(theta[y])[:, None, None]
    py = (yy[None] + shift[:, 1:, None]) * np.sin(theta[y])[:, None, None]
    g = np.sin(freq[y][:, None, None] * (px + py) + phase[:, None, None]) * contrast[:, None, None]
    img = g[:, None] * colour[y][:, :, None, None] + noise * rng.normal(size=(n, 3, size, size))
    return torch.from_numpy(img.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def vector_task(n: int, seed: int, dim: int = 64, classes: int = 10, hidden: int = 64,
                task_seed: int = 999) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (n, dim) float32, labels (n,) long) from a fixed random tanh teacher."""
    trng = np.random.default_rng(task_seed)
    w1 = trng.normal(size=(dim, hidden)) / np.sqrt(dim)
    w2 = trng.normal(size=(hidden, hidden)) / np.sqrt(hidden)
    w3 = trng.normal(size=(hidden, classes)) / np.sqrt(hidden)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    logits = np.tanh(np.tanh(x @ w1 * 2.0) @ w2 * 2.0) @ w3
    y = logits.argmax(axis=1)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
