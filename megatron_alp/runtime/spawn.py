"""Spawn a gloo world of N processes without torchrun and collect per-rank results.

Used by the distributed tests, the benchmarks and the demo. A worker's exception is re-raised in
the parent with the worker's traceback; a world that does not finish within ``timeout`` seconds is
killed and reported instead of hanging CI.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A worker of a spawned world raised; the message carries its rank and traceback."""


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, queue, env):
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    try:
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        result = fn(rank, world_size, *args)
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def child_environment(env: Optional[dict] = None) -> dict:
    """What a worker adds to its inherited environment. ``CUDA_VISIBLE_DEVICES`` is passed on only
    when it is set: an empty value would hide every GPU and run a GPU machine's workers on CPU."""
    out = {"OMP_NUM_THREADS": "1"}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        out["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    out.update(env or {})
    return out


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 300.0,
    env: Optional[dict] = None,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be importable (a module-level function). The environment gets MASTER_ADDR/PORT,
    RANK and WORLD_SIZE as torchrun would set them; ``fn`` initialises torch.distributed itself
    (usually through :func:`megatron_alp.runtime.distributed.init_distributed`). Returns the list of
    per-rank return values, ordered by rank.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    child_env = child_environment(env)
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, tuple(args), queue, child_env), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {}
    errors: dict = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                raise TimeoutError(
                    f"spawned world of {world_size} did not finish within {timeout:.0f} s; "
                    f"finished ranks: {sorted(results)}, failed ranks: {sorted(errors)}"
                    + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                )
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in results and i not in errors]
                # A process that died without reporting (segfault, OOM kill) ends the world.
                if dead and all(p.exitcode not in (0, None) for i, p in enumerate(procs) if i in dead):
                    time.sleep(0.5)
                    if queue.empty():
                        raise WorkerError(
                            f"rank(s) {dead} died without a result (exit codes "
                            f"{[procs[i].exitcode for i in dead]})"
                        )
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                # One failed rank usually leaves the others blocked in a collective: stop now.
                break
    finally:
        for p in procs:
            p.join(timeout=0.5 if (errors or timed_out) else 5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        rank = min(errors)
        raise WorkerError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
