"""Waiting for a condition in a test: poll it with a deadline (never sleep a fixed time and assume).

    value = until(lambda: engine.in_flight, "a request on the engine")
    value = await async_until(lambda: "rid" in engine.inflight, "the request to start")

Each returns the condition's first truthy value and fails the test (AssertionError naming ``what``)
when the deadline passes first.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def until(cond: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.01) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)


async def async_until(cond: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.01) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert loop.time() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(interval_s)
