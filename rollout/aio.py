"""One background event loop for synchronous callers (the trainer's driver is not async).

Engine clients pool their connections per event loop, so a synchronous program should run all
its rollout coroutines on the same loop: ``run_sync(fleet.update_weights_from_disk(...))``,
``run_sync(generator.generate(prompts))``. The loop lives in a daemon thread started on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Optional


class BackgroundLoop:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-loop", daemon=True)
                self._thread.start()
            return self._loop

    def run(self, coro: Awaitable[Any], timeout: Optional[float] = None) -> Any:
        """Run ``coro`` on the background loop and wait for its result."""
        loop = self._ensure()
        if threading.current_thread() is self._thread:
            raise RuntimeError("run_sync called from the rollout loop itself; await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def submit(self, coro: Awaitable[Any]) -> "concurrent.futures.Future":
        """Schedule ``coro`` on the background loop and return at once (a concurrent Future)."""
        loop = self._ensure()
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def close(self) -> None:
        with self._lock:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._loop.stop)
                if self._thread is not None:
                    self._thread.join(timeout=10)
                self._loop.close()
            self._loop = None


_DEFAULT = BackgroundLoop()


def run_sync(coro: Awaitable[Any], timeout: Optional[float] = None) -> Any:
    """Run ``coro`` on the shared background loop (see the module docstring)."""
    return _DEFAULT.run(coro, timeout)


def submit(coro: Awaitable[Any]) -> "concurrent.futures.Future":
    """Start ``coro`` on the shared background loop without waiting (e.g. an HTTP call that must
    run while this thread blocks in a collective)."""
    return _DEFAULT.submit(coro)
