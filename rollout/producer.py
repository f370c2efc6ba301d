"""Asynchronous rollout: whole GRPO groups generated ahead of the trainer, within a staleness bound.

The trainer's weight version ``v`` is the number of completed RL steps, so step ``s`` trains
with weights ``s``. With ``max_staleness = k`` the batch of step ``s`` may come from any weight
version ``>= s - k``. The producer runs on the rollout event loop (:mod:`rollout.aio`) while the
trainer trains:

- Prompts are drawn per *target step*, in order, exactly as the synchronous loop draws them
  (``prompts_per_step`` from the same resumable stream, the same sampling seed ``seed + step``
  and group ids), so a target's prompts never depend on timing.
- Target ``t`` is started only once the trainer has reached version ``t - k`` (``set_version``).
  Weights only move forward, so every token of target ``t`` comes from a version ``>= t - k``.
- A group's version is the *oldest* version that produced any of its tokens: per sample the
  versions the engine reported for its turns and, under ``span_policy = keep`` (engines paused
  in place, so one response can span an update), the version the group was issued at. A group
  is trained from one version: under ``reissue`` the samples a mid-group update left on the older
  version are generated again until the whole group reports one version (counted as
  ``resampled``); under ``keep`` all its samples were issued at one version.
- ``take(s)`` waits for target ``s``'s groups. A group older than ``s - k`` (impossible by the
  gate above unless an engine mislabels its weights) is never trained: it is regenerated on
  the current weights, and counted (``regenerated``).

Resume: :meth:`stream_state` gives the prompt-stream state before target ``s`` was drawn; a
checkpoint taken before step ``s`` stores it, so samples in flight (targets ``>= s``) are
discarded and their prompts regenerated after the resume: nothing lost, nothing trained twice.
(The idea of bounding staleness per sample by the version gate comes from AReaL's design.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .aio import run_sync, submit
from .sample import Sample

logger = logging.getLogger(__name__)

SPAN_POLICIES = {"reissue": "abort", "keep": "in_place"}
"""How a response whose generation spans a weight update is handled -> the fleet's pause mode.
reissue: the update aborts it and the fleet re-issues it on the new weights (one version per
response, the partial work is lost); keep: it is paused in place and continues on the new
weights (no work lost; its tokens mix versions, each token's mu is still the log-prob of the
version that sampled it, and its staleness counts from the oldest)."""


@dataclass
class Group:
    """One GRPO group: the ``n_samples`` responses of one prompt, trained together."""

    step: int
    """The training step whose prompts it was drawn with."""
    group_id: int
    prompt_index: int
    samples: List[Sample]
    issued_version: int
    """The trainer version when the group was issued."""
    version: int = 0
    """The oldest weight version that produced any of its tokens."""
    regenerated: int = 0
    extra: Dict = field(default_factory=dict)


def sample_oldest_version(sample: Sample, issued: int, keep_spanning: bool) -> int:
    """Oldest version among the sample's turns (and its issue version if responses may span)."""
    versions = []
    for v in list(sample.weight_versions) + [sample.weight_version]:
        try:
            versions.append(int(v))
        except (TypeError, ValueError):
            pass
    if keep_spanning or not versions:
        versions.append(issued)
    return min(versions)


class GroupProducer:
    """Generates the groups of target steps ``start_step, start_step + 1, ...`` ahead of training."""

    def __init__(self, generator, stream, *, prompts_per_step: int, max_staleness: int, seed: int,
                 start_step: int, span_policy: str = "reissue"):
        if max_staleness < 1:
            raise ValueError(f"rollout.max_staleness must be >= 1 for asynchronous rollout, got {max_staleness}")
        if span_policy not in SPAN_POLICIES:
            raise ValueError(f"rollout.span_policy must be one of {sorted(SPAN_POLICIES)}, got {span_policy!r}")
        self.generator, self.stream = generator, stream
        self.prompts_per_step, self.k, self.seed = prompts_per_step, max_staleness, seed
        self.keep_spanning = span_policy == "keep"
        self.next_target = start_step
        self.version = start_step - 1  # nothing may start before the first set_version
        self._states: Dict[int, dict] = {}
        self._tasks: Dict[int, List[asyncio.Task]] = {}
        self._gate: Optional[asyncio.Event] = None
        self._runner = None
        self._run_task: Optional[asyncio.Task] = None
        self._closed = False

    # -- on the rollout loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        self._gate = asyncio.Event()
        self._run_task = asyncio.current_task()
        while not self._closed:
            if self.next_target - self.k > self.version:
                self._gate.clear()
                await self._gate.wait()
                continue
            t = self.next_target
            self._states[t] = self.stream.state_dict()
            prompts = self.stream.next_batch(self.prompts_per_step)
            self._tasks[t] = [asyncio.ensure_future(self._group(t, g, p, self.version))
                              for g, p in enumerate(prompts)]
            self.next_target = t + 1

    async def _group(self, t: int, g: int, prompt, issued: int) -> Group:
        t_start = time.perf_counter()
        samples = await self.generator.generate_group(prompt, g, self.seed + t)
        redone = 0
        # reissue: an update that lands while the group generates leaves its samples on two
        # versions; the older ones are generated again (same seeds) until the group is uniform.
        while not self.keep_spanning:
            versions = [sample_oldest_version(s, issued, False) for s in samples]
            old = [i for i, v in enumerate(versions) if v < max(versions)]
            if not old:
                break
            redo = await asyncio.gather(*(self.generator.generate_sample(prompt, g, i, self.seed + t) for i in old))
            for i, s in zip(old, redo, strict=True):
                samples[i] = s
            redone += len(old)
        version = min(sample_oldest_version(s, issued, self.keep_spanning) for s in samples)
        return Group(step=t, group_id=g, prompt_index=prompt.index, samples=samples, issued_version=issued,
                     version=version, extra={"prompt": prompt, "resampled": redone, "t_start": t_start,
                            "t_end": time.perf_counter()})

    async def _set_version(self, version: int) -> None:
        self.version = max(self.version, version)
        if self._gate is not None:
            self._gate.set()

    async def _take(self, step: int) -> List[Group]:
        while self.next_target <= step:  # not drawn yet: let the runner catch up
            if self._run_task is not None and self._run_task.done():
                self._run_task.result()  # the runner failed: surface its error
                raise RuntimeError("the rollout producer stopped")
            if self.next_target - self.k > self.version:
                raise RuntimeError(f"step {step} asked before the trainer reached version {step - self.k} "
                                   f"(set_version)")
            await asyncio.sleep(0.001)
        groups = list(await asyncio.gather(*self._tasks.pop(step)))
        self._states.pop(step, None)
        for i, grp in enumerate(groups):
            while grp.version < step - self.k:
                logger.warning("step %d: group %d is from version %d (bound %d): regenerating it", step,
                               grp.group_id, grp.version, step - self.k)
                again = await self._group(step, grp.group_id, grp.extra["prompt"], self.version)
                again.regenerated = grp.regenerated + 1
                grp = groups[i] = again
        return groups

    async def _stream_state(self, step: int) -> dict:
        if step in self._states:
            return dict(self._states[step])
        if step == self.next_target:
            return self.stream.state_dict()
        raise ValueError(f"no prompt-stream state for step {step} (next target {self.next_target})")

    async def _close(self) -> None:
        self._closed = True
        if self._gate is not None:
            self._gate.set()
        for tasks in self._tasks.values():
            for task in tasks:
                task.cancel()
        self._tasks.clear()

    # -- from the trainer thread -----------------------------------------------------------------
    def start(self, version: int) -> None:
        self.version = version
        self._runner = submit(self._run())

    def set_version(self, version: int) -> None:
        """The trainer reached ``version``: targets up to ``version + k`` may start."""
        run_sync(self._set_version(version))

    def take(self, step: int, timeout: Optional[float] = None) -> List[Group]:
        """Step ``step``'s groups in prompt order, every one from a version ``>= step - k``."""
        if self._runner is not None and self._runner.done():
            self._runner.result()  # surface the producer's error
        return run_sync(self._take(step), timeout)

    def stream_state(self, step: int) -> dict:
        """The prompt-stream state before step ``step``'s prompts were drawn (for checkpoints)."""
        return run_sync(self._stream_state(step))

    def close(self) -> None:
        run_sync(self._close())
        if self._runner is not None:
            try:
                self._runner.result(timeout=10)
            except Exception:  # noqa: BLE001 - shutting down
                logger.exception("the rollout producer ended with an error")
