"""curvdist.io.data: every source, packing, targets, determinism, error messages (tiny in-test tokenizer, no hub)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from curvdist.config import DataConfig
from curvdist.io.data import IGNORE_INDEX, causal_lm_batch, make_batches

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "sleeps", "in", "warm",
         "sun"]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built in memory (no hub): ids 0..2 special, words from 3 on."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    words = set(WORDS)
    for t in topics.values():
        words.update(t.split())
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _text(n_words=400, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(n_words // 10))


def _check(batches, cfg):
    assert sum(b[1].shape[0] for b in batches) == cfg.sequences
    assert all(b[1].shape[0] <= cfg.micro_batch for b in batches)
    for inputs, targets in batches:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert ids.dtype == targets.dtype == torch.long and ids.shape == mask.shape == targets.shape
        assert ids.shape[1] == cfg.seq_len
        assert (targets[:, -1] == IGNORE_INDEX).all()
        real = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
        assert torch.equal(targets[:, :-1][real], ids[:, 1:][real])
        assert (targets[:, :-1][~real] == IGNORE_INDEX).all()


def _cat(batches):
    return torch.cat([b[0]["input_ids"] for b in batches])


def test_pydoc(tokenizer):
    cfg = DataConfig(source="pydoc", sequences=6, seq_len=32, micro_batch=4)
    batches = make_batches(cfg, tokenizer)
    assert [b[1].shape[0] for b in batches] == [4, 2]
    _check(batches, cfg)
    assert (_cat(batches) != tokenizer.unk_token_id).float().mean() > 0.9  # real words from the topics
    assert torch.equal(_cat(batches), _cat(make_batches(cfg, tokenizer)))
    other = _cat(make_batches(DataConfig(source="pydoc", sequences=6, seq_len=32, micro_batch=4, seed=1), tokenizer))
    assert not torch.equal(_cat(batches), other)


def test_text_file(tmp_path, tokenizer):
    p = tmp_path / "a.txt"
    p.write_text(_text(400))
    cfg = DataConfig(source="text", path=str(p), sequences=5, seq_len=16, micro_batch=2)
    batches = make_batches(cfg, tokenizer, vocab_size=len(tokenizer))
    _check(batches, cfg)
    assert torch.equal(_cat(batches), _cat(make_batches(cfg, tokenizer)))
    # windows are non-overlapping slices of the stream, in stream order
    stream = torch.tensor(tokenizer(p.read_text(), add_special_tokens=False)["input_ids"])
    windows = stream[: (stream.numel() // 16) * 16].view(-1, 16)
    idx = [int((windows == row).all(1).nonzero()[0]) for row in _cat(batches)]
    assert idx == sorted(idx) and len(set(idx)) == 5


def test_jsonl_and_parquet(tmp_path, tokenizer):
    docs = [_text(60, seed=i) for i in range(6)]
    pj = tmp_path / "d.jsonl"
    pj.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    pp = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": docs, "id": list(range(6))}), pp)
    out = []
    for source, path in (("jsonl", pj), ("parquet", pp)):
        cfg = DataConfig(source=source, path=str(path), text_column="body", sequences=4, seq_len=20, micro_batch=3)
        batches = make_batches(cfg, tokenizer)
        _check(batches, cfg)
        out.append(_cat(batches))
    assert torch.equal(out[0], out[1])  # same documents, same stream
    assert (torch.cat([make_batches(DataConfig(source="jsonl", path=str(pj), text_column="body", sequences=18,
                                               seq_len=20), tokenizer)[i][0]["input_ids"] for i in range(5)])
            == tokenizer.eos_token_id).sum() == 5  # EOS between the 6 documents


def test_npy_stream_and_sequences(tmp_path):
    p1 = tmp_path / "s.npy"
    np.save(p1, np.arange(1000, dtype=np.int32) % 50)
    cfg = DataConfig(source="npy", path=str(p1), sequences=4, seq_len=10, micro_batch=4)
    (inputs, targets), = make_batches(cfg, vocab_size=50)
    _check([(inputs, targets)], cfg)
    assert ((inputs["input_ids"][:, 1:] - inputs["input_ids"][:, :-1]) % 50 == 1).all()

    seqs = np.tile(np.arange(12), (7, 1)) + 100 * np.arange(7)[:, None]
    seqs[2, 9:] = -1  # padding
    p2 = tmp_path / "m.npy"
    np.save(p2, seqs)
    cfg = DataConfig(source="npy", path=str(p2), sequences=7, seq_len=10, micro_batch=3)
    batches = make_batches(cfg)
    _check(batches, cfg)
    ids = _cat(batches)
    assert torch.equal(ids[:, 0], torch.arange(7) * 100)  # all rows, in order, first seq_len columns
    mask = torch.cat([b[0]["attention_mask"] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert mask[2].tolist() == [1] * 9 + [0] and ids[2, 9] == 0
    assert targets[2, 8] == IGNORE_INDEX and targets[2, 7] == ids[2, 8]


def test_synthetic_deterministic():
    cfg = DataConfig(source="synthetic", sequences=3, seq_len=8, micro_batch=2, seed=3)
    a, b = make_batches(cfg, vocab_size=11), make_batches(cfg, vocab_size=11)
    _check(a, cfg)
    assert torch.equal(_cat(a), _cat(b)) and _cat(a).max() < 11
    with pytest.raises(ValueError, match="vocab_size"):
        make_batches(cfg)


def test_causal_lm_batch_padding():
    inputs, targets = causal_lm_batch(torch.tensor([[5, 6, 7, -1], [1, 2, 3, 4]]), pad_id=9)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 9], [1, 2, 3, 4]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert targets.tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]


def test_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="data.path="):
        make_batches(DataConfig(source="text", path=str(tmp_path / "nope.txt")), tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_batches(DataConfig(source="pydoc"))
    p = tmp_path / "small.txt"
    p.write_text(_text(50))
    with pytest.raises(ValueError, match=r"not enough tokens: .* has 50 tokens = 3 windows of data.seq_len=16, "
                                         r"but data.sequences=4 needs 64; lower data.sequences"):
        make_batches(DataConfig(source="text", path=str(p), sequences=4, seq_len=16), tokenizer)
    pj = tmp_path / "d.jsonl"
    pj.write_text(json.dumps({"content": "a b"}) + "\n")
    with pytest.raises(KeyError, match=r"data.text_column='text' is missing from line 1 .*content"):
        make_batches(DataConfig(source="jsonl", path=str(pj)), tokenizer)
    pp = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a b"]}), pp)
    with pytest.raises(KeyError, match=r"not a column .*columns: content"):
        make_batches(DataConfig(source="parquet", path=str(pp)), tokenizer)
    pn = tmp_path / "f.npy"
    np.save(pn, np.zeros(100, dtype=np.float32))
    with pytest.raises(TypeError, match="integers"):
        make_batches(DataConfig(source="npy", path=str(pn)))
    np.save(pn, np.full((3, 20), 7))
    with pytest.raises(ValueError, match="holds 3 sequences of 20 tokens"):
        make_batches(DataConfig(source="npy", path=str(pn), sequences=4, seq_len=10))
    with pytest.raises(ValueError, match="out of range for vocab_size=5"):
        make_batches(DataConfig(source="npy", path=str(pn), sequences=2, seq_len=10), vocab_size=5)
