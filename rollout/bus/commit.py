"""All-or-nothing commit of a weight version to the rollout fleet.

    pause the fleet (new requests wait; running ones are aborted and re-issued afterwards)
      -> apply the version on every live engine (disk: /update_weights_from_disk; after an
         nccl/gloo transfer: /end_weight_update + /update_weight_version)
      -> verify: each engine reports the new weight_version; optionally a fixed-prompt log-prob
         spot check against the trainer's log-probs, the mismatch reported per engine
      -> a failed engine is retried (``retries`` times); if it still fails:
           on_failure="drop": it leaves the fleet and stays paused (it can never serve the old
                              weights next to the new ones); the others continue on the new version
           on_failure="stop": the fleet stays paused and :class:`CommitError` stops the run
      -> continue.

If no engine takes the version, the version is rejected: :class:`CommitError` is raised in both
modes. The engines that could not load it still run the old weights (a failed disk apply changes
nothing), those whose spot check failed are dropped, and the fleet continues on the old version
in ``drop`` mode. After a successful commit every live engine reports the same version
(``fleet.committed_version``), and the fleet drops any engine that later answers with another one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, List, Optional, Sequence

from .manifest import BusError

logger = logging.getLogger(__name__)

Apply = Callable[[object], Awaitable[object]]  # (EngineClient) -> awaitable


class CommitError(BusError):
    """A version could not be committed as the policy requires; ``errors`` maps URL -> reason."""

    def __init__(self, version: str, errors: Dict[str, str], message: str):
        detail = "; ".join(f"{u}: {m}" for u, m in errors.items())
        super().__init__(f"weight version {version}: {message} [{detail}]")
        self.version, self.errors = version, errors


@dataclass
class SpotCheck:
    """A fixed prompt and continuation with the trainer's log-probs of the continuation.

    Each engine scores ``input_ids[start:]`` (a prefill request, temperature 1); the largest
    absolute difference to ``expected`` is reported per engine. With ``tol`` set, an engine above
    it fails the commit (retried, then dropped or the run stops); leave ``tol`` None to only
    report (bf16/fp8 rollouts legitimately differ from the trainer).
    """

    input_ids: Sequence[int]
    start: int
    expected: Sequence[float]
    tol: Optional[float] = None

    def __post_init__(self):
        if len(self.expected) != len(self.input_ids) - self.start:
            raise ValueError(f"{len(self.expected)} expected log-probs for {len(self.input_ids) - self.start} tokens")


@dataclass
class CommitReport:
    version: str
    committed: List[str] = field(default_factory=list)
    """Engines that run the version (the live fleet afterwards)."""
    dropped: Dict[str, str] = field(default_factory=dict)
    """Engines removed by this commit, with the reason."""
    attempts: Dict[str, int] = field(default_factory=dict)
    spot_max_abs_diff: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def metrics(self) -> Dict[str, float]:
        out = {"bus/commit_s": self.seconds, "bus/engines_committed": float(len(self.committed)),
               "bus/engines_dropped": float(len(self.dropped)),
               "bus/apply_retries": float(sum(max(0, a - 1) for a in self.attempts.values()))}
        if self.spot_max_abs_diff:
            out["bus/spot_logprob_max_abs_diff"] = max(self.spot_max_abs_diff.values())
        return out


async def _verify(client, version: str, spot: Optional[SpotCheck], report: CommitReport) -> None:
    got = await client.weight_version()
    if got != version:
        raise BusError(f"reports weight_version {got!r} after applying {version}")
    if spot is None:
        return
    # A paused engine holds every request, the scoring one too: continue this engine alone (the
    # fleet still holds its callers' requests), and pause it again if it fails the check.
    await client.continue_generation()
    try:
        lps = await client.prompt_logprobs(list(spot.input_ids), spot.start)
        diff = max(abs(a - b) for a, b in zip(lps, spot.expected, strict=True))
        report.spot_max_abs_diff[client.url] = diff
        logger.info("engine %s: spot-check max |logprob - trainer| = %.3g at version %s", client.url, diff, version)
        if spot.tol is not None and diff > spot.tol:
            raise BusError(f"spot check: max |logprob - trainer| = {diff:.3g} > tol {spot.tol:g}")
    except BaseException:
        try:
            await client.pause_generation()
        except Exception as e:  # the engine may be gone
            logger.warning("engine %s: could not pause it again after a failed spot check: %s", client.url, e)
        raise


async def _apply_one(client, version: str, apply: Apply, retry_apply: Optional[Apply], retries: int,
                     spot: Optional[SpotCheck], report: CommitReport, failed: Optional[str],
                     backoff_s: float, applied: Dict[str, bool]) -> Optional[str]:
    """Apply + verify with retries; None on success, else the last error. ``applied[url]`` tells
    whether the last apply call succeeded (the engine may then hold the new weights)."""
    error = failed
    for attempt in range(retries + 1):
        if failed is None:
            fn = apply if attempt == 0 else (retry_apply or apply)
        else:
            fn = retry_apply
        if fn is None:
            break  # nothing can re-send the version to this engine
        if attempt:
            logger.warning("engine %s: retrying version %s (attempt %d/%d) after: %s", client.url, version,
                           attempt + 1, retries + 1, error)
            await asyncio.sleep(backoff_s * attempt)
        report.attempts[client.url] = attempt + 1
        if failed is None:  # an engine whose transfer failed may hold partial weights whatever happens
            applied[client.url] = False
        try:
            await fn(client)
            applied[client.url] = True
            await _verify(client, version, spot, report)
            return None
        except Exception as e:  # every failure is retried, then reported with its engine
            error = f"{type(e).__name__}: {e}"
    return error or "failed"


async def commit(fleet, version, apply: Apply, *, retries: int = 1, on_failure: str = "drop",
                 spot_check: Optional[SpotCheck] = None, pause_mode: str = "abort", already_paused: bool = False,
                 failed: Optional[Dict[str, str]] = None, retry_apply: Optional[Apply] = None,
                 backoff_s: float = 0.5) -> CommitReport:
    """Commit ``version`` to every live engine of ``fleet`` (see the module docstring).

    ``apply(client)`` loads the version on one engine; ``retry_apply`` (default: ``apply``) is
    used for retries and for engines listed in ``failed`` (engines whose transfer already failed,
    e.g. in an nccl broadcast; with no ``retry_apply`` they fail at once).
    """
    if on_failure not in ("drop", "stop"):
        raise ValueError(f"on_failure must be drop or stop, got {on_failure!r}")
    version = str(version)
    t0 = time.perf_counter()
    report = CommitReport(version)
    failed = dict(failed or {})
    if not already_paused:
        await fleet.pause(pause_mode)
    clients = fleet.live_clients
    # An engine whose transfer failed may hold part of the new weights (SGLang loads bucket by bucket).
    applied: Dict[str, bool] = {url: True for url in failed}
    errors_list = await asyncio.gather(*(
        _apply_one(c, version, apply, retry_apply, retries, spot_check, report, failed.get(c.url), backoff_s,
                   applied) for c in clients))
    errors = {c.url: e for c, e in zip(clients, errors_list, strict=True) if e is not None}
    ok = [c.url for c in clients if c.url not in errors]
    report.seconds = time.perf_counter() - t0
    if not ok:
        logger.error("bus: version %s rejected by every engine: %s", version, errors)
        if on_failure == "drop":
            for url in errors:
                if applied.get(url):  # it loaded the version but failed verification: not the old weights
                    fleet.drop(url, f"loaded version {version} but failed verification: {errors[url]}")
                    report.dropped[url] = errors[url]
            await fleet.resume(flush=True)
        raise CommitError(version, errors, f"no engine took the version: rejected, the fleet stays on "
                                           f"version {fleet.committed_version}")
    if errors and on_failure == "stop":
        raise CommitError(version, errors, f"{len(errors)} of {len(clients)} engine(s) failed and "
                                           f"bus.on_engine_failure = stop: the fleet stays paused")
    fleet.committed_version = version
    for url, msg in errors.items():
        fleet.drop(url, f"could not take weight version {version}: {msg}", keep_paused=True)
        report.dropped[url] = msg
    report.committed = ok
    await fleet.resume(flush=True)
    report.seconds = time.perf_counter() - t0
    logger.info("bus: version %s committed on %d engine(s) in %.2f s%s", version, len(ok), report.seconds,
                f"; dropped {sorted(errors)}" if errors else "")
    return report


async def begin_session(fleet, pause_mode: str = "abort") -> Dict[str, str]:
    """Before a distributed transfer: pause the fleet and open a weight-update session on each
    live engine. Returns {url: error} for engines that could not open one."""
    await fleet.pause(pause_mode)
    clients = fleet.live_clients
    res = await asyncio.gather(*(c.begin_weight_update() for c in clients), return_exceptions=True)
    return {c.url: f"begin_weight_update: {r}"
            for c, r in zip(clients, res, strict=True) if isinstance(r, BaseException)}


NOT_FLUSHED = "the cache was not flushed"  # SGLang 0.5.23 WeightUpdater.flush_cache_after_weight_update


def disk_apply(path: str, version, pause_mode: str = "abort") -> Apply:
    """Apply for the disk backend: /update_weights_from_disk of the version directory.

    With ``pause_mode: in_place`` the paused requests still hold the engine, and SGLang refuses the
    flush that ``flush_cache: true`` asks for with HTTP 400 *after* loading the weights (the version
    is then not stamped). So in_place sends ``flush_cache: false``; the fleet flushes once the
    paused requests are done (``Fleet.resume(flush=True)``). Should an engine still answer that 400,
    the weights are loaded: the version is stamped and the flush is left to the resume as well.
    """
    from ..engines.protocol import EngineHTTPError

    async def apply(client):
        try:
            return await client.update_weights_from_disk(path, weight_version=str(version),
                                                         flush_cache=pause_mode != "in_place")
        except EngineHTTPError as e:
            if e.status != 400 or NOT_FLUSHED not in str(e):
                raise
            logger.warning("engine %s loaded version %s but could not flush (requests running); stamping the "
                           "version, the flush follows when they finish", client.url, version)
            return await client.update_weight_version(str(version), abort_all_requests=False)
    return apply


def session_apply(version) -> Apply:
    """Apply after a distributed/tensor transfer: close the session, then stamp the version. The
    buckets were sent with ``flush_cache: false`` (SGLang would flush, or fail, after every bucket);
    the commit flushes once, before any request is released (``Fleet.resume(flush=True)``)."""
    from ..engines.protocol import EngineHTTPError

    async def apply(client):
        await client.end_weight_update()
        out = await client.update_weight_version(str(version), abort_all_requests=False)
        try:  # before a spot check generates on this engine; refused (400) while in_place requests run
            await client.flush_cache()
        except EngineHTTPError as e:
            if e.status != 400:
                raise
        return out
    return apply
