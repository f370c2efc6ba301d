"""Declarative name maps, one per HF model family, dispatched on the exact ``model_type``.

A :class:`Rule` says: this Megatron full name (``{i}`` = global layer index) is made from these HF
tensors (each with its symbolic shape, see :meth:`megatron_alp.convert.reshape.Dims.resolve`) by
this named reshape (:data:`megatron_alp.convert.reshape.RESHAPES`), optionally only when a model
feature is on. Megatron names are those of ``GPTModel`` built from the local layer spec; the
Transformer Engine spec's fused-norm names are aliases (:data:`TE_ALIASES`).

Adding a family = adding a :class:`Family` here (and its config.json reader in ``hf_config.py``).
The idea of a per-family table of (HF names, Megatron name, transform) follows Megatron-Bridge's
``MegatronMappingRegistry`` and slime's mbridge; the tables below are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

L = "model.layers.{i}."   # HF decoder-layer prefix
M = "decoder.layers.{i}."  # Megatron decoder-layer prefix


@dataclass(frozen=True)
class Rule:
    mcore: str
    """Megatron full name (TP=1, real vocabulary, global layer index ``{i}``)."""
    hf: Tuple[Tuple[str, Tuple[str, ...]], ...]
    """(HF name, symbolic shape) of each source tensor, in the order the reshape takes them."""
    reshape: str = "copy"
    """Name of the reshape pair in ``RESHAPES``."""
    when: Optional[str] = None
    """Only present when this model feature is on: a ModelConfig bool field, or ``untied``."""

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore


def _rule(mcore, hf, reshape="copy", when=None) -> Rule:
    return Rule(mcore, tuple((n, tuple(s)) for n, s in hf), reshape, when)


# The decoder every supported family shares (Llama layout: RMSNorm, GQA attention, SwiGLU MLP).
_CORE = (
    _rule("embedding.word_embeddings.weight", [("model.embed_tokens.weight", ("vocab", "hidden"))], "vocab"),
    _rule(M + "input_layernorm.weight", [(L + "input_layernorm.weight", ("hidden",))]),
    _rule(M + "self_attention.linear_qkv.weight",
          [(L + "self_attn.q_proj.weight", ("q", "hidden")), (L + "self_attn.k_proj.weight", ("kv", "hidden")),
           (L + "self_attn.v_proj.weight", ("kv", "hidden"))], "qkv"),
    _rule(M + "self_attention.linear_proj.weight", [(L + "self_attn.o_proj.weight", ("hidden", "q"))]),
    _rule(M + "pre_mlp_layernorm.weight", [(L + "post_attention_layernorm.weight", ("hidden",))]),
    _rule(M + "mlp.linear_fc1.weight",
          [(L + "mlp.gate_proj.weight", ("ffn", "hidden")), (L + "mlp.up_proj.weight", ("ffn", "hidden"))], "gate_up"),
    _rule(M + "mlp.linear_fc2.weight", [(L + "mlp.down_proj.weight", ("hidden", "ffn"))]),
    _rule("decoder.final_layernorm.weight", [("model.norm.weight", ("hidden",))]),
    _rule("output_layer.weight", [("lm_head.weight", ("vocab", "hidden"))], "vocab", when="untied"),
)

# Qwen2 / Qwen2.5: bias on q, k and v (not on o_proj).
_QKV_BIAS = (
    _rule(M + "self_attention.linear_qkv.bias",
          [(L + "self_attn.q_proj.bias", ("q",)), (L + "self_attn.k_proj.bias", ("kv",)),
           (L + "self_attn.v_proj.bias", ("kv",))], "qkv", when="qkv_bias"),
)

# Qwen3: RMSNorm over each query / key head (weights of size head_dim, shared by all heads).
_QK_NORM = (
    _rule(M + "self_attention.q_layernorm.weight", [(L + "self_attn.q_norm.weight", ("head_dim",))],
          when="qk_layernorm"),
    _rule(M + "self_attention.k_layernorm.weight", [(L + "self_attn.k_norm.weight", ("head_dim",))],
          when="qk_layernorm"),
)


@dataclass(frozen=True)
class Family:
    model_type: str
    """HF ``model_type`` (exact match)."""
    architecture: str
    """HF ``architectures[0]`` written into an exported config.json."""
    config_class: str
    """transformers config class used when no source config.json is known."""
    rules: Tuple[Rule, ...]
    ignored_hf: Tuple[str, ...] = ("rotary_emb.inv_freq",)
    """Suffixes of HF tensors that carry no weights (old checkpoints store RoPE buffers)."""


FAMILIES: Dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _CORE + _QKV_BIAS),
        Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", _CORE + _QK_NORM),
        Family("llama", "LlamaForCausalLM", "LlamaConfig", _CORE),
    )
}

# Transformer Engine's layer spec fuses the pre-attention / pre-MLP norms into the next linear.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


class UnsupportedModelError(ValueError):
    """An HF checkpoint this converter does not know how to map."""


def get_family(model_type: Optional[str]) -> Family:
    """The family of an exact HF ``model_type``; an error listing the supported ones otherwise."""
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return fam
