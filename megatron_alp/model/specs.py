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


def stock_layer_spec(model_cfg, use_te: bool | None = None):
    """The stock GPT layer spec for our model section (RMSNorm, SwiGLU, optional QK-norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te is None:
        use_te = torch.cuda.is_available() and have_transformer_engine()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model_cfg.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=model_cfg.qk_layernorm, normalization="RMSNorm")
    return _with_sp_capable_norms(spec)


def _with_sp_capable_norms(spec):
    """Copy of the local spec whose Apex-less norms (``WrappedTorchNorm``) become our RMSNorm, and
    whose core attention takes packed sequences.

    The norms: sequence parallelism works (see :mod:`megatron_alp.model.norm`). The QK norms act on
    TP-sharded heads, not on sequence slices, so Megatron reduces them by name; they are swapped
    too only to keep one norm class. The core attention: the stock ``DotProductAttention`` plus the
    THD format (:mod:`megatron_alp.model.attention`), unchanged without packing.
    """
    import copy

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from .attention import PackedDotProductAttention
    from .norm import RMSNorm

    spec = copy.deepcopy(spec)
    sub = spec.submodules
    for slot in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(sub, slot) is WrappedTorchNorm:
            setattr(sub, slot, RMSNorm)
    attn = getattr(sub.self_attention, "submodules", None)
    if attn is not None:
        for slot in ("q_layernorm", "k_layernorm"):
            if getattr(attn, slot, None) is WrappedTorchNorm:
                setattr(attn, slot, RMSNorm)
        if getattr(attn, "core_attention", None) is DotProductAttention:
            attn.core_attention = PackedDotProductAttention
    return spec


def packing_mode(model_chunks) -> str:
    """How a packed micro-batch reaches this model's core attention: ``"rows"`` (the local spec's
    :class:`~megatron_alp.model.attention.PackedDotProductAttention`: a
    :class:`~megatron_alp.model.attention.PackedRows` mask), ``"mask"`` (Megatron's stock local
    ``DotProductAttention``: a dense block-diagonal causal mask ``[1, 1, T, T]``) or ``"thd"``
    (Transformer Engine's attention: ``PackedSeqParams``)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from .attention import PackedDotProductAttention

    kinds = {type(m) for c in model_chunks for m in c.modules() if isinstance(m, DotProductAttention)}
    if any(not issubclass(k, PackedDotProductAttention) for k in kinds):
        return "mask"
    return "rows" if kinds else "thd"


def final_norm_spec(use_te: bool | None = None):
    """The block's final norm: TE's where TE is in use, else our SP-capable RMSNorm."""
    if use_te is None:
        use_te = torch.cuda.is_available() and have_transformer_engine()
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from .norm import RMSNorm

    return RMSNorm


def stock_block_spec(model_cfg, config, layer_spec=None, vp_stage=None):
    """A ``TransformerBlockSubmodules`` for this pipeline stage: one layer spec per local layer.

    ``layer_spec`` may be a single spec or a function ``global_layer_index -> spec`` (ALP perturbs
    a subset of layers by handing out two specs).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layer_spec = layer_spec if layer_spec is not None else stock_layer_spec(model_cfg)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=ps.get_pipeline_model_parallel_rank())
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    from megatron.core.transformer.spec_utils import ModuleSpec

    per_layer = not isinstance(layer_spec, ModuleSpec)
    specs = [layer_spec(offset + i) if per_layer else layer_spec for i in range(n)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm_spec())
