"""The trainer's model must be the checkpoint's model (and the engine's).

Shapes are not enough: RMSNorm epsilon, RoPE theta and scaling, tied embeddings, the real
vocabulary size and the RoPE table length change the function without changing a tensor shape,
and presets hard-code them (the same family differs between variants: Qwen2.5-32B declares
``rms_norm_eps`` 1e-5, its Instruct variant 1e-6). A model section that disagrees with the
checkpoint would make the trainer compute a different function from the engine, a
training-inference mismatch of our own making. So the trainer refuses to start, naming each field
and both values, when its ``model`` section differs from

- the converted checkpoint it loads (``checkpoint.load``: the model section stored at conversion,
  read from the HF config.json), and
- the HF ``config.json`` of ``model.hf_path`` when that is a local directory: the bus exports that
  file as the engine's config.json (:meth:`megatron_alp.sync.publish.Publisher.hf_config`), so the
  engine runs exactly what the trainer trains.
"""

from __future__ import annotations

import os
from typing import List, Optional

from ..config.schema import ModelConfig

# Every ModelConfig field that changes the function the model computes (init_std, hf_path and the
# trainer-only vocabulary padding do not).
FUNCTION_FIELDS = (
    "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling_factor", "norm_eps",
    "qkv_bias", "qk_layernorm", "tie_embeddings",
)


def _normalised(m: ModelConfig) -> dict:
    out = {k: getattr(m, k) for k in FUNCTION_FIELDS}
    out["num_query_groups"] = m.num_query_groups or m.num_attention_heads
    out["head_dim"] = m.head_dim or m.hidden_size // m.num_attention_heads
    return out


def model_differences(have: ModelConfig, want: ModelConfig, source: str = "checkpoint") -> List[str]:
    """``model.<field>: <source> <want>, config <have>`` for every function-defining field that differs."""
    a, b = _normalised(have), _normalised(want)
    return [f"model.{k}: {source} {b[k]!r}, config {a[k]!r}" for k in FUNCTION_FIELDS if a[k] != b[k]]


def check_model_matches_checkpoint(model: ModelConfig, checkpoint: Optional[str]) -> None:
    """Raise ValueError naming every differing field (no-op without a converted checkpoint or a local
    HF directory to compare with)."""
    from .hf_config import model_config_from_hf, read_hf_config
    from .meta import is_megatron_checkpoint, model_config_from_meta, read_meta

    if checkpoint and is_megatron_checkpoint(checkpoint):
        bad = model_differences(model, model_config_from_meta(read_meta(checkpoint)))
        if bad:
            raise ValueError(f"the model section differs from the checkpoint {checkpoint} (converted from its "
                             f"config.json): " + "; ".join(bad)
                             + ". Set these model fields to the checkpoint's values.")
    hf = model.hf_path
    if hf and os.path.isfile(os.path.join(hf, "config.json")):
        bad = model_differences(model, model_config_from_hf(read_hf_config(hf)), source="config.json")
        if bad:
            raise ValueError(f"the model section differs from {os.path.join(hf, 'config.json')} (which the "
                             f"checkpoint bus exports to the engines): " + "; ".join(bad)
                             + ". Set these model fields to the config.json's values.")
