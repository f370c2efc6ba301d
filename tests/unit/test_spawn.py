"""The spawned-world harness: results by rank, readable worker tracebacks, timeouts."""

from __future__ import annotations

import time

import pytest

from megatron_alp.runtime.spawn import WorkerError, run_world


def _sum_ranks(rank, world_size):
    import os
    import sys

    import torch
    import torch.distributed as dist

    from megatron_alp.runtime.distributed import init_distributed

    init_distributed()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    # The forkserver preloads Megatron: without CUDA it must not have pulled torch.compile's stack in
    # (runtime/jit_fuser.py: Megatron's torch.compile decorations imported torch._inductor's compiler).
    kept = torch.cuda.is_available() or os.environ.get("MEGATRON_ALP_JIT_FUSER") == "1"  # Megatron's choice kept
    assert kept or "torch._inductor.compile_fx" not in sys.modules
    return rank, world_size, t.item()


def _fail_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank


def _env_probe(rank, world_size):
    import os

    return os.environ.get("ALP_SPAWN_PROBE"), os.environ.get("OMP_NUM_THREADS"), os.environ.get("RANK")


def _hang(rank, world_size):
    time.sleep(60)


def test_results_ordered_by_rank_and_collectives_work():
    out = run_world(_sum_ranks, 2, timeout=120)
    assert out == [(0, 2, 3.0), (1, 2, 3.0)]


def test_worker_traceback_reraised():
    with pytest.raises(WorkerError, match=r"(?s)rank 1 of 2 failed.*ValueError: boom from rank one"):
        run_world(_fail_on_rank1, 2, timeout=120)


def test_timeout_instead_of_hang():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        run_world(_hang, 2, timeout=3)
    assert time.monotonic() - t0 < 30


def test_workers_see_the_callers_current_environment(monkeypatch):
    # Worlds fork from a long-lived forkserver: the caller's environment must still reach them.
    run_world(_env_probe, 1, timeout=120)  # the server is up (maybe from an earlier test)
    monkeypatch.setenv("ALP_SPAWN_PROBE", "after-the-server-started")
    out = run_world(_env_probe, 2, timeout=120, env={"OMP_NUM_THREADS": "2"})
    assert out == [("after-the-server-started", "2", "0"), ("after-the-server-started", "2", "1")]


def test_a_taken_master_port_starts_the_world_again(monkeypatch):
    """MASTER_PORT is free when chosen; when another process binds it first, rank 0's store fails
    with EADDRINUSE and the world starts again on a new port instead of failing the caller."""
    import socket

    from megatron_alp.runtime import spawn

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    first, chosen = iter([taken_port]), []
    real_free_port = spawn.free_port

    def free_port():
        chosen.append(next(first, None) or real_free_port())
        return chosen[-1]

    monkeypatch.setattr(spawn, "free_port", free_port)
    try:
        assert run_world(_sum_ranks, 2, timeout=120) == [(0, 2, 3.0), (1, 2, 3.0)]
    finally:
        taken.close()
    assert len(chosen) == 2 and chosen[0] == taken_port != chosen[1]


SINGLE_RANK = """
import socket, torch, torch.distributed as dist
import megatron_alp.runtime.spawn as spawn
from megatron_alp.runtime.distributed import init_distributed
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
spawn.free_port = lambda host="127.0.0.1": taken.getsockname()[1]  # another process got there first
init_distributed()
t = torch.ones(2)
dist.all_reduce(t)
print(dist.get_world_size(), int(t.sum()), flush=True)
"""


def test_single_process_group_binds_its_own_free_port():
    # Without WORLD_SIZE, init_distributed makes a one-rank group. A port chosen ahead (free_port) can
    # be taken before the store binds it; the store binds port 0 instead, so a taken port is no matter.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", SINGLE_RANK], capture_output=True, text=True, timeout=120,
                         env=dict(env, PYTHONPATH=os.getcwd()))
    assert out.returncode == 0 and out.stdout.split() == ["1", "2"], out.stdout + out.stderr[-3000:]
