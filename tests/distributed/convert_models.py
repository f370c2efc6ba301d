"""Tiny random HF checkpoints for the converter tests, made with transformers (no download).

Every tensor is randomised (norm weights around 1, biases non-zero) so that a swapped or
mis-reshaped tensor changes the logits; transformers' own init leaves norms at 1 and biases at 0.
"""

from __future__ import annotations

import os

import torch

V = 250
KINDS = ("qwen2", "qwen2-tied", "qwen3", "llama")


def make_hf_model(path: str, kind: str, seed: int = 0, tokenizer: bool = False) -> str:
    import transformers

    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=V, rms_norm_eps=1e-6)
    if kind in ("qwen2", "qwen2-tied"):
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=kind == "qwen2-tied")
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":  # QK-norm, and head_dim != hidden / heads as in real Qwen3 sizes
        cfg = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "llama":  # GQA + Llama-3.1 RoPE scaling
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        cfg = transformers.LlamaConfig(**common, rope_parameters=rope, max_position_embeddings=16384,
                                       tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer:
        from rollout.tiny_model import build_char_tokenizer

        build_char_tokenizer("full").save_pretrained(path)
    return path


def read_hf_tensors(path: str) -> dict:
    """Every tensor of an HF directory (index or single file), by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out
