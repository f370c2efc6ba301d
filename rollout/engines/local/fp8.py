"""Emulated FP8 (e4m3) inference on a CPU: the numerics of a blockwise-FP8 SGLang engine.

- Weights of every linear layer inside the decoder blocks are quantized in 128 x 128 blocks with
  ``scale = amax(block) / 448`` (448 = largest e4m3 value), cast to ``float8_e4m3fn`` and
  dequantized back (``w ~= w_fp8 * scale``); the dequantization multiplier is what SGLang and slime
  call ``weight_scale_inv``. Embeddings, norms and the output layer stay in the base dtype, as in
  SGLang's FP8 checkpoints.
- The input activation of each such linear layer is quantized per token in groups of 128 channels
  (``scale = amax(group) / 448``) and dequantized before the matmul, like the per-token-group
  activation quantization of DeepSeek-style block FP8 kernels.

The matmul itself runs in the base dtype (bf16), so what is emulated is the *rounding* of FP8,
which is what creates the training-inference mismatch this project studies.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)

FP8_MAX = 448.0
BLOCK = 128
_TINY = 1e-12


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    size = x.shape[dim]
    pad = (-size) % multiple
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def quantize_weight_blockwise(w: torch.Tensor, block: int = BLOCK):
    """``w`` [N, K] -> (``float8_e4m3fn`` [N, K], ``scale_inv`` fp32 [ceil(N/b), ceil(K/b)])."""
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    wp = _pad_to(_pad_to(w.float(), 0, block), 1, block)
    nb, kb = wp.shape[0] // block, wp.shape[1] // block
    blocks = wp.reshape(nb, block, kb, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=_TINY) / FP8_MAX  # [nb, kb]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(nb * block, kb * block)[:n, :k].contiguous(), scale


def dequantize_weight_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_weight_blockwise` (fp32 result)."""
    n, k = q.shape
    full = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return q.float() * full


def fake_quant_weight(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize ``w`` blockwise; same dtype as ``w``."""
    q, s = quantize_weight_blockwise(w, block)
    return dequantize_weight_blockwise(q, s, block).to(w.dtype)


def fake_quant_activation(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize ``x`` [..., K] per token in groups of ``group`` channels."""
    k = x.shape[-1]
    xp = _pad_to(x.float(), x.dim() - 1, group)
    g = xp.reshape(*xp.shape[:-1], xp.shape[-1] // group, group)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / FP8_MAX
    dq = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return dq.reshape(xp.shape)[..., :k].to(x.dtype)


def fake_quant_activation_fast(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """:func:`fake_quant_activation` with fewer tensor ops (no zero padding, in-place steps), bitwise
    equal to it: zero padding never changes a group's ``amax`` (the clamp floors an all-zero group
    either way) and every element sees the same fp32 operations. A last, partial group (``K`` over
    ``group`` and not a multiple of it) takes the reference path."""
    k = x.shape[-1]
    if k > group and k % group:
        return fake_quant_activation(x, group)
    xf = x.float() if x.dtype != torch.float32 else x.clone()
    g = xf.view(*xf.shape[:-1], max(k // group, 1), min(k, group))
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_(min=_TINY).div_(FP8_MAX)
    dq = g.div(scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float().mul_(scale)
    return dq.view(x.shape).to(x.dtype)


def fp8_linear_names(model: torch.nn.Module) -> List[str]:
    """Linear layers quantized in FP8 mode: those inside the decoder blocks."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}"]


class _ActivationQuant:
    """The forward pre-hook of every FP8 linear of one model. Linears fed the same tensor (q/k/v
    projections, gate/up) share one quantization: the last input is remembered by identity and
    version counter (an in-place change bumps the version), so it is recomputed only for a new input.
    The remembered reference keeps that tensor alive, so identity cannot be reused by another."""

    def __init__(self, reference: bool = False):
        self.reference = reference  # every call quantizes with fake_quant_activation (the baseline)
        self.last = None  # (input, its _version, quantized)

    def __call__(self, module, args):
        x = args[0]
        if self.reference:
            return (fake_quant_activation(x),) + tuple(args[1:])
        last = self.last
        if last is not None and last[0] is x and last[1] == x._version:
            q = last[2]
        else:
            q = fake_quant_activation_fast(x)
            self.last = (x, x._version, q)
        return (q,) + tuple(args[1:])

    def clear(self) -> None:
        self.last = None


def apply_fp8_emulation(model: torch.nn.Module, reference: bool = False) -> List[str]:
    """Fake-quantize the decoder linear weights in place and hook their inputs. Returns the names.
    ``reference``: the hook quantizes every input with :func:`fake_quant_activation` (no sharing)."""
    names = fp8_linear_names(model)
    modules = dict(model.named_modules())
    hook = getattr(model, "_fp8_activation_quant", None) or _ActivationQuant(reference)
    model._fp8_activation_quant = hook
    with torch.no_grad():
        for name in names:
            mod = modules[name]
            mod.weight.copy_(fake_quant_weight(mod.weight))
            if not getattr(mod, "_fp8_hooked", False):
                mod.register_forward_pre_hook(hook)
                mod._fp8_hooked = True
    logger.info("FP8 emulation on %d linear layers (128x128 e4m3 weights, 1x128 activations)", len(names))
    return names


def requantize_weights(model: torch.nn.Module, names: List[str]) -> None:
    """Re-apply weight quantization after new weights were loaded into ``names``."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            modules[name].weight.copy_(fake_quant_weight(modules[name].weight))


def dequantize_fp8_state(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Turn ``x.weight`` (fp8) + ``x.weight_scale_inv`` pairs into dequantized fp32 weights."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is not None and t.dtype == torch.float8_e4m3fn:
            t = dequantize_weight_blockwise(t, scale)
        out[name] = t
    return out
