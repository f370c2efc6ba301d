"""One global order for the buckets of every pipeline stage (nccl/gloo streaming bus).

Each stage's exporting rank sends its own buckets over its own weight-update group, and an engine
takes one transfer at a time, in the order the requests reach it. Two stages sending at once can
reach two engines in opposite orders: engine A waits in stage 0's broadcast for engine B, which
waits in stage 1's broadcast for engine A, until the group timeout (slime serialises its
``update_weights_from_distributed`` calls behind a global lock for this reason; the idea is
credited, the code is ours). Here the exporting ranks go in rounds on a gloo group of their own:
round r is the r-th bucket of the first exporting rank, then of the second, ..., each one started only after
the previous one finished everywhere (a barrier), so every engine sees the same sequence and no circle can form.

Within a stage the next bucket is gathered (TP all-gathers, FP8 quantization, host copies) while
the current one is on the wire: :meth:`DistributedSender.start_bucket`, then the next ``next()`` of
the export iterator, then :meth:`~DistributedSender.finish_bucket`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional

import torch
import torch.distributed as dist


def exporter_ranks(writes: bool) -> List[int]:
    """Collective on every rank: the global ranks that write (one per pipeline stage)."""
    mine: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(mine, (writes, dist.get_rank()))
    return sorted(r for w, r in mine if w)


def send_in_order(it: Iterator[Any], start: Callable[[Any], Any], finish: Callable[[Any], None],
                  group=None) -> int:
    """Send every bucket of ``it``: in global rounds over the members of ``group`` (the exporting
    ranks' gloo group, in group-rank order; None: this stage alone), each bucket's successor gathered
    during its transfer. Returns the number of buckets this rank sent."""
    sent = 0
    cur = next(it, None)
    if group is None:
        while cur is not None:
            pending = start(cur)
            cur = next(it, None)  # overlaps the transfer
            finish(pending)
            sent += 1
        return sent
    me, members = dist.get_rank(group), dist.get_world_size(group)
    while True:
        flags = [torch.zeros(1, dtype=torch.int64) for _ in range(members)]
        dist.all_gather(flags, torch.tensor([int(cur is not None)]), group=group)
        if not any(int(f) for f in flags):
            return sent
        for s in range(members):
            if not int(flags[s]):
                continue
            if s == me:
                pending = start(cur)
                cur = next(it, None)  # overlaps the transfer
                finish(pending)
                sent += 1
            dist.barrier(group=group)  # stage s's bucket is done on every engine before the next starts


def order_group(exporters: List[int]) -> Optional[Any]:
    """Collective on every rank: the gloo group of the exporting ranks (None with one stage)."""
    if len(exporters) < 2:
        return None
    return dist.new_group(ranks=exporters, backend="gloo")
