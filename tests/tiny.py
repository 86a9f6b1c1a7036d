"""Tiny random Hugging Face models of each family, shared by the checkpoint and planning tests."""
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)


def makers(n_layers: int) -> dict:
    """family → a constructor of a tiny model with ``n_layers`` blocks (Llama tied, GPT-NeoX untied)."""
    small = {"vocab_size": 48, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": n_layers,
             "num_attention_heads": 4, "max_position_embeddings": 32}
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **small)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=16, n_layer=n_layers, n_head=4,
                                                   n_positions=32, bos_token_id=0, eos_token_id=0)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**small)),  # untied, stored as legacy ``embed_out``
        "bert": lambda: BertForSequenceClassification(BertConfig(num_labels=3, **small)),
    }


def save_sharded(tmp_path_factory, family_makers: dict) -> dict:
    """Save each model (seed 0) sharded into several safetensors files with an index; family → directory."""
    out = {}
    for family, make in family_makers.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(family)
        make().save_pretrained(d, max_shard_size="8KB")
        out[family] = d
    return out
