"""One pipeline stage of a Hugging Face model, built from transformers' own block classes with only its tensors.

Why this way:

- The blocks are transformers' own modules (``LlamaDecoderLayer``, ``GPT2Block``, ``GPTNeoXLayer``, ``BertLayer``),
  so a stage computes exactly what the full model computes, and its module names are the full model's
  (``model.layers.5.mlp.up_proj``): the layers a stage analyses carry the same names as in the in-process analysis.
- The model class is instantiated with its parameters on the ``meta`` device (no memory, no random init), blocks
  outside the stage are dropped, and the stage's own tensors are read from the checkpoint and assigned.  Buffers
  (rotary frequencies, BERT position ids) are created for real, so nothing else needs recomputing.
- What the full model computes once in its top-level ``forward`` (position ids, rotary cos/sin, causal and padding
  masks) is recomputed by every stage from the hidden states' shape and the 2-D ``attention_mask``, with the same
  transformers functions (``create_causal_mask``...), so that stages can run in different processes and only the
  hidden states (and the mask) travel between them.

Supported: Llama-like decoders (Llama, Mistral, Qwen2/3: ``*ForCausalLM`` or the base ``*Model``), GPT-2
(``GPT2LMHeadModel``/``GPT2Model``), GPT-NeoX, BERT (``BertModel``, ``BertForSequenceClassification``,
``BertForTokenClassification``, ``BertForMaskedLM``).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from curvdist.io import checkpoint as ckpt
from curvdist.vocab import BERT_STAGE_CLASSES, LLAMA_STAGE_TYPES

# Per family: the layer container (relative to the base model), the embedding modules (first stage only) and the
# final modules inside the base model (last stage only).  Head modules beside the base (``lm_head``...) belong to
# the last stage too.
STRUCTURE = {
    "llama": {"layers": "layers", "embed": ("embed_tokens",), "final": ("norm",)},
    "gpt2": {"layers": "h", "embed": ("wte", "wpe"), "final": ("ln_f",)},
    "gpt_neox": {"layers": "layers", "embed": ("embed_in",), "final": ("final_layer_norm",)},
    "bert": {"layers": "encoder.layer", "embed": ("embeddings",), "final": ("pooler",)},
}


@contextlib.contextmanager
def _params_on_meta():
    """Parameters created inside go to the meta device as they are registered; buffers stay real (the same trick
    as accelerate's ``init_empty_weights(include_buffers=False)``).  Module constructors allocate ``torch.empty``
    only, so building even a 7B skeleton costs ~0.2 s and no memory.  The patch is process-global while active:
    build one stage at a time per process (a stage actor does)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def model_class(index: ckpt.CheckpointIndex):
    """The transformers class the checkpoint was saved from (``config.architectures``), which is also the class
    the in-process analysis loads, so that names agree."""
    import transformers

    family, cfg = index.family, index.config
    arch = index.architecture
    if family == "llama" and cfg.get("model_type") not in LLAMA_STAGE_TYPES:
        raise NotImplementedError(f"stages for model_type {cfg.get('model_type')!r} are not supported "
                                  f"(Llama-like: {', '.join(LLAMA_STAGE_TYPES)})")
    if family == "bert" and cfg.get("model_type") != "bert":
        raise NotImplementedError(f"stages for model_type {cfg.get('model_type')!r} are not supported (bert only)")
    if family not in STRUCTURE:
        raise NotImplementedError(f"stages for family {family!r} are not supported ({', '.join(STRUCTURE)})")
    cls = getattr(transformers, arch, None) if arch else None
    if family == "bert":
        if cls is None:
            return transformers.BertModel
        if arch not in BERT_STAGE_CLASSES:
            raise NotImplementedError(f"BERT stages support {', '.join(BERT_STAGE_CLASSES)}, not {arch}")
        return cls
    if cls is not None:
        if not (index.is_base or arch.endswith(("ForCausalLM", "LMHeadModel"))):
            raise NotImplementedError(f"stages support causal-LM and base models of family {family}, not {arch}")
        return cls
    from transformers import AutoConfig, AutoModelForCausalLM
    return AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(cfg["model_type"]))]


class ModelSlice(nn.Module):
    """Blocks ``first_block..last_block`` of a model (plus its embedding on the first stage and its final norm and
    head on the last).  ``forward(x, attention_mask=None)``: ``x`` is input ids (first stage) or hidden states
    (B, T, d); returns hidden states, or the model's logits on a last stage with a head."""

    def __init__(self, model: nn.Module, config, family: str, first_block: int, last_block: int,
                 has_embedding: bool, has_head: bool):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.config = config
        self.family = family
        self.head_class = type(model).__name__
        self.base_prefix = "" if model.base_model is model else model.base_model_prefix
        self.first_block, self.last_block = first_block, last_block
        self.has_embedding, self.has_head = has_embedding, has_head
        self.loaded_tensors: list[str] = []

    # -------------------------------------------------------------------------------------------------- helpers
    @property
    def base(self) -> nn.Module:
        return self.get_submodule(self.base_prefix) if self.base_prefix else self

    def blocks(self) -> list[tuple[int, nn.Module]]:
        container = self.base.get_submodule(STRUCTURE[self.family]["layers"])
        return [(int(k), m) for k, m in container.items()]

    @staticmethod
    def _positions(h: torch.Tensor) -> torch.Tensor:
        return torch.arange(h.shape[1], device=h.device).unsqueeze(0)

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask.view(x.shape[0], -1)
        return getattr(self, f"_forward_{self.family}")(x, attention_mask)

    def _forward_llama(self, x, attention_mask):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        base, cfg = self.base, self.config
        h = base.embed_tokens(x) if self.has_embedding else x
        pos = self._positions(h)
        layer_types = getattr(cfg, "layer_types", None)

        def kind(i):  # as the model's own forward decides (Mistral: sliding_window; Qwen2/3: layer_types)
            if layer_types:
                return layer_types[i]
            return "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"

        masks = {}
        for i, _ in self.blocks():
            k = kind(i)
            if k not in masks:
                fn = create_sliding_window_causal_mask if k == "sliding_attention" else create_causal_mask
                masks[k] = fn(config=cfg, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                              position_ids=pos)
        pe = base.rotary_emb(h, position_ids=pos)
        for i, layer in self.blocks():
            h = layer(h, attention_mask=masks[kind(i)], position_ids=pos, position_embeddings=pe)
        if self.has_head:
            h = base.norm(h)
            if getattr(self, "lm_head", None) is not None:
                h = self.lm_head(h)
        return h

    def _forward_gpt2(self, x, attention_mask):
        from transformers.masking_utils import create_causal_mask

        base, cfg = self.base, self.config
        if self.has_embedding:
            e = base.wte(x)
            pos = self._positions(e)
            h = base.drop(e + base.wpe(pos))
        else:
            e = h = x
            pos = self._positions(h)
        mask = create_causal_mask(config=cfg, inputs_embeds=e, attention_mask=attention_mask, cache=None,
                                  position_ids=pos)
        for _, block in self.blocks():
            h = block(h, None, mask, None, encoder_attention_mask=None, use_cache=False, position_ids=pos)
        if self.has_head:
            h = base.ln_f(h)
            if getattr(self, "lm_head", None) is not None:
                h = self.lm_head(h)
        return h

    def _forward_gpt_neox(self, x, attention_mask):
        from transformers.masking_utils import create_causal_mask

        base, cfg = self.base, self.config
        h = base.embed_in(x) if self.has_embedding else x
        pos = self._positions(h)
        mask = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                                  position_ids=pos)
        if self.has_embedding:
            h = base.emb_dropout(h)
        pe = base.rotary_emb(h, position_ids=pos)
        for _, layer in self.blocks():
            h = layer(h, attention_mask=mask, position_ids=pos, layer_past=None, use_cache=False,
                      position_embeddings=pe)
        if self.has_head:
            h = base.final_layer_norm(h)
            if getattr(self, "lm_head", None) is not None:
                h = self.lm_head(h)
        return h

    def _forward_bert(self, x, attention_mask):
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        base, cfg = self.base, self.config
        h = base.embeddings(input_ids=x) if self.has_embedding else x
        if cfg.is_decoder:
            mask = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=attention_mask, cache=None)
        else:
            mask = create_bidirectional_mask(config=cfg, inputs_embeds=h, attention_mask=attention_mask)
        for _, layer in self.blocks():
            h = layer(h, attention_mask=mask)
        if not self.has_head:
            return h
        if self.head_class == "BertForSequenceClassification":
            return self.classifier(self.dropout(base.pooler(h)))
        if self.head_class == "BertForTokenClassification":
            return self.classifier(self.dropout(h))
        if self.head_class == "BertForMaskedLM":
            return self.cls(h)
        return h  # BertModel: the last hidden state (the pooler is not built; see build_slice)


def build_slice(index: ckpt.CheckpointIndex, first_block: int, last_block: int, *, has_embedding: bool,
                has_head: bool, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                attn_implementation: str | None = None) -> ModelSlice:
    """Build the stage over blocks ``first_block..last_block`` (inclusive), reading only its tensors.

    ``dtype`` casts floating tensors as they are read (None keeps the stored dtype).
    ``attn_implementation`` (default: the config's, else ``"sdpa"``) must match the in-process model's to get the
    same numbers; ``"eager"`` (or sdpa under ``forward.second_order_attention``) is needed for second-order AD.
    For a bare ``BertModel`` the last stage returns the last hidden state and the pooler is not built (it does not
    feed that output).  The stage is returned in eval mode; ``stage.loaded_tensors`` lists the stored names read.
    """
    if not 0 <= first_block <= last_block < index.num_blocks:
        raise ValueError(f"blocks {first_block}..{last_block} outside 0..{index.num_blocks - 1}")
    cls = model_class(index)
    config = copy.deepcopy(index.hf_config())
    config._attn_implementation = attn_implementation or getattr(index.hf_config(), "_attn_implementation",
                                                                 None) or "sdpa"
    with _params_on_meta():
        model = cls(config)
    spec = STRUCTURE[index.family]
    base = model.base_model
    parent_path, _, attr = spec["layers"].rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    old = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleDict({str(i): old[i] for i in range(first_block, last_block + 1)}))
    if not has_embedding:
        for name in spec["embed"]:
            setattr(base, name, None)
    keep_pooler = type(model).__name__ == "BertForSequenceClassification"
    for name in spec["final"]:
        if getattr(base, name, None) is not None and (not has_head or (name == "pooler" and not keep_pooler)):
            setattr(base, name, None)
    if not has_head and base is not model:
        for name, _ in list(model.named_children()):
            if name != model.base_model_prefix:
                setattr(model, name, None)
    stage = ModelSlice(model, config, index.family, first_block, last_block, has_embedding, has_head)
    _load(stage, index, dtype, device)
    return stage.to(device).eval()


def _wanted(stage: ModelSlice, index: ckpt.CheckpointIndex) -> dict[str, str]:
    """The stage's state keys → the stored tensor each is read from (a tied head reads the embedding).  Every
    parameter must be stored (loaded or not yet); a buffer may be absent (the module made it)."""
    wanted: dict[str, str] = {}
    for key, t in stage.state_dict(keep_vars=True).items():
        stored = index.names.get(key) or index.names.get(index.tied.get(key, ""))
        if stored is None:
            if t.device.type == "meta" or _is_param(stage, key):
                raise KeyError(f"checkpoint {index.path}: no tensor for {key!r} (stage blocks "
                               f"{stage.first_block}..{stage.last_block})")
            continue  # a real buffer the checkpoint does not carry
        wanted[key] = stored
    return wanted


def _read(stage: ModelSlice, index: ckpt.CheckpointIndex, wanted: dict[str, str], dtype, device) -> dict:
    tensors = ckpt.load_tensors(index, sorted(set(wanted.values())), device=device, dtype=dtype)
    for key, stored in wanted.items():
        shape = tuple(stage.get_parameter(key).shape) if _is_param(stage, key) else None
        if shape is not None and tuple(tensors[stored].shape) != shape:
            raise ValueError(f"checkpoint {index.path}: {stored} has shape {tuple(tensors[stored].shape)}, "
                             f"the model expects {shape} for {key}")
    return tensors


def _load(stage: ModelSlice, index: ckpt.CheckpointIndex, dtype: torch.dtype, device) -> None:
    """Assign the stage's parameters from the checkpoint; a tied head reads the embedding tensor."""
    wanted = _wanted(stage, index)
    tensors = _read(stage, index, wanted, dtype, device)
    stage.load_state_dict({k: tensors[s] for k, s in wanted.items()}, strict=False, assign=True)
    left = [n for n, p in stage.named_parameters() if p.device.type == "meta"]
    if left:
        raise KeyError(f"checkpoint {index.path}: parameters left unloaded: {left[:5]}")
    stage.loaded_tensors = sorted(set(wanted.values()))


def reload_weights(stage: ModelSlice, index: ckpt.CheckpointIndex, *, dtype: torch.dtype | None = torch.float32,
                   device: str | torch.device = "cpu") -> None:
    """Read another checkpoint of the same architecture into ``stage`` in place: the same tensors as
    :func:`build_slice` reads (the stage's own, nothing else), copied into the existing parameters, so the module
    objects (and any hook or reference held on them) stay; no model class is instantiated.  A tensor whose shape
    differs from the stage's parameter is refused before anything is copied."""
    wanted = _wanted(stage, index)
    tensors = _read(stage, index, wanted, dtype, device)
    state = stage.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, stored in wanted.items():
            state[key].copy_(tensors[stored])
    stage.loaded_tensors = sorted(set(wanted.values()))


def _is_param(module: nn.Module, key: str) -> bool:
    mod_name, _, p = key.rpartition(".")
    return p in module.get_submodule(mod_name)._parameters
