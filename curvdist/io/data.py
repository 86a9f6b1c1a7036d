"""Evaluation batches for causal language models.

``make_batches(cfg, tokenizer, vocab_size)`` returns micro-batches ``(inputs, targets)``::

    inputs  = {"input_ids": (B, T) long, "attention_mask": (B, T) long}
    targets = (B, T) long: targets[:, t] = input_ids[:, t + 1]; -100 at the last position and wherever the
              position or the next one is padding (the loss ignores -100, see curvdist.math.losses)

Sources (``cfg.source``):
- ``pydoc``: the standard library's ``pydoc_data.topics.topics`` (real English text, offline), documents in sorted
  key order; ``text``: a plain text file; ``jsonl``: one JSON object per line, text in ``cfg.text_column``;
  ``parquet``: the ``cfg.text_column`` column.  These are tokenized with the given Hugging Face tokenizer
  (no special tokens; the tokenizer's EOS, when it has one, separates documents) into one token stream.
- ``npy``: token ids, either a 1-D stream or an (S, T) array of sequences (negative ids mark padding).
- ``synthetic``: uniform random tokens in [0, vocab_size).

A stream is cut into non-overlapping windows of ``seq_len`` tokens; ``sequences`` of them are drawn with
``torch.randperm`` seeded by ``cfg.seed`` and kept in stream order, so the batch is deterministic.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvdist.config import DataConfig

IGNORE_INDEX = -100
TEXT_SOURCES = ("pydoc", "text", "jsonl", "parquet")
_TEXT_CHUNK = 1 << 16  # characters per tokenizer call for plain text files (cut at line ends)

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def _path(cfg: DataConfig) -> Path:
    p = Path(str(cfg.path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.path={str(cfg.path)!r} does not exist (data.source={cfg.source!r}); point "
                                f"data.path at an existing file, or use data.source=pydoc or synthetic")
    return p


def read_documents(cfg: DataConfig) -> tuple[list[str], bool]:
    """The texts of a text source, and whether they are separate documents (EOS between them)."""
    if cfg.source == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)], True
    if cfg.source == "text":
        text = _path(cfg).read_text(encoding="utf-8")
        chunks, cur, size = [], [], 0
        for line in text.splitlines(keepends=True):
            cur.append(line)
            size += len(line)
            if size >= _TEXT_CHUNK:
                chunks.append("".join(cur))
                cur, size = [], 0
        return chunks + (["".join(cur)] if cur else []), False
    if cfg.source == "jsonl":
        docs = []
        with _path(cfg).open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"data.path={cfg.path!r} line {i} is not JSON: {e}") from None
                if not isinstance(obj, dict) or cfg.text_column not in obj:
                    keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                    raise KeyError(f"data.text_column={cfg.text_column!r} is missing from line {i} of "
                                   f"{cfg.path!r} (it has: {keys}); set data.text_column")
                if obj[cfg.text_column]:
                    docs.append(str(obj[cfg.text_column]))
        return docs, True
    if cfg.source == "parquet":
        import pyarrow.parquet as pq

        p = _path(cfg)
        names = pq.read_schema(p).names
        if cfg.text_column not in names:
            raise KeyError(f"data.text_column={cfg.text_column!r} is not a column of {cfg.path!r} "
                           f"(columns: {', '.join(names)}); set data.text_column")
        return [str(t) for t in pq.read_table(p, columns=[cfg.text_column]).column(0).to_pylist() if t], True
    raise ValueError(f"data.source={cfg.source!r} is not a text source ({', '.join(TEXT_SOURCES)})")


def tokenize(docs: Sequence[str], tokenizer: Any, separate: bool = True) -> torch.Tensor:
    """One 1-D long stream of the documents' token ids, EOS between documents when ``separate``."""
    out = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None) if separate else None
    stream: list[int] = []
    for i, ids in enumerate(out):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(ids)
    return torch.tensor(stream, dtype=torch.long)


def _windows(stream: torch.Tensor, cfg: DataConfig, what: str) -> torch.Tensor:
    """(sequences, seq_len) non-overlapping windows of a 1-D stream chosen by ``cfg.seed``."""
    n_windows = stream.numel() // cfg.seq_len
    if n_windows < cfg.sequences:
        need = cfg.sequences * cfg.seq_len
        raise ValueError(f"not enough tokens: {what} has {stream.numel():,} tokens = {n_windows:,} windows of "
                         f"data.seq_len={cfg.seq_len}, but data.sequences={cfg.sequences} needs {need:,}; lower "
                         f"data.sequences or data.seq_len, or give more text")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(n_windows, generator=g)[: cfg.sequences].sort().values
    return stream[: n_windows * cfg.seq_len].view(n_windows, cfg.seq_len)[idx]


def load_npy(cfg: DataConfig) -> torch.Tensor:
    """(sequences, seq_len) token ids from a ``.npy`` stream or (S, T) array; negative ids are padding."""
    try:
        arr = np.load(_path(cfg), mmap_mode="r", allow_pickle=False)  # token ids only, never pickled objects
    except (ValueError, OSError) as e:
        raise ValueError(f"data.path={cfg.path!r} is not a .npy array of token ids ({e}); save the ids with "
                         f"numpy.save(path, an integer array)") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"data.path={cfg.path!r} holds {arr.dtype} values; token ids must be integers")
    if arr.ndim == 1:
        return _windows(torch.from_numpy(np.array(arr, dtype=np.int64)), cfg, f"data.path={cfg.path!r}")
    if arr.ndim != 2:
        raise ValueError(f"data.path={cfg.path!r} has shape {arr.shape}; expected (S, T) sequences or a 1-D stream")
    S, T = arr.shape
    if T < cfg.seq_len or S < cfg.sequences:
        raise ValueError(f"not enough tokens: data.path={cfg.path!r} holds {S} sequences of {T} tokens, but "
                         f"data.sequences={cfg.sequences} × data.seq_len={cfg.seq_len} are needed; lower "
                         f"data.sequences or data.seq_len")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(S, generator=g)[: cfg.sequences].sort().values.numpy()
    return torch.from_numpy(np.asarray(arr[idx, : cfg.seq_len], dtype=np.int64))


def causal_lm_batch(ids: torch.Tensor, pad_id: int = 0) -> Batch:
    """Inputs and next-token targets of (B, T) ids where negative ids are padding."""
    mask = ids >= 0                                           # (B, T)
    input_ids = torch.where(mask, ids, torch.full_like(ids, pad_id))
    targets = torch.full_like(ids, IGNORE_INDEX)
    ok = mask[:, :-1] & mask[:, 1:]                           # a position and its next token are both real
    targets[:, :-1] = torch.where(ok, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": mask.long()}, targets


def token_matrix(cfg: DataConfig, tokenizer: Any = None, vocab_size: int | None = None) -> torch.Tensor:
    """(sequences, seq_len) long token ids of the evaluation batch (negative = padding)."""
    if cfg.source == "synthetic":
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
        if vocab_size is None:
            raise ValueError("data.source='synthetic' needs vocab_size (the model's vocabulary size) or a tokenizer")
        g = torch.Generator().manual_seed(cfg.seed)
        return torch.randint(0, vocab_size, (cfg.sequences, cfg.seq_len), generator=g)
    if cfg.source == "npy":
        ids = load_npy(cfg)
    elif cfg.source in TEXT_SOURCES:
        if tokenizer is None:
            raise ValueError(f"data.source={cfg.source!r} needs a tokenizer (the model's); use data.source=npy "
                             "(token ids) or synthetic for a model without one")
        docs, separate = read_documents(cfg)
        what = f"data.source={cfg.source!r}" + (f" ({cfg.path})" if cfg.path else "")
        ids = _windows(tokenize(docs, tokenizer, separate), cfg, what)
    else:
        raise ValueError(f"data.source={cfg.source!r} is not valid; choose one of: "
                         f"{', '.join(TEXT_SOURCES + ('npy', 'synthetic'))}")
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"token id {int(ids.max())} is out of range for vocab_size={vocab_size} "
                         f"(data.source={cfg.source!r}); use the model's own tokenizer")
    return ids


def make_batches(cfg: DataConfig, tokenizer: Any = None, vocab_size: int | None = None) -> list[Batch]:
    """Micro-batches of ``cfg.micro_batch`` sequences (the last one may be smaller) for causal LM."""
    ids = token_matrix(cfg, tokenizer, vocab_size)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    inputs, targets = causal_lm_batch(ids, pad_id=pad if pad is not None else 0)
    out = []
    for s in range(0, ids.shape[0], cfg.micro_batch):
        sl = slice(s, s + cfg.micro_batch)
        out.append(({k: v[sl].clone() for k, v in inputs.items()}, targets[sl].clone()))
    return out
