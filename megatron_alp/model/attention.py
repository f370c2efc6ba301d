"""Packed sequences (``PackedSeqParams``, THD format) for Megatron's local core attention.

Megatron-Core 0.16.1's local ``DotProductAttention`` refuses ``packed_seq_params`` (only
``TEDotProductAttention`` takes them), so without Transformer Engine a packed micro-batch used to
travel as one long row with a dense block-diagonal causal mask ``[1, 1, T, T]``: attention cost
and memory quadratic in the pack's length T although each token only sees its own sample. Here the
local spec's core attention becomes :class:`PackedDotProductAttention`, the stock class whose
``forward`` also takes the THD format: the samples of the pack (``cu_seqlens``) are gathered into
a padded ``[samples, longest, heads, dim]`` batch, attended with a causal mask that also hides
each sample's padding keys (``torch.nn.functional.scaled_dot_product_attention``), and scattered
back to the packed order. The cost is ``sum over samples of longest^2`` instead of ``T^2``.

Same attention as the stock class computes for a padded row (the same scale; masked keys get
weight exactly 0 in both), up to fp32 rounding of the kernel's summation order. Without
``packed_seq_params`` the stock forward runs unchanged. What the packed path does not implement
(attention dropout in training, sliding windows, a softmax offset, an attention bias) raises.
With THD, Megatron's RoPE restarts the positions of every sample (``_apply_rotary_pos_emb_thd``),
as a padded row has them.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local ``DotProductAttention`` plus the packed (THD) format (module docstring)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        self._check_packed(packed_seq_params, attention_bias)
        return packed_attention(query, key, value, packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q,
                                self._scale())

    def _scale(self) -> float:
        # The stock class scales the scores by softmax_scale in baddbmm, then by coeff (the layer
        # number under apply_query_key_layer_scaling, else none) in its softmax.
        coeff = self.scale_mask_softmax.scale
        return self.softmax_scale * (coeff if coeff is not None else 1.0)

    def _check_packed(self, params, attention_bias) -> None:
        unsupported = {
            "qkv_format != 'thd'": params.qkv_format != "thd",
            "an attention bias": attention_bias is not None,
            "a sliding window": self.scale_mask_softmax.window_size is not None,
            "a softmax offset (softmax_type != 'vanilla')": self.softmax_offset is not None,
            "attention dropout in training": self.training and self.attention_dropout.p > 0,
            "different query and key sequences": params.cu_seqlens_kv is not None
            and params.cu_seqlens_kv is not params.cu_seqlens_q
            and not torch.equal(params.cu_seqlens_kv, params.cu_seqlens_q),
            "padded cu_seqlens": params.cu_seqlens_q_padded is not None,
        }
        bad = [what for what, on in unsupported.items() if on]
        if bad:
            raise NotImplementedError(f"packed sequences on the local spec's attention do not support {', '.join(bad)}"
                                      " (use padded micro-batches: run.max_tokens_per_micro_batch=0)")


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: Optional[int], scale: float) -> torch.Tensor:
    """Causal self-attention of the samples laid end to end in ``query`` [t, np, hn] and
    ``key``/``value`` [t, ng, hn] (ng divides np: grouped queries), sample i at rows
    ``cu_seqlens[i]:cu_seqlens[i + 1]`` (``cu_seqlens[-1] == t``). Returns [t, np * hn]."""
    t, n_heads, dim = query.shape
    groups = key.shape[1]
    cu = cu_seqlens.to(device=query.device, dtype=torch.long)
    if int(cu[-1]) != t or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must run from 0 to the {t} packed tokens, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    longest = int(max_seqlen) if max_seqlen is not None else int(lengths.max())
    pos = torch.arange(longest, device=query.device)
    valid = pos < lengths[:, None]  # [n, longest]: a real token of sample i
    index = torch.where(valid, cu[:-1, None] + pos, 0)
    if n_heads != groups:  # the stock class repeats each key/value group for its queries
        key = key.repeat_interleave(n_heads // groups, dim=1)
        value = value.repeat_interleave(n_heads // groups, dim=1)
    # [n, longest, heads, dim] -> [n, heads, longest, dim]
    q, k, v = (x[index].transpose(1, 2) for x in (query, key, value))
    causal = pos[None, :] <= pos[:, None]  # [query, key]
    # True = attend (SDPA's convention). A padding query also sees itself, so that no row is fully
    # masked (a NaN there would reach the gradients through 0 * NaN); its output is dropped.
    mask = (causal[None, None] & valid[:, None, None, :]) | torch.eye(longest, dtype=torch.bool, device=query.device)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[valid].reshape(t, n_heads * dim)  # back to the packed order
