"""HF ``config.json`` <-> our :class:`~megatron_alp.config.schema.ModelConfig`.

Reading refuses what the Megatron model would silently compute differently (another activation,
biases Megatron does not build, sliding-window attention, a RoPE scaling Megatron does not
implement), so a converted model is the same function as the HF one or the conversion fails.
Both the transformers 5 layout (``rope_parameters``) and the older one (``rope_theta`` +
``rope_scaling``) of config.json are read.
"""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any, Dict, Optional

from ..config.schema import ModelConfig
from .families import UnsupportedModelError, get_family

if TYPE_CHECKING:
    import torch

# Megatron-Core's RotaryEmbedding._apply_scaling implements Llama-3.x scaling with these constants
# fixed (only the factor is configurable); another value would give a different model.
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# config.json's dtype names this code reads and writes. Names, not torch dtypes: this module stays
# free of torch so tools/convert.py refuses a bad config.json before importing torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> "torch.dtype":
    """A :data:`DTYPE_NAMES` name -> the torch dtype (KeyError for another name)."""
    import torch

    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir} has no config.json (not an HF checkpoint directory?)")
    with open(path) as f:
        return json.load(f)


def _rope(hf: Dict[str, Any]):
    """(rope_theta, llama3 scaling factor or None) from either config.json layout."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise UnsupportedModelError(
            f"RoPE scaling type {kind!r} is not supported: Megatron-Core implements only Llama-3 scaling ('llama3')"
        )
    for key, want in LLAMA3_ROPE_CONSTANTS.items():
        if key in scaling and float(scaling[key]) != want:
            raise UnsupportedModelError(
                f"llama3 RoPE scaling with {key} = {scaling[key]} is not supported: Megatron-Core fixes "
                f"{', '.join(f'{k} = {v:g}' for k, v in LLAMA3_ROPE_CONSTANTS.items())}"
            )
    return float(theta), float(scaling["factor"])


def _refuse(hf: Dict[str, Any], key: str, bad, why: str) -> None:
    if hf.get(key, None) == bad:
        raise UnsupportedModelError(f"{hf.get('model_type')}: {key} = {bad!r} is not supported ({why})")


def model_config_from_hf(hf: Dict[str, Any], hf_path: Optional[str] = None) -> ModelConfig:
    """Our model section for an HF config.json (dispatched on its exact ``model_type``)."""
    model_type = hf.get("model_type")
    get_family(model_type)  # unsupported type -> error listing the supported ones
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"{model_type}: hidden_act = {hf['hidden_act']!r}; only SwiGLU ('silu') is supported")
    _refuse(hf, "use_sliding_window", True, "Megatron's attention here is full causal attention")
    _refuse(hf, "mlp_bias", True, "the Megatron model has no MLP biases")
    if model_type in ("llama", "qwen3"):
        # For these, attention_bias adds an o_proj bias too, which Megatron's linear_proj lacks.
        _refuse(hf, "attention_bias", True, "the Megatron model has no output-projection bias")
    theta, factor = _rope(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // heads:
        head_dim = None  # the default: ModelConfig keeps head_dim only when it differs
    cfg = ModelConfig(
        family=model_type,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling_factor=factor,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
        hf_path=os.path.abspath(hf_path) if hf_path else None,
    )
    cfg.validate()
    return cfg


def hf_config_for_export(model_cfg: ModelConfig, dtype: torch.dtype,
                         source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json for an exported checkpoint: the source's (dtype updated) or one built from ``model_cfg``."""
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in DTYPE_NAMES:
        raise KeyError(dtype)
    if source is not None:
        out = copy.deepcopy(source)
        out["torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"] = dtype_name
        return out
    import transformers

    fam = get_family(model_cfg.family)
    head_dim = model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_attention_heads
    rope: Dict[str, Any] = {"rope_theta": model_cfg.rope_theta, "rope_type": "default"}
    if model_cfg.rope_scaling_factor is not None:
        rope = {"rope_theta": model_cfg.rope_theta, "rope_type": "llama3", "factor": model_cfg.rope_scaling_factor,
                **LLAMA3_ROPE_CONSTANTS}
    kwargs = dict(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size, intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        max_position_embeddings=model_cfg.max_position_embeddings, rms_norm_eps=model_cfg.norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings, initializer_range=model_cfg.init_std, rope_parameters=rope,
    )
    if model_cfg.head_dim is not None or model_cfg.family != "qwen2":
        kwargs["head_dim"] = head_dim
    cfg = getattr(transformers, fam.config_class)(**kwargs)
    out = cfg.to_dict()
    out["architectures"] = [fam.architecture]
    out["dtype"] = out["torch_dtype"] = dtype_name
    # The pre-transformers-5 keys too, so older readers (SGLang's pinned transformers) see the same RoPE.
    out["rope_theta"] = model_cfg.rope_theta
    out["rope_scaling"] = ({k: v for k, v in rope.items() if k != "rope_theta"}
                           if model_cfg.rope_scaling_factor else None)
    return out
