"""The reference tasks and models of `make reproduce` (curvdist.reference): seeded, learnable, savable, classified."""
import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel

from curvdist.math import families
from curvdist.reference import models, tasks, train


def test_tasks_are_seeded():
    lm = tasks.MarkovLM()
    assert np.array_equal(lm.sample(8, 32, seed=3), lm.sample(8, 32, seed=3))
    assert not np.array_equal(lm.sample(8, 32, seed=3), lm.sample(8, 32, seed=4))
    for make in (tasks.image_task, tasks.vector_task):
        (x1, y1), (x2, y2), (x3, _) = make(16, seed=1), make(16, seed=1), make(16, seed=2)
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)


def test_markov_language_has_copied_spans():
    task = tasks.MarkovLM(copy_prob=1.0, copy_len=5)
    x = task.sample(64, 24, seed=0)
    start = 24 - 5 - 1
    assert (x[:, start] == tasks.MARKER).all() and (x[:, :start] != tasks.MARKER).all()
    for row in x:  # the span after the marker occurs earlier in the same sequence
        span = row[start + 1:]
        assert any(np.array_equal(row[i:i + 5], span) for i in range(start - 5 + 1))
    # the 2nd-order chain is sparse: a context has at most `support` successors
    y = tasks.MarkovLM(copy_prob=0.0).sample(512, 24, seed=1)
    succ = {}
    for row in y:
        for t in range(2, 24):
            succ.setdefault((row[t - 2], row[t - 1]), set()).add(row[t])
    assert max(len(s) for s in succ.values()) <= 6


def _few_steps(model, loss_fn, steps=15, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tasks_are_learnable_at_tiny_sizes():
    size = models.SIZES["tiny"]
    ids = torch.from_numpy(tasks.MarkovLM(copy_len=4).sample(32, 16, seed=0))
    lm = models.gpt2_lm(256, **size["lm"])

    def lm_loss():
        z = lm(input_ids=ids).logits
        return nn.functional.cross_entropy(z.reshape(-1, 256), train.lm_targets(ids).reshape(-1), ignore_index=-100)

    losses = _few_steps(lm, lm_loss)
    assert losses[-1] < losses[0] - 0.3
    for kind in ("cnn", "mlp"):
        x, y = train.make_classification(kind, size[kind], 64, seed=0)
        model = models.resnet(**size[kind]) if kind == "cnn" else models.mlp(size[kind]["dim"], size[kind]["hidden"])
        call = train.classifier_call(kind)
        losses = _few_steps(model, lambda m=model, c=call, x=x, y=y: nn.functional.cross_entropy(c(m, x), y))
        assert losses[-1] < 0.95 * losses[0], kind


def test_reference_models_save_and_classify(tmp_path):
    size = models.SIZES["tiny"]
    m = models.mlp(size["mlp"]["dim"], size["mlp"]["hidden"], seed=1)
    metrics = {"train_loss": 1.0}
    train.save(m, tmp_path / "mlp", metrics)
    assert (tmp_path / "mlp" / "model.safetensors").exists() and train.load_metrics(tmp_path / "mlp") == metrics
    back = train.load("mlp", tmp_path / "mlp")
    x = torch.randn(3, size["mlp"]["dim"])
    assert torch.allclose(back(x), m(x))
    assert families.detect_family(m) == "mlp"
    assert [families.classify(n, "mlp", m)[0] for n in families.select_layers(m)] == ["other", "other", "head"]
    cnn = models.resnet(**size["cnn"])
    assert families.detect_family(cnn) == "cnn"
    kinds = [families.classify(n, "cnn", cnn)[0] for n in families.select_layers(cnn)]
    assert kinds[-1] == "head" and set(kinds[:-1]) == {"conv"}


def test_contrastive_bert_wrapper_is_classified_by_its_encoder():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = models.ContrastiveEncoder(BertModel(cfg, add_pooling_layer=False))
    family = families.detect_family(model)
    assert family == "bert"
    got = {n: families.classify(n, family, model) for n in families.select_layers(model, ["encoder.encoder.layer.*"])}
    want = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
            "attention.output.dense": "attn_out", "intermediate.dense": "mlp_up", "output.dense": "mlp_down"}
    for b in (0, 1):
        for suffix, t in want.items():
            assert got[f"encoder.encoder.layer.{b}.{suffix}"] == (t, b)
    a, p = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
    logits = model(anchor_ids=a, positive_ids=p)
    assert logits.shape == (4, 4) and logits.abs().max() <= 20 + 1e-4
