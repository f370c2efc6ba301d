"""Rollout samples -> padded trainer tensors, and their split over data-parallel ranks.

Each rollout batch is right-padded to its longest sample (rounded up to a multiple of
``pad_multiple``, the TP size under sequence parallelism); pad positions carry mask 0. With
``run.max_tokens_per_micro_batch`` the actor packs these rows into token-budget micro-batches
(trainer/packing.py) and :func:`dp_balanced_shard` balances tokens over DP ranks.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .batch import RLBatch


def collate(samples: Sequence, advantages: torch.Tensor, pad_id: int = 0, pad_multiple: int = 1) -> RLBatch:
    """``samples``: objects with ``prompt_ids``, ``response_ids``, ``rollout_logprobs``, ``loss_mask``
    (rollout.sample.Sample). Token ``t`` of the result is predicted from positions ``< t``; the
    per-token arrays are aligned with the tokens (response token j sits at ``len(prompt) + j``)."""
    if len(samples) != advantages.shape[0]:
        raise ValueError(f"{len(samples)} samples but {advantages.shape[0]} advantages")
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    L = max(lengths) if lengths else 1
    L = ((L + pad_multiple - 1) // pad_multiple) * pad_multiple
    n = len(samples)
    tokens = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.float32)
    rollout_logp = torch.zeros(n, L, dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if not (len(s.rollout_logprobs) == len(s.loss_mask) == r):
            raise ValueError(f"sample {i}: {r} response tokens, {len(s.rollout_logprobs)} log-probs, "
                             f"{len(s.loss_mask)} mask entries")
        if p == 0:
            raise ValueError(f"sample {i} has an empty prompt: its first response token has no context")
        tokens[i, :p + r] = torch.tensor(list(s.prompt_ids) + list(s.response_ids), dtype=torch.long)
        mask[i, p:p + r] = torch.tensor(s.loss_mask, dtype=torch.float32)
        rollout_logp[i, p:p + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    # Masked tokens (tool observations) carry a placeholder log-prob: make sure it cannot leak.
    rollout_logp = torch.where(mask > 0, rollout_logp, torch.zeros_like(rollout_logp))
    return RLBatch(tokens=tokens, loss_mask=mask, rollout_logp=rollout_logp,
                   advantages=advantages.to(torch.float32), sample_ids=torch.arange(n))


FP8_ALIGN = 16
"""TE's FP8 GEMMs need the token dimension divisible by 8 and the hidden one by 16; Megatron aligns
FP8 operands to 16 (fp8_utils.get_fp8_align_size; 32 only for MXFP8, not offered here)."""


def seq_pad_multiple(parallel, precision) -> int:
    """The multiple every padded sequence length is rounded up to: TP under sequence parallelism
    (the sequence is split over TP ranks), times 16 under FP8 so each rank's token count stays
    a multiple of the FP8 alignment whatever the micro-batch size."""
    m = parallel.tp if parallel.sequence_parallel else 1
    if precision.train == "fp8":
        m *= FP8_ALIGN
    return m


def dp_shard(batch: RLBatch, dp_rank: int, dp_size: int) -> RLBatch:
    """This DP rank's contiguous share (the batch size must divide evenly)."""
    n = len(batch)
    if n % dp_size:
        raise ValueError(f"a batch of {n} sequences does not split over {dp_size} data-parallel ranks")
    k = n // dp_size
    return batch.select(slice(dp_rank * k, (dp_rank + 1) * k))


def mini_batches(batch: RLBatch, count: int) -> List[RLBatch]:
    """Split a (DP-local) batch into ``count`` equal mini-batches, one optimizer step each."""
    n = len(batch)
    if count < 1 or n % count:
        raise ValueError(f"{n} sequences do not split into {count} mini-batches")
    k = n // count
    return [batch.select(slice(i * k, (i + 1) * k)) for i in range(count)]


def dp_balanced_shard(batch: RLBatch, dp_rank: int, dp_size: int, count: int) -> Tuple[RLBatch, List[int]]:
    """Sequence packing's split: mini-batch k holds the same samples as :func:`dp_shard` +
    :func:`mini_batches` give it (so the global loss normalisers do not change), but its rows go
    to the DP ranks by token count (trainer/packing.py ``balance_over_dp``), GRPO groups free to
    split. Returns this rank's rows (mini-batch by mini-batch) and each mini-batch's row count."""
    from .packing import balance_over_dp, sample_lengths

    n = len(batch)
    if n % (dp_size * count):
        raise ValueError(f"a batch of {n} sequences does not split over {dp_size} data-parallel ranks x "
                         f"{count} mini-batches")
    per_rank, per_mini = n // dp_size, n // dp_size // count
    lengths = sample_lengths(batch)
    mine: List[int] = []
    sizes: List[int] = []
    for k in range(count):
        rows = [r * per_rank + k * per_mini + j for r in range(dp_size) for j in range(per_mini)]
        chosen = [rows[i] for i in balance_over_dp([lengths[i] for i in rows], dp_size)[dp_rank]]
        mine += chosen
        sizes.append(len(chosen))
    return batch.select(torch.tensor(mine)), sizes


def split_rows(batch: RLBatch, sizes: Sequence[int]) -> List[RLBatch]:
    """Consecutive mini-batches of the given row counts."""
    out, start = [], 0
    for size in sizes:
        out.append(batch.select(slice(start, start + size)))
        start += size
    return out
