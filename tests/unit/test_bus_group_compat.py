"""The weight-update group forms with a peer that builds its side the way SGLang 0.5.23's
init_custom_process_group (sglang/srt/utils/common.py) and slime build it: torch's tcp:// rendezvous
(a TCPStore whose master waits for every worker to register), PrefixStore(group_name), then torch's
process-group helper. Before the fix our non-master ranks did not register and such a rank 0 timed out.
Both directions: that peer as rank 0 (slime's trainer) and as rank 1 (an SGLang engine)."""

import datetime
import queue
import socket
import threading

import pytest
import torch
import torch.distributed as dist

from rollout.bus.distributed import join_update_group

TIMEOUT_S = 60


def sglang_style(port, rank, name):
    """init_custom_process_group's steps (read in the 0.5.23 wheel), with gloo."""
    from torch.distributed.distributed_c10d import _new_process_group_helper, rendezvous

    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store, rank, world = next(rendezvous(f"tcp://127.0.0.1:{port}", rank, 2, timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(name, store)
    pg, _ = _new_process_group_helper(world, rank, [], "gloo", store, group_name=name, backend_options=None,
                                      timeout=timeout)
    return lambda t: pg.broadcast([t]).wait()


def ours(port, rank, name):
    group = join_update_group("127.0.0.1", port, rank, 2, name, "gloo", TIMEOUT_S)
    return group.broadcast


def member(kind, rank, port, name, q):
    try:
        broadcast = (sglang_style if kind == "sglang" else ours)(port, rank, name)
        t = torch.arange(6.0) if rank == 0 else torch.zeros(6)
        broadcast(t)
        q.put((rank, t.tolist()))
    except Exception as e:  # reported to the test, which fails with it
        q.put((rank, f"{type(e).__name__}: {e}"))


@pytest.mark.parametrize("rank0,rank1", [("sglang", "ours"), ("ours", "sglang")])
def test_group_forms_with_an_sglang_style_peer(rank0, rank1):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    q = queue.Queue()  # two ranks as two threads of this process (gloo allows it)
    threads = [threading.Thread(target=member, args=(kind, rank, port, f"wg-{rank0}-{rank1}", q), daemon=True)
               for rank, kind in enumerate((rank0, rank1))]
    for t in threads:
        t.start()
    results = dict(q.get(timeout=2 * TIMEOUT_S) for _ in threads)
    for t in threads:
        t.join(30)
    assert results == {0: [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1: [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}
