"""The one place that maps our config sections to Megatron-Core's ``TransformerConfig``."""

from __future__ import annotations

import torch

from .schema import ModelConfig, ParallelConfig, PrecisionConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def train_dtype(precision: PrecisionConfig) -> torch.dtype:
    """Parameter/compute dtype of the model (fp8 trains with bf16 master params)."""
    return _DTYPES[precision.train]


def to_transformer_config(model_cfg: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """Build Megatron's TransformerConfig for our model, parallel and precision sections."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        # Llama/Qwen blocks: RMSNorm, SwiGLU, no bias except Qwen2's QKV bias, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # parallel
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        # CPU: initialise the full master weight and split it, so the same seed gives the same model
        # at any TP size (the CPU invariance tests rely on it). GPU: initialise each shard on its
        # GPU; the CPU path would build every full fp32 weight on every rank before the checkpoint
        # overwrites it (minutes and a full fp32 copy of the model in host memory at 70B).
        # A GPU run from a random init is therefore not TP-invariant; real runs load a checkpoint.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # precision
        params_dtype=train_dtype(precision),
        bf16=precision.train in ("bf16", "fp8"),
        fp16=precision.train == "fp16",
        pipeline_dtype=train_dtype(precision),
        # A deterministic reduction order matters more here than the last few % of speed.
        deterministic_mode=not on_gpu,
    )
    if parallel.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=parallel.recompute_num_layers)
    elif parallel.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    if precision.train == "fp8":
        kwargs.update(fp8="hybrid" if precision.fp8_recipe == "delayed" else "e4m3",
                      fp8_recipe=precision.fp8_recipe,
                      first_last_layers_bf16=precision.fp8_keep_first_last_bf16)
    return TransformerConfig(**kwargs)
