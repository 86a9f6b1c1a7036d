"""Architecture families and their layer-name rules.  Pure: no IO, no ray.

Every analysed layer is reported with a ``layer_type`` (SPEC §1 "Layer types") and a ``block`` (depth index), so
that results from different models can be compared type by type (the paper's α by layer type).  Hugging Face
models name their modules consistently per architecture, so the type is read off the module name with one
regular-expression table per family; the same tables classify the tensor names of a checkpoint *without loading
it* (the planner and the stage builder need to know which tensors belong to which block before anything is read).

Plain ``nn.Module`` models (family ``mlp`` or ``cnn``) have no naming convention; their rules use the module
structure (which supported layer is last, which is a convolution), so pass the model to :func:`classify`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from curvdist.math.layers import is_supported
from curvdist.vocab import LAYER_TYPES, MODEL_TYPES, matches  # noqa: F401  (LAYER_TYPES: the rules' vocabulary)

# The attribute under which a head model (``LlamaForCausalLM``…) holds its base model; checkpoints saved from the
# base class (``BertModel``, legacy ``gpt2``) store names without it.
BASE_PREFIX = {"llama": "model", "gpt2": "transformer", "gpt_neox": "gpt_neox", "bert": "bert"}

_P = r"(?:^|.*\.)"  # any (possibly empty) module prefix, e.g. ``model.`` or ``bert.``

# (regex on the module name, layer type); the block is the named group ``b`` when present.  First match wins.
RULES: dict[str, list[tuple[str, str]]] = {
    "llama": [
        (_P + r"layers\.(?P<b>\d+)\.self_attn\.q_proj$", "attn_q"),
        (_P + r"layers\.(?P<b>\d+)\.self_attn\.k_proj$", "attn_k"),
        (_P + r"layers\.(?P<b>\d+)\.self_attn\.v_proj$", "attn_v"),
        (_P + r"layers\.(?P<b>\d+)\.self_attn\.o_proj$", "attn_out"),
        (_P + r"layers\.(?P<b>\d+)\.mlp\.gate_proj$", "mlp_gate"),
        (_P + r"layers\.(?P<b>\d+)\.mlp\.up_proj$", "mlp_up"),
        (_P + r"layers\.(?P<b>\d+)\.mlp\.down_proj$", "mlp_down"),
        (_P + r"embed_tokens$", "embedding"),
        (r"^(?:lm_head|score)$", "head"),
    ],
    "gpt2": [
        (_P + r"h\.(?P<b>\d+)\.attn\.c_attn$", "attn_qkv"),
        (_P + r"h\.(?P<b>\d+)\.crossattention\.q_attn$", "attn_q"),
        (_P + r"h\.(?P<b>\d+)\.crossattention\.c_attn$", "attn_qkv"),
        (_P + r"h\.(?P<b>\d+)\.(?:attn|crossattention)\.c_proj$", "attn_out"),
        (_P + r"h\.(?P<b>\d+)\.mlp\.c_fc$", "mlp_up"),
        (_P + r"h\.(?P<b>\d+)\.mlp\.c_proj$", "mlp_down"),
        (_P + r"(?:wte|wpe)$", "embedding"),
        (r"^(?:lm_head|score)$", "head"),
    ],
    "gpt_neox": [
        (_P + r"layers\.(?P<b>\d+)\.attention\.query_key_value$", "attn_qkv"),
        (_P + r"layers\.(?P<b>\d+)\.attention\.dense$", "attn_out"),
        (_P + r"layers\.(?P<b>\d+)\.mlp\.dense_h_to_4h$", "mlp_up"),
        (_P + r"layers\.(?P<b>\d+)\.mlp\.dense_4h_to_h$", "mlp_down"),
        (_P + r"embed_in$", "embedding"),
        (r"^(?:embed_out|lm_head|score)$", "head"),  # transformers 5 renames the legacy ``embed_out`` to ``lm_head``
    ],
    "bert": [
        (_P + r"encoder\.layer\.(?P<b>\d+)\.attention\.self\.query$", "attn_q"),
        (_P + r"encoder\.layer\.(?P<b>\d+)\.attention\.self\.key$", "attn_k"),
        (_P + r"encoder\.layer\.(?P<b>\d+)\.attention\.self\.value$", "attn_v"),
        (_P + r"encoder\.layer\.(?P<b>\d+)\.attention\.output\.dense$", "attn_out"),
        (_P + r"encoder\.layer\.(?P<b>\d+)\.intermediate\.dense$", "mlp_up"),
        (_P + r"encoder\.layer\.(?P<b>\d+)\.output\.dense$", "mlp_down"),
        (_P + r"embeddings\.(?:word|position|token_type)_embeddings$", "embedding"),
        (_P + r"(?:pooler\.dense|classifier(?:\.dense|\.out_proj)?|qa_outputs)$", "head"),
        (r"^(?:cls|lm_head)(?:\..+)?\.(?:dense|decoder)$", "head"),
    ],
    # Fallback for transformers of other families: common spellings, decided by the enclosing module's name.
    "generic": [
        (r".*(?:attn|attention).*\.(?:q_proj|query|q_lin|wq|q)$", "attn_q"),
        (r".*(?:attn|attention).*\.(?:k_proj|key|k_lin|wk|k)$", "attn_k"),
        (r".*(?:attn|attention).*\.(?:v_proj|value|v_lin|wv|v)$", "attn_v"),
        (r".*(?:attn|attention).*\.(?:c_attn|query_key_value|qkv_proj|qkv|Wqkv|in_proj)$", "attn_qkv"),
        (r".*(?:attn|attention).*\.(?:o_proj|out_proj|out_lin|dense|c_proj|wo|o)$", "attn_out"),
        (r".*\.(?:gate_proj|w1|wi_0)$", "mlp_gate"),
        (r".*\.(?:up_proj|fc1|c_fc|fc_in|dense_h_to_4h|wi|wi_1|w3|lin1)$", "mlp_up"),
        (r".*\.(?:down_proj|fc2|c_proj|fc_out|dense_4h_to_h|wo|w2|lin2)$", "mlp_down"),
        (r"(?:^|.*\.)(?:embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings|shared)$", "embedding"),
        (r"^(?:lm_head|embed_out|score|classifier|head)(?:\..+)?$", "head"),
    ],
}

# Which checkpoint tensors belong to the block ``b`` (any parameter, norms included), to the embedding side (the
# first stage) and to the head side (the last stage).  Everything else is "other".
BLOCK_RE = {
    "llama": _P + r"layers\.(?P<b>\d+)\.",
    "gpt2": _P + r"h\.(?P<b>\d+)\.",
    "gpt_neox": _P + r"layers\.(?P<b>\d+)\.",
    "bert": _P + r"encoder\.layer\.(?P<b>\d+)\.",
}
EMBED_RE = {
    "llama": _P + r"embed_tokens\.",
    "gpt2": _P + r"(?:wte|wpe)\.",
    "gpt_neox": _P + r"embed_in\.",
    "bert": _P + r"embeddings\.",
}
HEAD_RE = {
    "llama": r"^(?:(?:model\.)?norm\.|lm_head\.|score\.)",
    "gpt2": r"^(?:(?:transformer\.)?ln_f\.|lm_head\.|score\.)",
    "gpt_neox": r"^(?:(?:gpt_neox\.)?final_layer_norm\.|lm_head\.|embed_out\.|score\.)",
    "bert": r"^(?:(?:bert\.)?pooler\.|cls\.|classifier\.|qa_outputs\.|lm_head\.)",
}

_RULES_C = {f: [(re.compile(p), t) for p, t in rules] for f, rules in RULES.items()}


def detect_family(model_or_config: Any) -> str:
    """Family of a model, a config (``PretrainedConfig`` or the dict of config.json) or a ``model_type`` string.

    Known Hugging Face types map through :data:`MODEL_TYPES`; other transformers keep their ``model_type`` as the
    family (classified by the "generic" rules).  A plain module is ``cnn`` when it holds a ``Conv2d``, else ``mlp``.
    """
    obj = model_or_config
    model_type = None
    if isinstance(obj, str):
        model_type = obj
    elif isinstance(obj, Mapping):
        model_type = obj.get("model_type")
    elif getattr(obj, "model_type", None) is not None and not isinstance(obj, nn.Module):
        model_type = obj.model_type
    elif isinstance(obj, nn.Module) and getattr(getattr(obj, "config", None), "model_type", None):
        model_type = obj.config.model_type
    if model_type:
        return MODEL_TYPES.get(model_type, model_type)
    if isinstance(obj, nn.Module):
        return "cnn" if any(isinstance(m, nn.Conv2d) for m in obj.modules()) else "mlp"
    raise ValueError(f"cannot detect the family of {type(obj).__name__}: no model_type and not an nn.Module")


def _first_int(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _structural(name: str, family: str, model: nn.Module) -> tuple[str, int | None]:
    """mlp/cnn: type and depth from the model's supported layers (depth = position among them)."""
    names = [n for n, m in model.named_modules() if is_supported(m)]
    if name not in names:
        raise KeyError(f"{name!r} is not a supported layer of the model")
    mod = model.get_submodule(name)
    depth = names.index(name)
    if isinstance(mod, nn.Conv2d):
        return "conv", depth
    last_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Conv2d)][-1]
    if name == last_linear:
        return "head", depth
    return "other", depth


def classify(name: str, family: str, model: nn.Module | None = None) -> tuple[str, int | None]:
    """(layer_type, block) of the module ``name`` in a model of ``family``.

    Transformer families are decided by name alone.  For ``mlp`` and ``cnn`` pass ``model``: the last ``Linear``
    is the head, convolutions are ``conv``, other linears ``other``, and the block is the layer's depth among the
    supported layers.  Without the model they fall back to name hints (``conv``/``head``/``classifier``/``fc``).
    """
    if family in ("mlp", "cnn"):
        if model is not None:
            return _structural(name, family, model)
        last = name.rsplit(".", 1)[-1]
        if "conv" in name:
            return "conv", _first_int(name)
        if last in ("head", "classifier", "fc", "fc_out", "out", "output"):
            return "head", _first_int(name)
        return "other", _first_int(name)
    rules = _RULES_C.get(family, _RULES_C["generic"])
    for rx, layer_type in rules:
        m = rx.match(name)
        if m:
            b = m.groupdict().get("b")
            return layer_type, (int(b) if b is not None else None)
    if family not in BLOCK_RE:
        return "other", _first_int(name)
    part = tensor_part(name + ".", family)
    return "other", part if isinstance(part, int) else None


def tensor_part(tensor_name: str, family: str) -> int | str:
    """Where a checkpoint tensor lives: its block index, ``"embedding"`` (first stage), ``"head"`` (last stage)
    or ``"other"``.  Used to size and load stages without reading weights."""
    if family not in BLOCK_RE:
        raise ValueError(f"no tensor layout known for family {family!r}")
    m = re.match(BLOCK_RE[family], tensor_name)
    if m:
        return int(m.group("b"))
    if re.match(EMBED_RE[family], tensor_name):
        return "embedding"
    if re.match(HEAD_RE[family], tensor_name):
        return "head"
    return "other"


def select_layers(model: nn.Module, patterns: list[str] | str | None = None,
                  family: str | None = None) -> dict[str, nn.Module]:
    """Supported layers (``layers.is_supported``) of ``model`` in module order, optionally filtered.

    ``patterns`` are module names or fnmatch globs (``"model.layers.*.mlp.*"``); a layer is kept when any pattern
    matches it.  A pattern that matches no supported layer is an error (a typo would otherwise silently analyse
    nothing).  ``family`` is accepted for symmetry with :func:`classify` and checked when given.
    """
    if family is not None and not isinstance(family, str):
        raise TypeError("family must be a string")
    found = {n: m for n, m in model.named_modules() if n and is_supported(m)}
    if patterns is None:
        return found
    if isinstance(patterns, str):
        patterns = [patterns]
    keep: set[str] = set()
    for pat in patterns:
        hits = [n for n in found if matches(n, [pat])]
        if not hits:
            some = list(found)[:8]
            raise ValueError(f"layer pattern {pat!r} matches no supported layer; valid names include: "
                             f"{', '.join(some)}{' …' if len(found) > len(some) else ''} ({len(found)} in all)")
        keep.update(hits)
    return {n: m for n, m in found.items() if n in keep}
