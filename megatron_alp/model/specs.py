"""Layer specs: Transformer Engine's where TE and CUDA exist, Megatron's local spec otherwise.

Everything model-specific is changed through specs (ARCHITECTURE.md convention 1): ALP's spec
(:mod:`megatron_alp.model.alp`) starts from :func:`stock_layer_spec` and changes one thing.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def stock_layer_spec(model, use_te: bool | None = None):
    """The stock GPT layer spec for our model section (RMSNorm, SwiGLU, optional QK-norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te is None:
        use_te = torch.cuda.is_available() and have_transformer_engine()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")
