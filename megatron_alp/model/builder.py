"""Build Megatron ``GPTModel``s for the HF families we target (Qwen2/2.5, Qwen3, Llama 2/3)."""

from __future__ import annotations

import logging

import torch

from ..config.megatron import to_transformer_config
from .specs import stock_block_spec
from .vocab import padded_vocab_size

logger = logging.getLogger(__name__)


def build_gpt_model(model_cfg, parallel, precision, block_spec=None, transformer_config=None, **gpt_kwargs):
    """The GPTModel chunk of this pipeline stage (parallel state must be initialised).

    ``block_spec`` is a function ``TransformerConfig -> TransformerBlockSubmodules``; it defaults
    to :func:`stock_block_spec` (ALP passes its own). Extra keyword arguments go to ``GPTModel``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config or to_transformer_config(model_cfg, parallel, precision)
    spec = block_spec(config) if block_spec is not None else stock_block_spec(model_cfg, config)
    tp = ps.get_tensor_model_parallel_world_size()
    kwargs = dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rope_theta),
        rope_scaling=model_cfg.rope_scaling_factor is not None,
        rope_scaling_factor=model_cfg.rope_scaling_factor or 8.0,
    )
    kwargs.update(gpt_kwargs)
    gpt = GPTModel(**kwargs)
    if torch.cuda.is_available():
        gpt.cuda()
    return gpt
