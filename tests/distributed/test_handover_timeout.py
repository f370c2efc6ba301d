"""The rollout batch is handed over on a gloo group with its own timeout: the other ranks outlast a
rollout longer than the trainer's process-group timeout (parallel.pg_timeout_minutes), which a wait
on the default group does not (the control case shows the short timeout is real)."""

from __future__ import annotations

import time

from megatron_alp.runtime.spawn import run_world

PG_MINUTES = 0.02  # 1.2 s: the trainer's collectives
ROLLOUT_S = 4.0  # rank 0's "rollout", well past PG_MINUTES


def _handover(rank, world):
    import torch.distributed as dist

    from megatron_alp.runtime.distributed import handover_group, init_distributed

    init_distributed(PG_MINUTES)
    group = handover_group(timeout_minutes=1.0)
    box = [None]
    if rank == 0:
        time.sleep(ROLLOUT_S)  # the work under test (a rollout longer than the pg timeout), not a wait
        box = [{"batch": list(range(5))}]
    dist.broadcast_object_list(box, src=0, group=group)
    got = box[0]
    # Control: the same wait on the default group (pg timeout) fails on the waiting rank. Rank 0
    # never joins that broadcast: it waits for rank 1's verdict on the handover group instead.
    verdict = ["not run"]
    if rank == 1:
        try:
            dist.broadcast_object_list([None], src=0)
            verdict = ["completed"]
        except RuntimeError as e:
            verdict = ["timed out" if "imeout" in str(e) or "imed out" in str(e) else f"error: {e}"]
    dist.broadcast_object_list(verdict, src=1, group=group)
    return got, verdict[0]


def test_rollout_longer_than_pg_timeout_is_handed_over():
    res = run_world(_handover, 2, timeout=120)
    assert res[0][0] == res[1][0] == {"batch": [0, 1, 2, 3, 4]}
    assert res[0][1] == res[1][1] == "timed out", res  # the verdict reached rank 0 over the handover group
