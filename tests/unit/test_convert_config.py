"""config.json <-> ModelConfig: both RoPE layouts, refusals, and configs written for export."""

from __future__ import annotations

import pytest
import torch

from megatron_alp.convert import UnsupportedModelError, model_config_from_hf
from megatron_alp.convert.hf_config import hf_config_for_export

BASE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 250, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 16384}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_families():
    q2 = model_config_from_hf({**BASE, "model_type": "qwen2", "tie_word_embeddings": True})
    assert (q2.family, q2.qkv_bias, q2.qk_layernorm, q2.tie_embeddings) == ("qwen2", True, False, True)
    q3 = model_config_from_hf({**BASE, "model_type": "qwen3", "head_dim": 24})
    assert (q3.qkv_bias, q3.qk_layernorm, q3.head_dim, q3.num_query_groups) == (False, True, 24, 2)
    ll = model_config_from_hf({**BASE, "model_type": "llama", "num_key_value_heads": None})
    assert (ll.qkv_bias, ll.num_query_groups, ll.norm_eps, ll.ffn_hidden_size) == (False, 4, 1e-5, 96)


def test_rope_both_layouts():
    new = {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}}
    old = {**BASE, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3}}
    for hf in (new, old):
        cfg = model_config_from_hf(hf)
        assert (cfg.rope_theta, cfg.rope_scaling_factor) == (5e5, 8.0)
    plain = model_config_from_hf({**BASE, "model_type": "qwen2", "rope_theta": 1e6, "rope_scaling": None})
    assert (plain.rope_theta, plain.rope_scaling_factor) == (1e6, None)


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", **LLAMA3, "high_freq_factor": 2.0}}, "high_freq_factor = 2.0"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"mlp_bias": True}, "mlp_bias = True"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"model_type": "llama4"}, "supported: llama, qwen2, qwen3"),
    ({"model_type": None}, "unsupported model_type None"),
])
def test_refusals(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        model_config_from_hf({**BASE, "model_type": "llama", **change})


def test_qwen2_sliding_window_refused():
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        model_config_from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": True})


@pytest.mark.parametrize("hf", [
    {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}},
    {**BASE, "model_type": "qwen3", "head_dim": 24, "tie_word_embeddings": True},
    {**BASE, "model_type": "qwen2"},
], ids=["llama", "qwen3", "qwen2"])
def test_generated_config_reads_back(hf):
    """Without a source config.json, the exported one (built with transformers) reads back equal."""
    from transformers import AutoConfig

    cfg = model_config_from_hf(hf)
    out = hf_config_for_export(cfg, torch.bfloat16)
    assert out["dtype"] == "bfloat16" and out["architectures"][0].lower().startswith(hf["model_type"])
    back = model_config_from_hf(AutoConfig.for_model(**out).to_dict())
    assert back == cfg
    # The source config, when known, is written back as is (dtype updated).
    src = dict(hf, torch_dtype="float32")
    assert hf_config_for_export(cfg, torch.bfloat16, src) == dict(src, torch_dtype="bfloat16")


# The published config.json of each model (the fields that matter), against our presets.
REAL = {
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                   "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16", "vocab_size": 152064},
    "llama3-70b": {"model_type": "llama", "hidden_act": "silu", "hidden_size": 8192, "intermediate_size": 28672,
                   "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                   "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256},
}


@pytest.mark.parametrize("preset", sorted(REAL))
def test_real_configs_match_presets(preset):
    from megatron_alp.config import load_config
    from megatron_alp.config.loader import CONFIG_ROOT

    want = load_config(str(CONFIG_ROOT / "model" / f"{preset}.yaml")).model
    got = model_config_from_hf(REAL[preset])
    fields = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "rope_theta", "rope_scaling_factor", "norm_eps", "qkv_bias", "qk_layernorm",
              "tie_embeddings", "head_dim")
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
    # Llama-3.1-70B: the same plus Llama-3 RoPE scaling, which Megatron implements with these constants.
    if preset == "llama3-70b":
        cfg31 = dict(REAL[preset], max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        assert model_config_from_hf(cfg31).rope_scaling_factor == 8.0
