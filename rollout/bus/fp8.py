"""FP8 export: blockwise e4m3 linear weights for an FP8 rollout with BF16 training.

At each publication every linear weight inside the decoder layers (2-D ``model.layers.*.weight``;
norms are 1-D, embeddings and the LM head live outside the layers) is quantized in 128 x 128
blocks with ``scale = amax(block) / 448`` and published as ``<name>`` (``float8_e4m3fn``) plus
``<name>_scale_inv`` (fp32, one per block: the *dequantization multiplier*, despite its name, as
in DeepSeek-V3 / SGLang block-FP8 checkpoints). ``config.json`` gets
:data:`QUANTIZATION_CONFIG`, the block-FP8 declaration SGLang needs to load such weights; an
SGLang engine for an FP8 rollout must therefore be *launched* on a bus version (version 0 is the
initial weights). This is how slime and verl feed FP8 rollouts; the code is ours.

The quantizer is the local engine's (:mod:`rollout.engines.local.fp8`): one implementation, so the
CPU engine's emulated FP8 and the exported FP8 round identically.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Tuple

import torch

from ..engines.local.fp8 import BLOCK, FP8_MAX, dequantize_weight_blockwise, quantize_weight_blockwise

QUANTIZATION_CONFIG: Dict[str, object] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}
SCALE_SUFFIX = "_scale_inv"
# e4m3 has 3 mantissa bits: round-to-nearest errs by at most 2^-4 relative for normal numbers;
# below the smallest normal (2^-6) the spacing is 2^-9, so at most 2^-10 absolute (in scaled units).
E4M3_REL_ERR = 2.0 ** -4
E4M3_SUBNORMAL_ERR = 2.0 ** -10


def is_fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights inside the decoder layers (what SGLang's block-FP8 linear method holds)."""
    return tensor.dim() == 2 and name.endswith(".weight") and ".layers." in f".{name}"


def quantize_named(named: Iterable[Tuple[str, torch.Tensor]], other_dtype: torch.dtype = torch.bfloat16
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """FP8 linear weights (+ their ``_scale_inv``), everything else cast to ``other_dtype``."""
    for name, t in named:
        if is_fp8_linear(name, t):
            q, scale = quantize_rows(t)
            yield name, q
            yield name + SCALE_SUFFIX, scale
        else:
            yield name, t.to(other_dtype)


def quantize_rows(w: torch.Tensor, rows: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_weight_blockwise` one band of ``rows`` (a multiple of the block) at a time,
    into preallocated outputs: blocks never straddle bands, so the result is the same, and the fp32
    temporaries are one band's instead of the whole weight's (peak <= 2x a bf16 input, not 6x)."""
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(((n + BLOCK - 1) // BLOCK, (k + BLOCK - 1) // BLOCK), dtype=torch.float32, device=w.device)
    for r in range(0, n, rows):
        qb, sb = quantize_weight_blockwise(w[r:r + rows])
        q[r:r + rows].copy_(qb)
        scale[r // BLOCK:(r + rows + BLOCK - 1) // BLOCK].copy_(sb)
    return q, scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return dequantize_weight_blockwise(q, scale_inv, BLOCK)


def error_bound(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on ``|w - dequantize(quantize(w))|`` for e4m3 with these block scales."""
    n, k = w.shape
    s = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    return torch.maximum(w.float().abs() * E4M3_REL_ERR, s * E4M3_SUBNORMAL_ERR)


__all__ = ["QUANTIZATION_CONFIG", "SCALE_SUFFIX", "FP8_MAX", "is_fp8_linear", "quantize_named", "dequantize",
           "error_bound"]
