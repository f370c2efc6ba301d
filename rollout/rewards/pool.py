"""Reward scoring in worker processes with a hard timeout, off the rollout event loop.

math-verify parses model output with SymPy; a pathological answer (``\\boxed{10^{10^{10^{10}}}}``)
can keep it busy for minutes while holding the GIL, and its own SIGALRM timeouts only work on a
main thread. So rewards run in ``workers`` spawned processes (the reward function is loaded there
by name), each call waits in a thread of the pool's own executor (the event loop never blocks),
and a call that runs past ``timeout_s`` has its process killed and replaced: the sample scores 0
and its status is ``timeout``. The reference does the same with Ray tasks and a 120 s limit
(amazon-science/adaptive-layerwise-perturbation, multi-turn/recipe/simpletir/workers/
reward_manager/math_verify.py: ``timeout_seconds = 120``, score 0 on timeout).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Tuple

logger = logging.getLogger(__name__)


def _serve(conn, name: str) -> None:
    """Worker process: load the reward function ``name``, answer (args) -> ("ok", value) | ("error", msg)."""
    from . import load_reward_fn

    fn = load_reward_fn(name)
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", float(fn(*args))))
        except Exception as e:  # noqa: BLE001 - reported to the caller, scored 0
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, name: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name), daemon=True, name="alp-reward")
        self.proc.start()
        child.close()

    def call(self, args: Tuple[Any, ...], timeout_s: float) -> Tuple[str, Any]:
        self.conn.send(args)
        if self.conn.poll(timeout_s):
            return self.conn.recv()
        return "timeout", None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class RewardPool:
    """``await pool.score(prompt, response, label, metadata)`` -> (reward, 'ok') | (0.0, 'timeout') |
    (error message, 'error')."""

    def __init__(self, name: str, workers: int, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self._ctx = mp.get_context("spawn")  # the driver runs threads (and CUDA): never fork it
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alp-reward")
        self._workers = workers
        self._started = 0
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = {"ok": 0, "error": 0, "timeout": 0}

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and self._started < self._workers:
                self._started += 1
                return _Worker(self._ctx, self.name)
        return self._idle.get()

    def _score_blocking(self, args: Tuple[Any, ...]) -> Tuple[float, str]:
        w = self._take()
        try:
            status, value = w.call(args, self.timeout_s)
        except (OSError, EOFError) as e:  # the worker died (e.g. killed by the OOM killer)
            status, value = "error", f"reward worker died: {e}"
        if status == "timeout" or not w.proc.is_alive():
            w.kill()
            w = _Worker(self._ctx, self.name)
        self._idle.put(w)
        with self._lock:
            self.counts[status] += 1
        if status == "timeout":
            logger.warning("reward %s ran past %g s: scored 0 (worker replaced)", self.name, self.timeout_s)
            return 0.0, status
        if status == "error":
            return value, status  # the message: the caller applies rollout.reward_on_error
        return float(value), status

    async def score(self, prompt: str, response: str, label: Any, metadata: Dict[str, Any]) -> Tuple[float, str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._score_blocking, (prompt, response, label, metadata))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        while not self._idle.empty():
            self._idle.get_nowait().kill()
