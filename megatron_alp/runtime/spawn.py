"""Spawn a gloo world of N processes without torchrun and collect per-rank results.

Used by the distributed tests, the benchmarks and the demo. A worker's exception is re-raised in
the parent with the worker's traceback; a world that does not finish within ``timeout`` seconds is
killed and reported instead of hanging CI.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch.multiprocessing as mp

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker of a spawned world raised; the message carries its rank and traceback."""


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, queue, env):
    os.environ.clear()
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
    for attempt in range(1, _PORT_TRIES + 1):
        try:
            return _run_once(fn, world_size, args, timeout, env)
        except WorkerError as e:
            # MASTER_PORT was free when chosen, but another process (a parallel test, another
            # world) bound it before rank 0's store did: the world never started; start it again.
            if attempt == _PORT_TRIES or "address already in use" not in str(e).lower():
                raise
            logger.warning("world's MASTER_PORT was taken before rank 0 bound it (attempt %d of %d): "
                           "starting the world again on a new port", attempt, _PORT_TRIES)
    raise AssertionError("unreachable")


_PORT_TRIES = 3


def _run_once(fn, world_size, args, timeout, env):
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    # The caller's whole current environment (a forkserver child would otherwise see the server's).
    child_env = {**os.environ, **child_environment(env)}
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, tuple(args), queue, child_env), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {}
    errors: dict = {}
    failed_fast = True
    try:
        _collect(queue, procs, timeout, results, errors)
        failed_fast = bool(errors)
    finally:
        _stop(procs, hurry=failed_fast)
    if errors:
        rank = min(errors)
        raise WorkerError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(len(procs))]


# Imported once by the forkserver; every world's processes are forked from it with these loaded,
# instead of importing torch and Megatron-Core again (10-20 s per world on a loaded 2-core box).
# megatron_alp first: its import installs the jit_fuser hook that must see Megatron load (runtime.jit_fuser).
# torch._dynamo last: torch.optim imports it when the first optimizer is built (Optimizer.add_param_group
# is wrapped in torch._disable_dynamo), 0.6 s of CPU in every rank that builds one; once here instead.
PRELOAD = ("megatron_alp", "torch", "torch.distributed", "megatron.core.parallel_state", "megatron.core.models.gpt",
           "megatron.core.optimizer", "megatron.core.distributed", "megatron.core.pipeline_parallel",
           "megatron_alp.model.builder", "megatron_alp.runtime.distributed", "torch._dynamo")


def _context():
    """Where world processes come from: a forkserver with :data:`PRELOAD` imported (Linux without an
    NVIDIA GPU), or ``spawn`` (elsewhere, or with ``MEGATRON_ALP_START_METHOD=spawn``). Neither
    inherits the caller's threads or state: the forkserver never runs a torch op. With a GPU the
    imports may touch the CUDA driver (``torch.cuda.is_available()``), which a fork must not
    inherit, so GPU machines spawn."""
    default = "spawn" if os.path.exists("/dev/nvidiactl") else "forkserver"
    method = os.environ.get("MEGATRON_ALP_START_METHOD", default)
    if method not in mp.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _collect(queue, procs, timeout: float, results: dict, errors: dict) -> None:
    """Fill ``results`` / ``errors`` (rank -> value / traceback) until every rank reported, one
    failed (the others are usually blocked in a collective), one died silently, or time is up."""
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"spawned world of {world_size} did not finish within {timeout:.0f} s; "
                f"finished ranks: {sorted(results)}, failed ranks: {sorted(errors)}"
                + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            )
        try:
            rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
        except queue_mod.Empty:
            _check_silent_deaths(queue, procs, results, errors)
            continue
        if not ok:
            errors[rank] = payload
            return
        results[rank] = pickle.loads(payload)


def _check_silent_deaths(queue, procs, results: dict, errors: dict) -> None:
    """A process that died without reporting (segfault, OOM kill) ends the world."""
    dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in results and i not in errors]
    if dead and all(procs[i].exitcode not in (0, None) for i in dead):
        time.sleep(0.5)  # grace for a report still in the queue's pipe
        if queue.empty():
            raise WorkerError(f"rank(s) {dead} died without a result (exit codes {[procs[i].exitcode for i in dead]})")


def _stop(procs, hurry: bool) -> None:
    for p in procs:
        p.join(timeout=0.5 if hurry else 5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
