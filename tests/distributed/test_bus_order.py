"""The streaming bus's global bucket order across pipeline stages (megatron_alp/sync/order.py): two
exporting ranks (two stages) send in rounds, one transfer at a time everywhere, in the same
sequence for every engine, and each rank gathers its next bucket while its current one is on the
wire. Without the order, two stages' transfers overlap and two engines can take them in opposite
orders (a circular wait until the group timeout)."""

from __future__ import annotations

import os

from megatron_alp.runtime.spawn import run_world

BUCKETS = {0: 3, 1: 2}  # stage 0 has three buckets, stage 1 two


def _log(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _stage(rank, world, path):
    from megatron_alp.runtime.distributed import init_distributed
    from megatron_alp.sync.order import exporter_ranks, order_group, send_in_order

    init_distributed()
    group = order_group(exporter_ranks(True))

    def gathered():
        for b in range(BUCKETS[rank]):
            _log(path, f"gather {rank}.{b}")
            yield f"{rank}.{b}"

    def start(bucket):
        _log(path, f"start {bucket}")
        return bucket

    def finish(bucket):
        _log(path, f"finish {bucket}")

    return send_in_order(gathered(), start, finish, group)


def test_stages_take_turns_and_overlap_the_next_gather(tmp_path):
    path = str(tmp_path / "events")
    assert run_world(_stage, 2, args=(path,), timeout=240) == [3, 2]
    events = open(path).read().split("\n")[:-1]
    transfers = [e for e in events if not e.startswith("gather")]
    # One transfer at a time, in rounds: every engine sees this one sequence.
    assert transfers == ["start 0.0", "finish 0.0", "start 1.0", "finish 1.0", "start 0.1", "finish 0.1",
                         "start 1.1", "finish 1.1", "start 0.2", "finish 0.2"]
    for rank, n in BUCKETS.items():
        mine = [e for e in events if e.split()[1].startswith(f"{rank}.")]
        for b in range(n - 1):  # bucket b+1 is gathered while bucket b is on the wire
            assert (mine.index(f"start {rank}.{b}") < mine.index(f"gather {rank}.{b + 1}")
                    < mine.index(f"finish {rank}.{b}"))
