"""Seeded training of the reference models; checkpoints are Hugging Face directories (config.json + safetensors).

``train_lm`` / ``train_cnn`` / ``train_mlp`` each train with AdamW (linear warm-up, cosine decay) for ``epochs``
passes over a fixed training set, evaluate on a held-out set of the same task and save the model with
``save_pretrained(..., safe_serialization=True)`` atomically (a temporary directory, then a rename).  They return a
dict of metrics (final train loss = mean over the last epoch, eval loss, eval accuracy, parameter count, time).
A checkpoint directory that already exists is not retrained: its ``metrics.json`` is returned.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import models, tasks

METRICS = "metrics.json"


def _schedule(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def save(model: nn.Module, dst: Path, metrics: dict) -> Path:
    """``save_pretrained`` into a temporary sibling, write metrics.json, rename onto ``dst``."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def load_metrics(path: Path) -> dict | None:
    p = Path(path) / METRICS
    return json.loads(p.read_text()) if p.exists() else None


def _fit(model: nn.Module, step_loss: Callable[[torch.Tensor], torch.Tensor], n: int, *, epochs: int,
         batch: int, lr: float, seed: int, on_epoch: Callable[[int, float], None] | None = None,
         weight_decay: float = 0.01, on_step: Callable[[int, float], None] | None = None) -> float:
    """Minimise ``step_loss(idx)`` over shuffled mini-batches of indices; returns the mean loss of the last epoch.
    ``on_step(step, loss)`` is called after every optimiser step (global step count from 1); it must not draw from
    torch's random generators (the run stays the same with or without it)."""
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, n // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = _schedule(opt, epochs * steps_per_epoch, warmup=max(1, steps_per_epoch // 5))
    model.train()
    last = float("nan")
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for s in range(steps_per_epoch):
            loss = step_loss(perm[s * batch:(s + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item()
            if on_step is not None:
                on_step(ep * steps_per_epoch + s + 1, loss.item())
        last = total / steps_per_epoch
        if on_epoch is not None:
            on_epoch(ep + 1, last)
    model.eval()
    return last


@torch.no_grad()
def _eval_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, call, chunk: int = 512) -> tuple[float, float]:
    model.eval()
    loss = correct = 0.0
    for s in range(0, len(y), chunk):
        z = call(model, x[s:s + chunk])
        loss += nn.functional.cross_entropy(z, y[s:s + chunk], reduction="sum").item()
        correct += (z.argmax(-1) == y[s:s + chunk]).sum().item()
    return loss / len(y), correct / len(y)


def lm_targets(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of (B, T) ids, -100 at the last position."""
    t = torch.full_like(ids, -100)
    t[:, :-1] = ids[:, 1:]
    return t


@torch.no_grad()
def eval_lm(model: nn.Module, ids: torch.Tensor, chunk: int = 256) -> dict:
    """Mean next-token loss and accuracy, and the accuracy on the copied spans (induction) only."""
    model.eval()
    loss = n = correct = copy_ok = copy_n = 0.0
    for s in range(0, len(ids), chunk):
        x = ids[s:s + chunk]
        t = lm_targets(x)
        z = model(input_ids=x).logits
        mask = t != -100
        loss += nn.functional.cross_entropy(z[mask], t[mask], reduction="sum").item()
        hit = (z.argmax(-1) == t) & mask
        n += mask.sum().item()
        correct += hit.sum().item()
        # induction targets: positions inside a copied span (after the marker), predicting the span's next token
        marker = (x == tasks.MARKER)
        after = torch.cumsum(marker.long(), dim=1) > 0
        span = after & ~marker & mask
        copy_ok += (hit & span).sum().item()
        copy_n += span.sum().item()
    return {"eval_loss": loss / n, "eval_accuracy": correct / n,
            "eval_copy_accuracy": copy_ok / copy_n if copy_n else float("nan")}


def train_lm(dst: Path, *, size: dict, task: tasks.MarkovLM, n_train: int, n_eval: int = 2048, epochs: int = 5,
             batch: int = 64, lr: float = 3e-3, seed: int = 0, epoch1_dst: Path | None = None,
             early: dict[int, Path] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the GPT-2 LM on ``n_train`` sequences of ``task``; also save the epoch-1 model to ``epoch1_dst`` and
    the model after each optimiser step ``k`` of ``early`` ({step: directory}) to that directory (the same run:
    saving does not change the training).  Their metrics carry ``steps`` (optimiser steps taken)."""
    early = dict(early or {})
    wanted = [dst, *([epoch1_dst] if epoch1_dst is not None else []), *early.values()]
    if all(load_metrics(p) is not None for p in wanted):
        return load_metrics(dst)
    t0 = time.perf_counter()
    T = size["seq_len"]
    torch.manual_seed(seed)
    train = torch.from_numpy(task.sample(n_train, T, seed=seed + 1))
    held = torch.from_numpy(task.sample(n_eval, T, seed=seed + 2))
    model = models.gpt2_lm(task.vocab, size["n_embd"], size["n_layer"], size["n_head"], T, seed=seed)

    def step(idx):
        x = train[idx]
        z = model(input_ids=x).logits
        return nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), lm_targets(x).reshape(-1), ignore_index=-100)

    steps_per_epoch = max(1, n_train // batch)

    def on_epoch(ep, tl):
        log(f"lm epoch {ep}/{epochs}: train loss {tl:.4f} ({time.perf_counter() - t0:.0f} s)")
        if ep == 1 and epoch1_dst is not None:
            m = {"model": "gpt2-lm", "epochs": 1, "steps": steps_per_epoch, "train_loss": tl, **eval_lm(model, held),
                 "n_params": sum(p.numel() for p in model.parameters()), "n_train": n_train,
                 "train_s": time.perf_counter() - t0}
            save(model, epoch1_dst, m)
            model.train()

    def on_step(k, loss):
        if k in early:
            m = {"model": "gpt2-lm", "epochs": k / steps_per_epoch, "steps": k, "train_loss": loss,
                 **eval_lm(model, held), "n_params": sum(p.numel() for p in model.parameters()),
                 "n_train": n_train, "train_s": time.perf_counter() - t0}
            save(model, early[k], m)
            log(f"lm step {k}: saved {early[k].name} (eval loss {m['eval_loss']:.4f})")
            model.train()

    tl = _fit(model, step, n_train, epochs=epochs, batch=batch, lr=lr, seed=seed, on_epoch=on_epoch,
              on_step=on_step if early else None)
    m = {"model": "gpt2-lm", "epochs": epochs, "steps": epochs * steps_per_epoch, "train_loss": tl,
         **eval_lm(model, held),
         "n_params": sum(p.numel() for p in model.parameters()), "n_train": n_train,
         "train_s": time.perf_counter() - t0}
    save(model, dst, m)
    return m


def train_classifier(kind: str, dst: Path, *, size: dict, n_train: int, n_eval: int = 2048, epochs: int = 5,
                     batch: int = 128, lr: float = 2e-3, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train the ResNet (``kind="cnn"``) or the MLP (``kind="mlp"``) on its generated task."""
    if load_metrics(dst) is not None:
        return load_metrics(dst)
    t0 = time.perf_counter()
    x, y = make_classification(kind, size, n_train, seed=seed + 1)
    xe, ye = make_classification(kind, size, n_eval, seed=seed + 2)
    model = models.resnet(**size, seed=seed) if kind == "cnn" else models.mlp(size["dim"], size["hidden"], seed=seed)
    call = classifier_call(kind)

    def step(idx):
        return nn.functional.cross_entropy(call(model, x[idx]), y[idx])

    tl = _fit(model, step, n_train, epochs=epochs, batch=batch, lr=lr, seed=seed,
              on_epoch=lambda ep, tl: log(f"{kind} epoch {ep}/{epochs}: train loss {tl:.4f} "
                                          f"({time.perf_counter() - t0:.0f} s)"))
    _, tr_acc = _eval_classifier(model, x[:n_eval], y[:n_eval], call)
    el, ea = _eval_classifier(model, xe, ye, call)
    m = {"model": kind, "epochs": epochs, "train_loss": tl, "train_accuracy": tr_acc, "eval_loss": el,
         "eval_accuracy": ea, "n_params": sum(p.numel() for p in model.parameters()), "n_train": n_train,
         "train_s": time.perf_counter() - t0}
    save(model, dst, m)
    return m


def make_classification(kind: str, size: dict, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "cnn":
        return tasks.image_task(n, seed=seed, size=size["image"])
    return tasks.vector_task(n, seed=seed, dim=size["dim"])


def classifier_call(kind: str):
    if kind == "cnn":
        return lambda model, x: model(pixel_values=x).logits
    return lambda model, x: model(x)


def load(kind: str, path: Path) -> nn.Module:
    """A trained reference model from its directory, in eval mode."""
    cls = {"lm": models.GPT2LMHeadModel, "cnn": models.ResNetForImageClassification,
           "mlp": models.MLPForClassification}[kind]
    return cls.from_pretrained(str(path)).eval()
