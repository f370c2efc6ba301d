"""Many engines behind one `generate`: balancing, health, failover, pause/update/continue.

- Balancing: least outstanding requests (ties broken round-robin), or everything through an
  `sglang_router` when one is configured (the router does not forward weight-update endpoints, so
  control calls always go to each server directly; its cache-aware policy keeps a growing
  multi-turn prefix on one server).
- Sticky routing: requests made through one :meth:`Fleet.sticky` handle (all turns of one
  multi-turn sample) go to the engine that served the handle's previous request while it is live,
  so each turn finds its prefix in that engine's radix cache (the idea of SGLang router's
  cache-aware policy, done by key instead of by prefix match).
- Failover: a request whose engine becomes unreachable (after the client's retries) or answers
  with a server error (5xx) triggers a health probe; a dead engine is dropped from rotation and the request
  is re-issued to another one. With no live engine left, :class:`FleetExhausted` names every engine and its
  last error.
- Weight updates: new requests wait, every engine is paused, updated, checked to report the new
  `weight_version`, and continued. Requests that the pause aborted (finish reason `abort`) are
  re-issued once generation continues, so callers only ever see complete samples. The fleet runs
  one version (`committed_version`): engines that fail an update, or answer with another version,
  leave it. The checkpoint bus's all-or-nothing commit (`rollout.bus.commit`) drives these steps.
  (The pause/update/continue sequence is how slime and verl drive SGLang; the code is ours.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from .config import ClientConfig
from .engines.client import EngineClient
from .engines.protocol import EngineError, EngineHTTPError, EngineUnavailable, GenerateOutput

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3
MAX_STICKY_KEYS = 65536
"""Sticky keys remembered at once (least recently used forgotten first)."""


class FleetExhausted(RuntimeError):
    """No engine is left to serve a request."""


class WeightUpdateError(RuntimeError):
    """A weight update failed on at least one engine; ``errors`` maps engine URL -> message."""

    def __init__(self, version: Optional[str], errors: Dict[str, str]):
        detail = "; ".join(f"{url}: {msg}" for url, msg in errors.items())
        super().__init__(f"weight update to version {version} failed on {len(errors)} engine(s): {detail}")
        self.errors = errors


@dataclass
class _Engine:
    client: EngineClient
    outstanding: int = 0
    alive: bool = True
    served: int = 0
    last_error: str = ""
    consecutive_failures: int = 0
    dropped: str = ""  # why the weight-update commit removed it ("" = not dropped); never rejoins by itself
    paused: bool = False  # paused by this fleet and not continued yet
    keep_paused: bool = False  # dropped and deliberately left paused (serves nothing)


class Fleet:
    """A pool of engine clients. ``generate`` has the same signature as ``EngineClient.generate``."""

    def __init__(self, clients: Sequence[EngineClient], *, router: Optional[EngineClient] = None,
                 max_concurrent: int = 512, probe_timeout_s: float = 5.0, max_abort_retries: int = 8,
                 flush_timeout_s: float = 600.0):
        if not clients:
            raise ValueError("a fleet needs at least one engine")
        self._engines = [_Engine(c) for c in clients]
        self._router = router
        self._sem = asyncio.Semaphore(max_concurrent)
        self._probe_timeout_s = probe_timeout_s
        self._max_abort_retries = max_abort_retries
        self._flush_timeout_s = flush_timeout_s
        self._rr = itertools.count()
        self._running = asyncio.Event()
        self._running.set()
        self.committed_version: Optional[str] = None
        """The weight version every live engine runs (set by a successful update/commit)."""
        self._sticky: "OrderedDict[str, _Engine]" = OrderedDict()

    @classmethod
    def from_urls(cls, urls: Sequence[str], *, api_key: Optional[str] = None,
                  client_config: Optional[ClientConfig] = None, router_url: Optional[str] = None,
                  max_concurrent: int = 512) -> "Fleet":
        cfg = client_config or ClientConfig()
        clients = [EngineClient(u, api_key=api_key, config=cfg) for u in urls]
        router = EngineClient(router_url, api_key=api_key, config=cfg) if router_url else None
        return cls(clients, router=router, max_concurrent=max_concurrent)

    # -- introspection ---------------------------------------------------------------------
    @property
    def urls(self) -> List[str]:
        return [e.client.url for e in self._engines]

    @property
    def live_urls(self) -> List[str]:
        return [e.client.url for e in self._engines if e.alive]

    @property
    def live_clients(self) -> List[EngineClient]:
        return [e.client for e in self._engines if e.alive]

    def stats(self) -> Dict[str, Dict[str, Any]]:
        return {e.client.url: {"alive": e.alive, "outstanding": e.outstanding, "served": e.served,
                               "last_error": e.last_error, "dropped": e.dropped} for e in self._engines}

    def drop(self, url: str, reason: str, *, keep_paused: bool = True) -> None:
        """Remove an engine from rotation for good (e.g. it could not load the committed version).

        With ``keep_paused`` it is not continued after the update either, so it generates nothing
        on weights the rest of the fleet no longer runs. Only :meth:`readmit` brings it back.
        """
        for e in self._engines:
            if e.client.url == url:
                e.alive, e.dropped, e.last_error, e.keep_paused = False, reason or "dropped", reason, keep_paused
                logger.error("rollout engine %s is dropped from the fleet (%d live): %s", url,
                             len(self.live_urls), reason)
                return
        raise KeyError(f"no engine {url} in the fleet")

    async def readmit(self, url: str) -> bool:
        """Bring a dropped engine back if it is healthy and runs the committed version."""
        for e in self._engines:
            if e.client.url == url:
                version = await e.client.weight_version()
                if self.committed_version is not None and version != self.committed_version:
                    logger.error("engine %s runs version %s, the fleet %s: not readmitted", url, version,
                                 self.committed_version)
                    return False
                if e.paused:
                    await e.client.continue_generation()
                    e.paused = False
                e.alive, e.dropped, e.keep_paused, e.consecutive_failures = True, "", False, 0
                return True
        raise KeyError(f"no engine {url} in the fleet")

    async def close(self) -> None:
        for e in self._engines:
            await e.client.close()
        if self._router is not None:
            await self._router.close()

    async def __aenter__(self) -> "Fleet":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- generation ------------------------------------------------------------------------
    def sticky(self, key: str) -> "StickyEngine":
        """A handle whose requests stay on one engine (see the module docstring)."""
        return StickyEngine(self, key)

    def _pick(self, avoid: Optional[_Engine], key: Optional[str] = None) -> _Engine:
        if key is not None:
            eng = self._sticky.get(key)
            if eng is not None and eng.alive and eng is not avoid:
                self._sticky.move_to_end(key)
                return eng
        live = [e for e in self._engines if e.alive]
        if not live:
            detail = "; ".join(f"{e.client.url} ({e.last_error or 'dead'})" for e in self._engines)
            raise FleetExhausted(f"no live rollout engine left out of {len(self._engines)}: {detail}")
        if avoid is not None and len(live) > 1:
            live = [e for e in live if e is not avoid]
        low = min(e.outstanding for e in live)
        best = [e for e in live if e.outstanding == low]
        return best[next(self._rr) % len(best)]

    async def _on_failure(self, eng: _Engine, err: EngineError) -> None:
        eng.last_error = str(err)
        eng.consecutive_failures += 1
        if not eng.alive:
            return
        # A dead engine fails its health probe; a live one that keeps failing requests is dropped too.
        if eng.consecutive_failures >= MAX_CONSECUTIVE_FAILURES or \
                not await eng.client.health(timeout_s=self._probe_timeout_s):
            if eng.alive:
                eng.alive = False
                logger.error("rollout engine %s leaves the fleet (%d live) after %d failed request(s): %s",
                             eng.client.url, len(self.live_urls), eng.consecutive_failures, err)

    async def generate(self, input_ids: Sequence[int], params: Dict[str, Any], *,
                       rid: Optional[str] = None, return_logprob: bool = True,
                       sticky_key: Optional[str] = None) -> GenerateOutput:
        """Generate on the least-loaded live engine (or ``sticky_key``'s); fail over and re-issue as needed."""
        async with self._sem:
            aborts, failures, avoid = 0, 0, None
            while True:
                await self._running.wait()
                if self._router is not None:
                    out = await self._router.generate(input_ids, params, rid=rid, return_logprob=return_logprob)
                else:
                    eng = self._pick(avoid, sticky_key)
                    if sticky_key is not None:
                        self._remember(sticky_key, eng)
                    issued_at = self.committed_version  # a commit may land while it runs (async rollout)
                    eng.outstanding += 1
                    try:
                        out = await eng.client.generate(input_ids, params, rid=rid, return_logprob=return_logprob)
                    except (EngineUnavailable, EngineHTTPError) as e:
                        if isinstance(e, EngineHTTPError) and e.status < 500:
                            raise  # the request is at fault, not the engine
                        await self._on_failure(eng, e)
                        failures += 1
                        if failures > 2 * len(self._engines):
                            raise FleetExhausted(f"request failed on {failures} attempts; last: {e}") from e
                        avoid = eng
                        logger.warning("re-issuing a request that failed on %s", eng.client.url)
                        continue
                    finally:
                        eng.outstanding -= 1
                    eng.served += 1
                    eng.consecutive_failures = 0
                    if self.committed_version is not None and issued_at is not None and \
                            out.weight_version is not None and \
                            out.weight_version not in (self.committed_version, issued_at) and eng.alive:
                        # Someone changed this engine's weights behind the fleet: never mix versions.
                        self.drop(eng.client.url, f"answered with weight_version {out.weight_version}, the "
                                                  f"fleet runs {self.committed_version}", keep_paused=False)
                        continue
                if out.finish_reason == "abort" and aborts < self._max_abort_retries:
                    # Aborted by a pause (weight update) or an operator: re-issue after it.
                    aborts += 1
                    await asyncio.sleep(0)
                    continue
                return out

    async def generate_batch(self, input_ids: Sequence[Sequence[int]], params: Sequence[Dict[str, Any]], *,
                             return_logprob: bool = True) -> List[GenerateOutput]:
        """Several prompts (a GRPO group) as one batch request to the least-loaded live engine (so a
        group's shared prompt meets one prefix cache): :meth:`generate`'s failover, version check and
        re-issue of aborted items, per batch. Through a router (or to clients without ``generate_batch``)
        each prompt is its own request."""
        if self._router is not None or not all(hasattr(e.client, "generate_batch") for e in self._engines):
            return list(await asyncio.gather(*(self.generate(ids, p, return_logprob=return_logprob)
                                               for ids, p in zip(input_ids, params, strict=True))))
        results: List[Optional[GenerateOutput]] = [None] * len(input_ids)
        todo = list(range(len(input_ids)))
        async with self._sem:
            aborts, failures, avoid = 0, 0, None
            while todo:
                await self._running.wait()
                eng = self._pick(avoid)
                issued_at = self.committed_version
                eng.outstanding += len(todo)
                try:
                    outs = await eng.client.generate_batch([input_ids[i] for i in todo], [params[i] for i in todo],
                                                           return_logprob=return_logprob)
                except (EngineUnavailable, EngineHTTPError) as e:
                    if isinstance(e, EngineHTTPError) and e.status < 500:
                        raise
                    await self._on_failure(eng, e)
                    failures += 1
                    if failures > 2 * len(self._engines):
                        raise FleetExhausted(f"request failed on {failures} attempts; last: {e}") from e
                    avoid = eng
                    logger.warning("re-issuing a request that failed on %s (a batch of %d)", eng.client.url, len(todo))
                    continue
                finally:
                    eng.outstanding -= len(todo)
                eng.served += len(todo)
                eng.consecutive_failures = 0
                other = next((o.weight_version for o in outs if self.committed_version is not None and
                              issued_at is not None and o.weight_version is not None and
                              o.weight_version not in (self.committed_version, issued_at)), None)
                if other is not None and eng.alive:
                    self.drop(eng.client.url, f"answered with weight_version {other}, the fleet runs "
                                              f"{self.committed_version}", keep_paused=False)
                    continue
                again = []
                for i, out in zip(todo, outs, strict=True):
                    if out.finish_reason == "abort" and aborts < self._max_abort_retries:
                        again.append(i)  # aborted by a pause or an operator: re-issued after it
                    else:
                        results[i] = out
                if again:
                    aborts += 1
                    await asyncio.sleep(0)
                todo = again
        return results  # type: ignore[return-value]

    def _remember(self, key: str, eng: _Engine) -> None:
        self._sticky[key] = eng
        self._sticky.move_to_end(key)
        while len(self._sticky) > MAX_STICKY_KEYS:
            self._sticky.popitem(last=False)

    def forget(self, key: str) -> None:
        """Drop ``key``'s engine binding (its sample is complete)."""
        self._sticky.pop(key, None)

    # -- health ----------------------------------------------------------------------------
    async def check_health(self) -> Dict[str, bool]:
        """Probe every engine: a dead one that answers again rejoins if it runs the committed
        version; an engine the commit dropped never rejoins by itself (see :meth:`readmit`)."""
        candidates = [e for e in self._engines if not e.dropped]
        results = await asyncio.gather(*(e.client.health(self._probe_timeout_s) for e in candidates))
        for e, ok in zip(candidates, results, strict=True):
            if ok and not e.alive and self.committed_version is not None:
                try:
                    version = await e.client.weight_version()
                except Exception:
                    version = None
                if version != self.committed_version:
                    logger.error("rollout engine %s answers again but runs weight version %s (fleet: %s); "
                                 "it stays out", e.client.url, version, self.committed_version)
                    continue
            if ok and not e.alive:
                logger.info("rollout engine %s answers again and rejoins the fleet", e.client.url)
            elif not ok and e.alive:
                logger.error("rollout engine %s fails its health check and leaves the fleet", e.client.url)
            if ok and not e.alive:
                e.consecutive_failures = 0
            e.alive = ok
        return {e.client.url: e.alive for e in self._engines}

    async def wait_healthy(self, timeout_s: float = 60.0, interval_s: float = 0.5) -> None:
        """Wait until every engine answers /health (attaching to engines that are still starting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            status = await self.check_health()
            if all(status.values()):
                return
            if loop.time() > deadline:
                down = [u for u, ok in status.items() if not ok]
                raise FleetExhausted(f"engines not healthy after {timeout_s:.0f} s: {down}")
            await asyncio.sleep(interval_s)

    # -- pause / update / continue ---------------------------------------------------------
    async def _each(self, name: str, *args, **kwargs) -> Dict[str, Any]:
        live = [e for e in self._engines if e.alive]
        res = await asyncio.gather(*(getattr(e.client, name)(*args, **kwargs) for e in live),
                                   return_exceptions=True)
        return {e.client.url: r for e, r in zip(live, res, strict=True)}

    async def pause(self, mode: str = "abort") -> None:
        """Hold new requests and pause every live engine (SGLang `pause_generation`)."""
        self._running.clear()
        for e in self._engines:
            e.paused = e.paused or e.alive
        errors = {u: str(r) for u, r in (await self._each("pause_generation", mode)).items()
                  if isinstance(r, BaseException)}
        if errors:
            logger.error("pause_generation failed on %s", errors)

    async def resume(self, flush: bool = False) -> None:
        """Continue the engines this fleet paused (not those dropped paused) and release requests.

        With ``flush`` (after any weight change) no request is released before every continued
        engine has flushed its prefix cache: KV computed with the old weights is never reused for a
        new request. SGLang flushes only when no request runs, so with ``pause_mode: in_place`` (the
        paused requests keep running on their old KV) this waits for them to finish; an engine that
        cannot flush within ``flush_timeout_s`` is dropped.
        """
        targets = [e for e in self._engines if e.paused and not e.keep_paused]
        try:
            res = await asyncio.gather(*(e.client.continue_generation() for e in targets), return_exceptions=True)
            errors = {e.client.url: str(r) for e, r in zip(targets, res, strict=True) if isinstance(r, BaseException)}
            for e, r in zip(targets, res, strict=True):
                e.paused = e.paused and isinstance(r, BaseException)
            if errors:
                logger.error("continue_generation failed on %s", errors)
            if flush:
                await asyncio.gather(*(self._flush(e) for e in targets if e.alive and not e.paused))
        finally:
            self._running.set()

    async def _flush(self, eng: _Engine) -> None:
        """POST /flush_cache until the engine accepts it (it refuses while requests run)."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self._flush_timeout_s, 0.02
        while True:
            try:
                await eng.client.flush_cache()
                return
            except EngineHTTPError as e:
                if e.status != 400 or loop.time() > deadline:
                    self.drop(eng.client.url, f"could not flush its prefix cache after a weight update: {e}",
                              keep_paused=False)
                    return
            except EngineError as e:
                self.drop(eng.client.url, f"flush_cache after a weight update: {e}", keep_paused=False)
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)

    async def update_weights_from_disk(self, model_path: str, weight_version: str, *,
                                       pause_mode: str = "abort") -> None:
        """Pause, load ``model_path`` on every live engine, verify the version, continue.

        An engine that fails leaves the rotation (it is continued, but never served again), so
        the fleet stays on one version, and :class:`WeightUpdateError` is raised after continuing.
        The checkpoint bus's commit (:func:`rollout.bus.commit.commit`) adds retries, log-prob
        spot checks and the stop-the-run policy on top of the same steps.
        """
        from .bus.commit import disk_apply

        await self.pause(pause_mode)
        errors: Dict[str, str] = {}
        apply = disk_apply(model_path, weight_version, pause_mode=pause_mode)
        try:
            live = [e for e in self._engines if e.alive]
            res = await asyncio.gather(*(apply(e.client) for e in live), return_exceptions=True)
            errors.update({e.client.url: str(r)
                           for e, r in zip(live, res, strict=True) if isinstance(r, BaseException)})
            versions = await self._each("weight_version")
            for url, v in versions.items():
                if url not in errors and v != str(weight_version):
                    errors[url] = f"reports weight_version {v!r} after the update"
            if len(errors) < len(versions):
                self.committed_version = str(weight_version)
                for url, msg in errors.items():
                    self.drop(url, f"weight update to {weight_version} failed: {msg}", keep_paused=False)
        finally:
            await self.resume(flush=True)
        if errors:
            raise WeightUpdateError(weight_version, errors)
        logger.info("fleet: %d engine(s) at weight version %s", len(self.live_urls), weight_version)

    async def weight_versions(self) -> Dict[str, Optional[str]]:
        res = await self._each("weight_version")
        return {u: (None if isinstance(v, BaseException) else v) for u, v in res.items()}


class StickyEngine:
    """``generate`` of one :class:`Fleet` bound to one key: every request goes where the last went."""

    def __init__(self, fleet: Fleet, key: str):
        self.fleet, self.key = fleet, key

    async def generate(self, input_ids: Sequence[int], params: Dict[str, Any], **kw) -> GenerateOutput:
        return await self.fleet.generate(input_ids, params, sticky_key=self.key, **kw)

    def release(self) -> None:
        self.fleet.forget(self.key)
