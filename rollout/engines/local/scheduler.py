"""Continuous batching for the local engine: one worker thread owns the model.

Requests arrive from the HTTP handlers (any thread) into a queue. The worker loop, per step:
admit queued requests up to ``max_batch_size`` (prefill them together and join them to the
running batch), run one decode step for the running batch, hand finished requests back (their
``done`` callback), drop them from the batch. When idle it waits ``batch_wait_s`` after the
first arrival so that concurrent requests share their prefill.

Control (SGLang semantics, 0.5.23):
- ``pause("abort")`` aborts running and queued requests (finish reason ``abort``) and holds new
  ones; ``pause("in_place" | "retract")`` keeps the running batch and stops stepping it.
  ``resume()`` continues. ``pause`` returns once the worker is quiet.
- ``exclusive()`` runs a function (a weight update) with no step in progress: when not paused it
  first stops admitting and lets the running batch finish, as SGLang's weight update waits for
  in-flight requests.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Deque, Dict, Optional

from .runner import Batch, LocalModel, Request

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, model: LocalModel, *, max_batch_size: int = 32, batch_wait_s: float = 0.005):
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._cv = threading.Condition()
        self._queue: Deque[Request] = collections.deque()
        self._done: Dict[str, Callable[[Request], None]] = {}
        self._batch: Optional[Batch] = None
        self._paused = False
        self._draining = False
        self._exclusive = False
        self._busy = False  # a step is in progress
        self._steps_done = 0  # steps finished (a flush waits for at most the one in progress)
        self._new: list = []  # requests being prefilled by the step in progress
        self._abort_all = False
        self._abort_rids: set = set()
        self._stop = False
        self.stats = {"steps": 0, "prefills": 0, "max_batch_seen": 0, "generated_tokens": 0, "finished": 0}
        self._thread = threading.Thread(target=self._loop, name="local-engine-scheduler", daemon=True)
        self._thread.start()

    # -- API (thread-safe) -----------------------------------------------------------------
    def submit(self, req: Request, done: Callable[[Request], None]) -> None:
        with self._cv:
            self._done[req.rid] = done
            self._queue.append(req)
            self._cv.notify_all()

    def abort(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        with self._cv:
            if abort_all:
                self._abort_all = True
            elif rid is not None:
                self._abort_rids.add(rid)
            self._cv.notify_all()

    def pause(self, mode: str = "abort") -> None:
        with self._cv:
            if mode == "abort":
                self._abort_all = True
            self._paused = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._busy and (mode != "abort" or not self._abort_all))
            if mode == "retract" and self._batch is not None:
                # SGLang retracts running requests to the waiting queue, freeing their KV; they are
                # recomputed (prompt + tokens so far) when generation continues.
                self._queue.extendleft(reversed(self._batch.reqs))
                self._batch = None

    def can_flush(self, ignore_waiting: bool = False) -> bool:
        """SGLang's ``is_fully_idle(ignore_waiting=paused)``: no running batch, and no queued request
        unless paused. A weight update passes ``ignore_waiting``: in SGLang the requests it makes
        wait are held before the scheduler (the tokenizer manager's model-update lock)."""
        with self._cv:
            return self._idle(ignore_waiting)

    def _idle(self, ignore_waiting: bool) -> bool:
        """Under the lock, after the step in progress (SGLang checks between two steps): no request
        in the batch or being prefilled, none queued unless paused / ``ignore_waiting``."""
        step = self._steps_done
        self._cv.wait_for(lambda: not self._busy or self._steps_done != step)
        return self._batch is None and not self._new and not (self._queue and not (self._paused or ignore_waiting))

    def flush_cache(self, ignore_waiting: bool = False) -> bool:
        """SGLang's Scheduler.flush_cache: empty the prefix cache only when :meth:`can_flush`."""
        with self._cv:
            if not self._idle(ignore_waiting):
                logger.warning("Cache not flushed because there are pending requests. #queue-req: %d, "
                               "#running-req: %d", len(self._queue), len(self._batch) if self._batch else 0)
                return False
            if self.model.prefix_cache is not None:
                self.model.prefix_cache.flush()
            return True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def exclusive(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` between steps with the batch drained (or paused); blocks the caller."""
        with self._cv:
            self._cv.wait_for(lambda: not self._exclusive)
            self._draining = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._busy and (self._paused or self._batch is None))
            self._exclusive = True
        try:
            return fn()
        finally:
            with self._cv:
                self._exclusive = self._draining = False
                self._cv.notify_all()

    def load(self) -> Dict[str, int]:
        with self._cv:
            return {"queued": len(self._queue), "running": len(self._batch) if self._batch else 0}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # -- worker ----------------------------------------------------------------------------
    def _finish(self, req: Request) -> None:
        cb = self._done.pop(req.rid, None)
        self.stats["finished"] += 1
        if cb is not None:
            try:
                cb(req)
            except Exception:  # a callback must never kill the worker
                logger.exception("completion callback of %s failed", req.rid)

    def _apply_aborts(self) -> None:
        """Under the lock: finish aborted queued/running requests."""
        if not (self._abort_all or self._abort_rids):
            return
        hit = lambda r: self._abort_all or r.rid in self._abort_rids  # noqa: E731
        for r in [r for r in self._queue if hit(r)]:
            self._queue.remove(r)
            r.finish = {"type": "abort", "message": "aborted"}
            self._finish(r)
        if self._batch is not None:
            keep = []
            for i, r in enumerate(self._batch.reqs):
                if hit(r):
                    r.finish = {"type": "abort", "message": "aborted"}
                    self._finish(r)
                else:
                    keep.append(i)
            if len(keep) < len(self._batch):
                self._batch = self.model.keep(self._batch, keep) if keep else None
        self._abort_all = False
        self._abort_rids.clear()

    def _runnable(self) -> bool:
        return not self._paused and not self._exclusive and (bool(self._queue) and not self._draining
                                                             or self._batch is not None)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._apply_aborts()
                self._busy, self._new = False, []
                self._steps_done += 1
                self._cv.notify_all()
                self._cv.wait_for(lambda: self._stop or self._runnable() or self._abort_all or bool(self._abort_rids))
                if self._stop:
                    return
                self._apply_aborts()
                if not self._runnable():
                    continue
                idle = self._batch is None
            if idle and self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)  # let concurrent requests arrive together
            with self._cv:
                if not self._runnable():
                    continue
                self._busy = True
                room = self.max_batch_size - (len(self._batch) if self._batch else 0)
                new = []
                while self._queue and room > 0 and not self._draining:
                    new.append(self._queue.popleft())
                    room -= 1
                self._new = new
            try:
                self._step(new)
            except Exception as e:
                logger.exception("generation step failed")
                self._fail_all(new, e)

    def _prefill(self, new) -> None:
        """Prefill ``new``; if that fails, each request alone, so a failure fails only its own."""
        try:
            self._collect(self.model.prefill(new), joined=True)
        except Exception as e:
            logger.warning("prefill of %d request(s) failed (%s); retrying them one by one", len(new), e)
            for r in new:
                try:
                    if len(new) == 1:
                        raise e
                    self._collect(self.model.prefill([r]), joined=True)
                except Exception as err:
                    logger.exception("request %s failed", r.rid)
                    r.finish = {"type": "abort", "message": f"engine error: {type(err).__name__}: {err}"}
                    self._finish(r)
        self.stats["prefills"] += 1

    def _step(self, new) -> None:
        m = self.model
        if new:
            self._prefill(new)
        if self._batch is not None:
            m.decode(self._batch)
            self.stats["steps"] += 1
            self._collect(self._batch, joined=False)

    def _collect(self, b: Batch, joined: bool) -> None:
        """Deliver finished rows of ``b``; keep the rest in the running batch."""
        self.stats["generated_tokens"] += len(b)
        keep = [i for i, r in enumerate(b.reqs) if r.finish is None]
        for r in b.reqs:
            if r.finish is not None:
                self._finish(r)
        rest = self.model.keep(b, keep) if keep and len(keep) < len(b) else (b if keep else None)
        if joined:
            if rest is not None:
                self._batch = self.model.merge(self._batch, rest)
        else:
            self._batch = rest
        if self._batch is not None:
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self._batch))

    def _fail_all(self, new, err: Exception) -> None:
        batch, self._batch = self._batch, None
        for r in list(new) + (batch.reqs if batch else []):
            if r.finish is None:
                r.finish = {"type": "abort", "message": f"engine error: {err}"}
                self._finish(r)
