"""Packed sequences (``PackedSeqParams``, THD format) for Megatron's local core attention.

Megatron-Core 0.16.1's local ``DotProductAttention`` refuses ``packed_seq_params`` (only
``TEDotProductAttention`` takes them), so without Transformer Engine a packed micro-batch used to
travel as one long row with a dense block-diagonal causal mask ``[1, 1, T, T]``: attention cost
and memory quadratic in the pack's length T although each token only sees its own sample. Here the
local spec's core attention becomes :class:`PackedDotProductAttention`, the stock class whose
``forward`` also takes the THD format (:func:`packed_attention`): the row is cut into blocks at
least as long as its longest sample, and each block's queries attend to the keys of their own and
the previous block under a same-sample causal mask. The cost is ``T x 2 x longest`` instead of
``T^2``, in a handful of large tensor operations.

Same attention as the stock class computes for a padded row (the same scale; masked keys get
weight exactly 0 in both), up to fp32 rounding. Without
``packed_seq_params`` the stock forward runs unchanged. What the packed path does not implement
(attention dropout in training, sliding windows, a softmax offset, an attention bias) raises.
With THD, Megatron's RoPE restarts the positions of every sample (``_apply_rotary_pos_emb_thd``),
as a padded row has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


@dataclass(frozen=True)
class PackedRows:
    """The block-diagonal causal mask of one packed row, given by its blocks instead of ``[T, T]``
    entries: sample i at rows ``cu_seqlens[i]:cu_seqlens[i + 1]`` (the end padding counted as
    samples too), none longer than ``max_seqlen``. Passed as the ``attention_mask`` of a
    micro-batch of one row; only :class:`PackedDotProductAttention` understands it."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    def to(self, device) -> "PackedRows":
        return PackedRows(self.cu_seqlens.to(device), self.max_seqlen)


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local ``DotProductAttention`` plus packed rows: the THD format
    (``packed_seq_params``) or a :class:`PackedRows` mask on the usual [s, 1, heads, dim] layout."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:  # THD: [t, heads, dim]
            self._check_packed(packed_seq_params.qkv_format, attention_bias, packed_seq_params)
            return packed_attention(query, key, value, packed_seq_params.cu_seqlens_q,
                                    packed_seq_params.max_seqlen_q, self._scale())
        if isinstance(attention_mask, PackedRows):  # [s, 1, heads, dim]
            self._check_packed("sbhd", attention_bias)
            if query.shape[1] != 1:
                raise ValueError(f"a PackedRows mask describes a micro-batch of one row, got {query.shape[1]} rows")
            out = packed_attention(query.squeeze(1), key.squeeze(1), value.squeeze(1), attention_mask.cu_seqlens,
                                   attention_mask.max_seqlen, self._scale())
            return out.unsqueeze(1)  # [s, 1, heads x dim], the stock layout
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias)

    def _scale(self) -> float:
        # The stock class scales the scores by softmax_scale in baddbmm, then by coeff (the layer
        # number under apply_query_key_layer_scaling, else none) in its softmax.
        coeff = self.scale_mask_softmax.scale
        return self.softmax_scale * (coeff if coeff is not None else 1.0)

    def _check_packed(self, qkv_format: str, attention_bias, params=None) -> None:
        unsupported = {
            "qkv_format other than 'thd'": qkv_format not in ("thd", "sbhd"),
            "an attention bias": attention_bias is not None,
            "a sliding window": self.scale_mask_softmax.window_size is not None,
            "a softmax offset (softmax_type != 'vanilla')": self.softmax_offset is not None,
            "attention dropout in training": self.training and self.attention_dropout.p > 0,
        }
        if params is not None:
            unsupported["different query and key sequences"] = params.cu_seqlens_kv is not None \
                and params.cu_seqlens_kv is not params.cu_seqlens_q \
                and not torch.equal(params.cu_seqlens_kv, params.cu_seqlens_q)
            unsupported["padded cu_seqlens"] = params.cu_seqlens_q_padded is not None
        bad = [what for what, on in unsupported.items() if on]
        if bad:
            raise NotImplementedError(f"packed sequences on the local spec's attention do not support {', '.join(bad)}"
                                      " (use padded micro-batches: run.max_tokens_per_micro_batch=0)")


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: Optional[int], scale: float) -> torch.Tensor:
    """Causal self-attention of the samples laid end to end in ``query`` [t, np, hn] and
    ``key``/``value`` [t, ng, hn] (ng divides np: grouped queries), sample i at rows
    ``cu_seqlens[i]:cu_seqlens[i + 1]`` (``cu_seqlens[-1] == t``). Returns [t, np * hn].

    Local windows: the row is cut into blocks of C >= the longest sample; a token's sample starts
    at most C - 1 tokens earlier, so the keys it may see lie in its own block or the one before.
    Each block of queries attends to those 2C keys under a mask (same sample, causal): a few
    large tensor operations whatever the number of samples, cost t x 2C (samples of a few tokens
    attended one by one would be thousands of tiny rows, which is what a CPU is slowest at)."""
    t, n_heads, dim = query.shape
    groups = key.shape[1]
    c, mask = _window_mask(cu_seqlens, t, max_seqlen, query.dtype, query.device)
    blocks = mask.shape[0]
    tail = blocks * c - t
    if n_heads != groups:  # the stock class repeats each key/value group for its queries
        key = key.repeat_interleave(n_heads // groups, dim=1)
        value = value.repeat_interleave(n_heads // groups, dim=1)
    q = F.pad(query, (0, 0, 0, 0, 0, tail)).view(blocks, c, n_heads, dim).permute(2, 0, 1, 3)  # [np, B, C, hn]

    def windows(x):  # [np, B, 2C, hn]: block b's keys are blocks b - 1 and b (one block of zeros in front)
        x = F.pad(x, (0, 0, 0, 0, c, tail)).view(blocks + 1, c, n_heads, dim).permute(2, 0, 1, 3)
        return torch.cat([x[:, :-1], x[:, 1:]], dim=2)

    scores = torch.matmul(q, windows(key).transpose(-1, -2)).mul_(scale).add_(mask)  # [np, B, C, 2C]
    out = torch.matmul(torch.softmax(scores, dim=-1), windows(value))  # [np, B, C, hn]
    return out.permute(1, 2, 0, 3).reshape(blocks * c, n_heads * dim)[:t]


_LAST_MASK: list = [None, None]  # (key, (block size, mask)): every layer of a forward shares one


def _window_mask(cu_seqlens: torch.Tensor, t: int, max_seqlen: Optional[int], dtype, device):
    """(C, additive mask [B, C, 2C]: 0 where query c of block b may see key j of its window, -inf
    elsewhere) for the packed row ``cu_seqlens`` (see :func:`packed_attention`)."""
    key = (cu_seqlens, t, max_seqlen, dtype, device)
    last_key, last = _LAST_MASK
    if last_key is not None and last_key[0] is cu_seqlens and last_key[1:] == key[1:]:
        return last
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != t:
        raise ValueError(f"cu_seqlens must run from 0 to the {t} packed tokens, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    c = max(1, int(max_seqlen) if max_seqlen is not None else int(lengths.max()))
    blocks = -(-t // c)
    # Sample of every position; the tail padding (up to a whole block) is one more "sample".
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    seg = torch.cat([seg, torch.full((blocks * c - t,), -1, dtype=seg.dtype, device=device)])
    qpos = torch.arange(blocks * c, device=device).view(blocks, c, 1)
    kpos = (torch.arange(blocks, device=device) * c - c).view(blocks, 1, 1) + torch.arange(2 * c, device=device)
    same = seg[kpos.clamp(min=0)] == seg[qpos]
    allowed = (kpos >= 0) & (kpos <= qpos) & same  # a token always sees itself: no empty row
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    _LAST_MASK[:] = [key, (c, mask)]
    return c, mask
