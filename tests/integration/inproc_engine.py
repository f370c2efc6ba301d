"""A local engine served over real HTTP (127.0.0.1) from a background thread of the test process:
the same app as ``python -m rollout.engines.local``, without a process start per test module."""

from __future__ import annotations

import asyncio
import threading

import torch
from aiohttp import web

from rollout.engines.local.app import build_app
from rollout.engines.local.runner import LocalModel
from rollout.engines.local.scheduler import Scheduler
from rollout.engines.local.server import Limits, LocalEngine


class InprocEngine:
    def __init__(self, model_dir: str, *, api_key=None, weight_version="0", max_n=64, prefix_cache_tokens=1 << 16,
                 max_batch_size=16, batch_wait_s=0.002):
        torch.set_num_threads(1)  # as the engine process runs (--threads 1): no oversubscription on 2 cores
        self.model = LocalModel(model_dir, prefix_cache_tokens=prefix_cache_tokens)
        self.scheduler = Scheduler(self.model, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
        self.engine = LocalEngine(self.model, self.scheduler, weight_version=weight_version, api_key=api_key,
                                  limits=Limits(max_n=max_n))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("in-process engine did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(build_app(self.engine), handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
