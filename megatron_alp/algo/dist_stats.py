"""Cross-rank reductions for metrics, with an explicit process group (``None`` = one process).

Quantiles are exact: the values of every rank are gathered (``all_gather`` of a padded buffer),
so the global p99.9 is the p99.9 of the union, never an average of per-rank quantiles. The cost
is one float64 per counted token per rank (8M tokens per step: 64 MB), acceptable at the batch
sizes of the reference recipes.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place ``sum`` / ``max`` all-reduce over ``group`` (a no-op for ``None`` or a group of one)."""
    if group_size(group) > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return t


def gather_values(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the 1-D tensors ``x`` of all ranks of ``group`` in rank order (lengths may differ)."""
    x = x.reshape(-1)
    n = group_size(group)
    if n == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([x.numel()], dtype=torch.int64, device=x.device), group=group)
    lengths: List[int] = [int(s.item()) for s in sizes]
    longest = max(lengths)
    if longest == 0:
        return x.new_empty(0)
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:k] for p, k in zip(parts, lengths, strict=True)])


def sorted_quantiles(sorted_values: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles of an ascending 1-D tensor with linear interpolation (``torch.quantile``'s default).

    Works for any length (``torch.quantile`` refuses inputs above 2**24 elements); an empty input
    gives NaN (undefined).
    """
    n = sorted_values.numel()
    q = torch.as_tensor(list(qs), dtype=torch.float64, device=sorted_values.device)
    if n == 0:
        return torch.full_like(q, float("nan"))
    v = sorted_values.to(torch.float64)
    pos = q * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = pos.ceil().long().clamp(0, n - 1)
    frac = pos - lo.to(torch.float64)
    a, b = v[lo], v[hi]
    # a + (b - a) * frac, written so that equal neighbours (also +-inf) return the neighbour itself.
    return torch.where(a == b, a, a + (b - a) * frac)


def subsample(values: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """At most ``k`` of ``values``, chosen deterministically (the same on every rank), in original order."""
    n = values.numel()
    if n <= k:
        return values
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:k].sort().values.to(values.device)
    return values[idx]
