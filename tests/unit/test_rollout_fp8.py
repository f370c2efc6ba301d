"""Emulated FP8: blockwise 128x128 e4m3 weights, per-token-group activations."""

import torch

from rollout.engines.local.fp8 import (
    FP8_MAX,
    dequantize_fp8_state,
    dequantize_weight_blockwise,
    fake_quant_activation,
    fake_quant_weight,
    quantize_weight_blockwise,
)


def test_block_scales_are_amax_over_448():
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    w[:128, :128] *= 10  # one loud block
    q, s = quantize_weight_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (2, 3)
    assert torch.allclose(s[0, 0], w[:128, :128].abs().max() / FP8_MAX)
    assert torch.allclose(s[1, 2], w[128:, 256:].abs().max() / FP8_MAX)
    # the largest element of every block maps to +-448 exactly
    assert q.float().abs().max() == FP8_MAX


def test_round_trip_error_is_e4m3_sized_and_idempotent():
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    dq = fake_quant_weight(w)
    rel = ((dq - w).abs() / w.abs().clamp(min=1e-3)).median()
    assert 0 < rel < 0.07  # 3 mantissa bits: <= 2^-4 relative rounding error for normal values
    assert torch.equal(fake_quant_weight(dq), dq)  # representable values stay put
    q, s = quantize_weight_blockwise(w)
    assert torch.equal(dequantize_weight_blockwise(q, s), dq)


def test_activation_groups_are_per_token():
    x = torch.randn(3, 5, 256)
    x[0, 0, :128] *= 100  # a loud group must not change other tokens / groups
    y = fake_quant_activation(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(fake_quant_activation(x[1:]), y[1:])
    assert torch.equal(fake_quant_activation(x[0, 0, 128:]), y[0, 0, 128:])
    assert (y - x).abs().max() > 0


def test_fp8_checkpoint_tensors_are_dequantized():
    w = torch.randn(130, 70)
    q, s = quantize_weight_blockwise(w)
    out = dequantize_fp8_state({"a.weight": q, "a.weight_scale_inv": s, "b.bias": torch.ones(3)})
    assert set(out) == {"a.weight", "b.bias"}
    assert torch.equal(out["a.weight"], fake_quant_weight(w))
