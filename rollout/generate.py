"""Prompts -> scored :class:`Sample` groups, single-turn or multi-turn (tool-integrated).

The engine is anything with ``async generate(input_ids, sampling_params, rid=None)`` returning a
:class:`rollout.engines.protocol.GenerateOutput`: a :class:`rollout.fleet.Fleet`, one
:class:`rollout.engines.client.EngineClient`, or a scripted stand-in in tests. Each of the ``n``
samples of a prompt is its own engine request (SGLang's radix cache shares the prompt); a
single-turn group is sent as one batch /generate when the engine has ``generate_batch`` (SGLang
serves each item as its own request: the same samples, one HTTP round trip instead of ``n``), else
as ``n`` requests. Sampling uses top-p = 1 unless configured otherwise; a lower top-p is logged as
a warning because engines return full-distribution log-probs (ALGORITHMS.md, top-p note).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import zlib
from typing import Any, Dict, List, Optional, Sequence

from .aio import run_sync
from .config import RolloutConfig
from .data import Prompt
from .engines.protocol import sampling_params
from .rewards import INLINE, RewardFn, load_reward_fn
from .rewards.pool import RewardPool
from .sample import Sample
from .sandbox import Sandbox
from .tir import run_tool_loop

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """The reward function raised or returned a non-finite value and ``rollout.reward_on_error`` is stop."""


def reward_failures(samples: Sequence[Sample]) -> int:
    """Samples whose reward function raised or returned a non-finite value (scored
    ``rollout.reward_failed_value`` by :meth:`RolloutGenerator._score`)."""
    return sum("reward_error" in s.metadata for s in samples)


def sample_seed(seed: int, group_id: int, index: int, prompt_ids: Sequence[int]) -> int:
    """A per-sample sampling seed, stable across runs (SGLang's `sampling_seed`)."""
    key = f"{seed}:{group_id}:{index}:{len(prompt_ids)}:{zlib.crc32(bytes(str(list(prompt_ids)), 'ascii'))}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


class RolloutGenerator:
    """Generates and scores samples with one engine (or fleet) and one tokenizer."""

    def __init__(self, engine, tokenizer, cfg: RolloutConfig, *, reward_fn: Optional[RewardFn] = None,
                 sandbox: Optional[Sandbox] = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.reward_fn = reward_fn if reward_fn is not None else load_reward_fn(cfg.reward)
        self.reward_pool: Optional[RewardPool] = None
        if reward_fn is None and cfg.reward_workers > 0 and cfg.reward not in INLINE and \
                not inspect.iscoroutinefunction(self.reward_fn):
            self.reward_pool = RewardPool(cfg.reward, cfg.reward_workers, cfg.reward_timeout_s)
        self.sandbox = sandbox
        if cfg.multi_turn.enabled and self.sandbox is None:
            self.sandbox = Sandbox(cfg.sandbox)
        if cfg.top_p < 1.0:
            logger.warning("rollout.top_p = %g < 1: engines return log-probs of the full distribution, so the "
                           "importance ratio is biased where the nucleus cut tokens (ALGORITHMS.md, top-p note)",
                           cfg.top_p)

    def params(self, max_new_tokens: int, stop: Sequence[str] = (), seed: Optional[int] = None) -> Dict[str, Any]:
        c = self.cfg
        return sampling_params(max_new_tokens=max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                               top_k=c.top_k, stop=list(stop), stop_token_ids=c.stop_token_ids,
                               sampling_seed=seed)

    async def _one(self, prompt: Prompt, group_id: int, index: int, seed: Optional[int]) -> Sample:
        s = Sample(prompt_ids=list(prompt.prompt_ids), group_id=group_id, index=index, label=prompt.label)
        sseed = None if seed is None else sample_seed(seed, group_id, index, prompt.prompt_ids)
        if self.cfg.multi_turn.enabled:
            turn = [0]

            def params(max_new: int, stop: List[str]) -> Dict[str, Any]:
                turn[0] += 1
                return self.params(max_new, stop, None if sseed is None else sseed + turn[0])

            sticky = getattr(self.engine, "sticky", None)  # a Fleet: every turn on one engine (prefix cache)
            engine = sticky(f"{id(s)}:{group_id}:{index}") if sticky is not None else self.engine
            try:
                await run_tool_loop(engine, self.tokenizer, s.prompt_ids, self.cfg, self.sandbox, params, s)
            finally:
                if engine is not self.engine:
                    engine.release()
        else:
            out = await self.engine.generate(s.prompt_ids, self.params(self.cfg.max_new_tokens, self.cfg.stop, sseed))
            return await self._finish(prompt, s, out)
        s.response_text = self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
        s.reward = await self._score(prompt, s)
        return s

    async def _finish(self, prompt: Prompt, s: Sample, out) -> Sample:
        """A single-turn sample from its engine output, scored."""
        s.append(out.output_ids, out.logprobs, trainable=True)
        s.finish_reason, s.weight_version = out.finish_reason, out.weight_version
        s.weight_versions = [out.weight_version]
        s.response_text = self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
        s.reward = await self._score(prompt, s)
        return s

    async def _group_batched(self, prompt: Prompt, group_id: int, seed: Optional[int]) -> List[Sample]:
        """A single-turn group as one batch request (``engine.generate_batch``): the same samples,
        seeds and parameters as :meth:`_one` per index, one HTTP round trip instead of ``n``."""
        n = self.cfg.n_samples
        samples = [Sample(prompt_ids=list(prompt.prompt_ids), group_id=group_id, index=i, label=prompt.label)
                   for i in range(n)]
        params = [self.params(self.cfg.max_new_tokens, self.cfg.stop,
                              None if seed is None else sample_seed(seed, group_id, i, prompt.prompt_ids))
                  for i in range(n)]
        outs = await self.engine.generate_batch([s.prompt_ids for s in samples], params)
        return list(await asyncio.gather(*(self._finish(prompt, s, o) for s, o in zip(samples, outs, strict=True))))

    async def _score(self, prompt: Prompt, s: Sample) -> float:
        meta = dict(prompt.metadata)
        meta.update(finish_reason=s.finish_reason, num_turns=s.num_turns,
                    tool_statuses=s.metadata.get("tool_statuses", []))
        try:
            if self.reward_pool is not None:
                value, s.metadata["reward_status"] = await self.reward_pool.score(prompt.text, s.response_text,
                                                                                  prompt.label, meta)
                if s.metadata["reward_status"] == "error":
                    raise RuntimeError(f"in its worker process: {value}")
            else:
                value = self.reward_fn(prompt.text, s.response_text, prompt.label, meta)
                if inspect.isawaitable(value):
                    value = await value
            value = float(value)  # a reward past rollout.reward_timeout_s is 0.0 (status 'timeout')
            if not math.isfinite(value):
                raise ValueError(f"returned {value}")
            return value
        except Exception as e:  # noqa: BLE001 - the user's function: any failure scores the sample failed
            error = f"rollout.reward {self.cfg.reward!r} failed on sample {s.group_id}/{s.index}: " \
                    f"{type(e).__name__}: {e}"
            if self.cfg.reward_on_error == "stop":
                raise RewardError(error) from e
            logger.warning("%s; scored %g (rollout.reward_failed_value)", error, self.cfg.reward_failed_value)
            s.metadata["reward_error"] = error
            return float(self.cfg.reward_failed_value)

    async def generate_sample(self, prompt: Prompt, group_id: int, index: int, seed: Optional[int] = None) -> Sample:
        """Sample ``index`` of ``prompt``'s group, alone (the same seed as in :meth:`generate_group`)."""
        return await self._one(prompt, group_id, index, seed)

    async def generate_group(self, prompt: Prompt, group_id: int, seed: Optional[int] = None) -> List[Sample]:
        """``cfg.n_samples`` samples of one prompt (one GRPO group); single-turn groups go to an engine
        that has ``generate_batch`` (a Fleet, an EngineClient) as one batch request."""
        if not self.cfg.multi_turn.enabled and self.cfg.n_samples > 1 and hasattr(self.engine, "generate_batch"):
            return await self._group_batched(prompt, group_id, seed)
        return list(await asyncio.gather(*(self._one(prompt, group_id, i, seed) for i in range(self.cfg.n_samples))))

    async def generate(self, prompts: Sequence[Prompt], seed: Optional[int] = None) -> List[Sample]:
        """All groups of ``prompts``, group-major (samples of prompt g are g*n .. g*n+n-1).

        With ``seed`` set every request carries a derived ``sampling_seed``, so a rerun against
        the same weights reproduces the samples.
        """
        groups = await asyncio.gather(*(self.generate_group(p, g, seed) for g, p in enumerate(prompts)))
        samples = [s for grp in groups for s in grp]
        aborted = sum(s.finish_reason == "abort" for s in samples)
        if aborted:
            logger.warning("%d of %d samples finished with 'abort'", aborted, len(samples))
        return samples

    def close(self) -> None:
        """Stop the reward worker processes."""
        if self.reward_pool is not None:
            self.reward_pool.close()

    def generate_sync(self, prompts: Sequence[Prompt], seed: Optional[int] = None) -> List[Sample]:
        """Blocking wrapper of :meth:`generate` on the shared background loop (rollout.aio)."""
        return run_sync(self.generate(prompts, seed))
