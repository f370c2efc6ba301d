"""Sequence packing: token-budget micro-batches instead of padded ones (``run.max_tokens_per_micro_batch``).

A micro-batch is one row of samples laid end to end (no padding between them), at most
``budget`` tokens (a sample longer than the budget travels alone). The model sees:

- on a GPU with Transformer Engine, the THD format: ``PackedSeqParams`` with the samples'
  cumulative lengths (cu_seqlens), as Megatron-Core 0.16.1 takes it in ``GPTModel.forward`` (see
  :func:`packed_seq_params`; RoPE restarts at every sample);
- on the local spec, a block-diagonal causal mask given by its blocks
  (:class:`~megatron_alp.model.attention.PackedRows`, :func:`packed_rows`), which the local
  spec's :class:`~megatron_alp.model.attention.PackedDotProductAttention` attends in local windows
  (cost linear in the row's length). That class takes the THD format too (tested here against
  the padded rows, so the GPU path's Megatron side runs on a CPU); the mask is the CPU default
  because Megatron's THD RoPE loops over the samples in Python, ~14% of a small model's update;
- a model with Megatron's stock local ``DotProductAttention``: the dense mask ``[1, 1, T, T]``
  (True = masked, Megatron's convention).

Position ids restart at 0 for every sample. Outside THD, RoPE rotates by the position in the row
(Megatron's rotary embedding ignores position ids); attention scores depend only on the distance
between two tokens of one sample, so this is the padded row's attention up to fp32 rounding.

Only the model forward and the vocabulary-sized log-prob op run on the packed row. Their per-token
outputs (log-prob, entropy: one scalar per token) are scattered back to the samples' rows
(:meth:`PackedMicroBatch.unpack`), so the objectives and metrics are the padded path's code on the
same samples, their padding masked as today.

Every pack of one schedule call is padded at its end to one length (rounded up to the TP size
under sequence parallelism): Megatron's pipeline schedule sends fixed-shape activations between
stages. The padding is a block of its own (it attends only to itself) and carries mask 0.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def sample_lengths(batch) -> List[int]:
    """Tokens of each row that matter: up to its last counted token (padding and anything after
    the last loss token neither count nor are context for a counted token)."""
    mask = batch.loss_mask > 0
    idx = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask, idx, torch.full_like(idx, -1)).max(dim=1).values
    return [max(int(x) + 1, 1) for x in last]


def plan_packs(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """First-fit decreasing: lists of row indices whose lengths sum to <= ``budget`` (a row longer
    than the budget gets a pack of its own). Deterministic; packs keep their rows in index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: List[List[int]] = []
    used: List[int] = []
    for i in order:
        for p, u in enumerate(used):
            if u + lengths[i] <= budget:
                packs[p].append(i)
                used[p] += lengths[i]
                break
        else:
            if lengths[i] > budget:
                logger.warning("a %d-token sample exceeds run.max_tokens_per_micro_batch = %d: it is packed alone",
                               lengths[i], budget)
            packs.append([i])
            used.append(lengths[i])
    return [sorted(p) for p in packs]


def balance_over_dp(lengths: Sequence[int], dp_size: int) -> List[List[int]]:
    """Row indices per DP rank, token counts balanced (longest first to the least loaded rank, ties
    to the rank with fewer rows); every rank gets at least one row when there are >= dp_size rows.
    GRPO groups may split: advantages are computed before, and the loss normalisers are global."""
    if len(lengths) < dp_size:
        raise ValueError(f"{len(lengths)} sequences cannot feed {dp_size} data-parallel ranks")
    load = [0] * dp_size
    rows: List[List[int]] = [[] for _ in range(dp_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(dp_size), key=lambda r: (load[r], len(rows[r]), r))
        rows[r].append(i)
        load[r] += lengths[i]
    return [sorted(r) for r in rows]


@dataclass
class PackedMicroBatch:
    """One packed row: the model inputs plus the padded rows of the same samples (for the loss)."""

    rows: object  # RLBatch [n, L]: the samples, as the padded path would hold them
    index: List[int]  # their rows in the batch the pack was made from
    tokens: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T] restarting at 0 per sample
    starts: List[int]  # where each sample begins in the row
    lengths: List[int]
    dummy: bool = False  # filler to reach the micro-batch count agreed across DP (loss mask 0)
    _occupied: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return 1

    @property
    def total(self) -> int:
        return self.tokens.shape[1]

    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative sample lengths [n + 1 + pieces] int32. The end padding counts as more
        sequences, each no longer than the longest sample (attention on a packed row costs the
        square of its longest sequence: model/attention.py)."""
        edges = [0]
        for n in self.lengths:
            edges.append(edges[-1] + n)
        piece = max(self.lengths)
        while edges[-1] < self.total:
            edges.append(min(self.total, edges[-1] + piece))
        return torch.tensor(edges, dtype=torch.int32)

    def attention_mask(self) -> torch.Tensor:
        """Block-diagonal causal mask [1, 1, T, T], True = masked (Megatron's convention)."""
        seg = torch.zeros(self.total, dtype=torch.long)
        for k, (s, n) in enumerate(zip(self.starts, self.lengths, strict=True)):
            seg[s:s + n] = k + 1
        seg[sum(self.lengths):] = len(self.lengths) + 1  # the end padding: a block of its own
        same = seg[:, None] == seg[None, :]
        causal = torch.ones(self.total, self.total, dtype=torch.bool).tril()
        return ~(same & causal)[None, None]

    def occupied(self) -> torch.Tensor:
        """[n, L] bool: token j of sample k is in the pack (j < its length). Row-major, its True
        entries are the pack's first ``sum(lengths)`` tokens in order."""
        if self._occupied is None:
            L = self.rows.tokens.shape[1]
            self._occupied = torch.arange(L)[None] < torch.tensor(self.lengths)[:, None]
        return self._occupied

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Per-token values [1, T] (or [T]) -> the samples' rows [n, L] (0 outside each sample)."""
        flat = packed.reshape(-1)
        occupied = self.occupied().to(flat.device)
        out = flat.new_zeros(occupied.shape).masked_scatter(occupied, flat[:sum(self.lengths)])
        out[:, 0] = 0  # position 0 of a sample is predicted from the previous sample: never counted
        return out


def pack_rows(rows, lengths: Sequence[int], total: int, pad_id: int = 0, dummy: bool = False,
              index: Sequence[int] = ()) -> PackedMicroBatch:
    """Lay ``rows`` (an RLBatch) end to end in one row of ``total`` tokens."""
    used = sum(lengths)
    if used > total:
        raise ValueError(f"{used} tokens do not fit a packed row of {total}")
    L = rows.tokens.shape[1]
    occupied = torch.arange(L)[None] < torch.tensor(list(lengths))[:, None]
    tokens = torch.full((1, total), pad_id, dtype=torch.long)
    tokens[0, :used] = rows.tokens.cpu()[occupied]
    positions = torch.arange(total)
    positions[:used] = torch.arange(L).expand(len(lengths), L)[occupied]
    positions[used:] -= used  # the end padding counts from 0 too
    starts = [0, *itertools.accumulate(lengths)][:-1]
    pack = PackedMicroBatch(rows=rows, index=list(index), tokens=tokens, positions=positions[None], starts=starts,
                            lengths=list(lengths), dummy=dummy)
    pack._occupied = occupied
    return pack


def make_packs(batch, budget: int, count: int, pad_multiple: int = 1) -> List[PackedMicroBatch]:
    """This rank's share of a mini-batch as ``count`` packed micro-batches (``count`` >= the packs
    the budget needs; the rest are dummies: one sample with loss mask 0, so every DP rank runs
    the agreed number). All share one row length (fixed pipeline shapes)."""
    lengths = sample_lengths(batch)
    plan = plan_packs(lengths, budget)
    if count < len(plan):
        raise ValueError(f"{len(plan)} packs needed but {count} agreed")
    total = max(sum(lengths[i] for i in p) for p in plan)
    total = ((total + pad_multiple - 1) // pad_multiple) * pad_multiple
    packs = []
    for p in plan:
        rows = batch.select(torch.tensor(p))
        packs.append(pack_rows(rows, [lengths[i] for i in p], total, index=p))
    while len(packs) < count:
        filler = batch.select(torch.tensor([0]))
        filler.loss_mask = torch.zeros_like(filler.loss_mask)
        packs.append(pack_rows(filler, [1], total, dummy=True, index=[0]))
    return packs


def packs_needed(batch, budget: int) -> int:
    return len(plan_packs(sample_lengths(batch), budget))


def packed_seq_params(pack: PackedMicroBatch, device=None):
    """Megatron-Core 0.16.1's ``PackedSeqParams`` for a THD forward (Transformer Engine's attention
    on a GPU, model/attention.py's on the local spec).

    Written against megatron/core/packed_seq_params.py (qkv_format, cu_seqlens_q/kv,
    max_seqlen_q/kv). Without CUDA it runs through the local spec (tests/distributed); with
    Transformer Engine only on a GPU (tests/gpu).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = pack.cu_seqlens().to(device)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


def packed_rows(pack: PackedMicroBatch, device=None):
    """The pack's block-diagonal causal mask by its blocks (:class:`~megatron_alp.model.attention.
    PackedRows`) for the local spec's attention."""
    from ..model.attention import PackedRows

    cu = pack.cu_seqlens()
    return PackedRows(cu.to(device), int((cu[1:] - cu[:-1]).max()))
