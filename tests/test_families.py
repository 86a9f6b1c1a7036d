"""Layer taxonomy on the real module names of tiny models of each family."""
import pytest
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
)

from curvdist.math import families

SMALL = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 2, "max_position_embeddings": 16}


def _llama():
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, **SMALL))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def _neox():
    return GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL))


def _bert_cls():
    return BertForSequenceClassification(BertConfig(num_labels=3, **SMALL))


LLAMA = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up",
         "mlp.down_proj": "mlp_down"}
GPT2 = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_up", "mlp.c_proj": "mlp_down"}
NEOX = {"attention.query_key_value": "attn_qkv", "attention.dense": "attn_out", "mlp.dense_h_to_4h": "mlp_up",
        "mlp.dense_4h_to_h": "mlp_down"}
BERT = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
        "attention.output.dense": "attn_out", "intermediate.dense": "mlp_up", "output.dense": "mlp_down"}


def _expected(block_prefix, per_block, n_blocks, heads):
    out = {f"{block_prefix}.{b}.{k}": (t, b) for b in range(n_blocks) for k, t in per_block.items()}
    out.update({h: ("head", None) for h in heads})
    return out


@pytest.mark.parametrize("make,family,expected", [
    (_llama, "llama", _expected("model.layers", LLAMA, 2, ["lm_head"])),
    (_gpt2, "gpt2", _expected("transformer.h", GPT2, 2, ["lm_head"])),
    (_neox, "gpt_neox", _expected("gpt_neox.layers", NEOX, 2, ["lm_head"])),
    (_bert_cls, "bert", _expected("bert.encoder.layer", BERT, 2, ["bert.pooler.dense", "classifier"])),
])
def test_every_supported_layer_of_a_transformer(make, family, expected):
    model = make()
    assert families.detect_family(model) == family
    assert families.detect_family(model.config) == family
    selected = families.select_layers(model)
    assert list(selected) == [n for n, m in model.named_modules() if n in expected]  # module order
    got = {n: families.classify(n, family) for n in selected}
    assert got == expected


def test_bare_bert_and_embeddings():
    model = BertModel(BertConfig(**SMALL))
    assert families.classify("encoder.layer.1.output.dense", "bert") == ("mlp_down", 1)
    assert families.classify("encoder.layer.1.attention.output.dense", "bert") == ("attn_out", 1)
    assert families.classify("pooler.dense", "bert") == ("head", None)
    assert families.classify("embeddings.word_embeddings", "bert") == ("embedding", None)
    assert families.classify("model.embed_tokens", "llama") == ("embedding", None)
    assert families.classify("transformer.wte", "gpt2") == ("embedding", None)
    assert families.classify("gpt_neox.embed_in", "gpt_neox") == ("embedding", None)
    assert families.classify("embed_out", "gpt_neox") == ("head", None)  # legacy checkpoint name
    assert "pooler.dense" in families.select_layers(model)
    # norms are not supported layers; by name they are "other" of their block
    assert families.classify("model.layers.3.input_layernorm", "llama") == ("other", 3)


def test_detect_family_from_configs_dicts_and_plain_modules():
    assert families.detect_family({"model_type": "qwen2"}) == "llama"
    assert families.detect_family(MistralConfig()) == "llama"
    assert families.detect_family("gpt2") == "gpt2"
    assert families.detect_family({"model_type": "opt"}) == "opt"  # unknown transformers keep their type
    assert families.detect_family(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) == "mlp"
    assert families.detect_family(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))) == "cnn"
    with pytest.raises(ValueError):
        families.detect_family(42)


def test_generic_rules_for_other_transformers():
    assert families.classify("model.decoder.layers.3.self_attn.q_proj", "opt") == ("attn_q", None)
    assert families.classify("model.decoder.layers.3.self_attn.out_proj", "opt") == ("attn_out", None)
    assert families.classify("model.decoder.layers.3.fc1", "opt") == ("mlp_up", None)
    assert families.classify("model.decoder.layers.3.fc2", "opt") == ("mlp_down", None)
    assert families.classify("lm_head", "opt") == ("head", None)
    assert families.classify("model.decoder.layers.3.something", "opt") == ("other", 3)


def test_plain_mlp_last_linear_is_the_head():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    f = families.detect_family(model)
    names = list(families.select_layers(model))
    assert names == ["0", "2", "4"]
    assert [families.classify(n, f, model) for n in names] == [("other", 0), ("other", 1), ("head", 2)]


def test_cnn_convs_and_final_linear():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, groups=2),  # grouped: not a supported layer
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 2))
    f = families.detect_family(model)
    assert f == "cnn"
    sel = families.select_layers(model)
    assert list(sel) == ["0", "2", "6", "8"]
    assert [families.classify(n, f, model) for n in sel] == [("conv", 0), ("conv", 1), ("other", 2), ("head", 3)]
    with pytest.raises(KeyError):
        families.classify("4", f, model)
    # by name only
    assert families.classify("features.conv1", "cnn") == ("conv", None)
    assert families.classify("classifier", "cnn") == ("head", None)


def test_select_layers_patterns():
    model = _llama()
    sel = families.select_layers(model, ["model.layers.1.mlp.*", "lm_head"])
    assert list(sel) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                         "model.layers.1.mlp.down_proj", "lm_head"]
    assert all(isinstance(m, nn.Linear) for m in sel.values())
    assert list(families.select_layers(model, "model.layers.0.self_attn.q_proj")) == \
        ["model.layers.0.self_attn.q_proj"]
    assert len(families.select_layers(model, ["*.o_proj", "model.layers.0.self_attn.o_proj"])) == 2
    # a norm is a module but not a supported layer
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm.*valid names include: "
                                         r"model\.layers\.0\.self_attn\.q_proj"):
        families.select_layers(model, ["model.layers.0.input_layernorm"])
    with pytest.raises(ValueError, match="'nope.*'"):
        families.select_layers(model, ["model.layers.*.mlp.up_proj", "nope.*"])


def test_tensor_parts_for_the_planner():
    tp = families.tensor_part
    assert tp("model.layers.7.post_attention_layernorm.weight", "llama") == 7
    assert tp("model.embed_tokens.weight", "llama") == "embedding"
    assert tp("model.norm.weight", "llama") == "head"
    assert tp("lm_head.weight", "llama") == "head"
    assert tp("transformer.wpe.weight", "gpt2") == "embedding"
    assert tp("h.3.ln_1.bias", "gpt2") == 3  # legacy names without the prefix
    assert tp("gpt_neox.final_layer_norm.bias", "gpt_neox") == "head"
    assert tp("embeddings.LayerNorm.weight", "bert") == "embedding"
    assert tp("bert.encoder.layer.2.output.LayerNorm.bias", "bert") == 2
    assert tp("classifier.weight", "bert") == "head"
    with pytest.raises(ValueError):
        tp("x.weight", "mlp")


def test_layer_types_are_the_spec_list():
    assert set(families.LAYER_TYPES) == {"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_up", "mlp_gate",
                                         "mlp_down", "conv", "embedding", "head", "other"}
    for rules in families.RULES.values():
        assert {t for _, t in rules} <= set(families.LAYER_TYPES)
