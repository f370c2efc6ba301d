"""The rollout side of the RL loop, run by the driver (global rank 0).

It owns the tokenizer, the prompt stream, the engines it launched (stopped by pid at the end),
the fleet and the generator, and turns one rollout into a padded trainer batch plus the
``rollout/`` metrics. Weight sync (``sync``) goes through the checkpoint bus only.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Dict, Optional, Tuple

import torch

from ..algo.advantages import compute_advantages
from .batch import RLBatch
from .batching import collate, seq_pad_multiple
from .group_log import GroupLog

logger = logging.getLogger(__name__)


class RolloutDriver:
    def __init__(self, cfg, run_dir: str, tokenizer_path: str, engine_model_path: str, engine_version=None):
        """``engine_version``: the weight version of ``engine_model_path``; engines this driver
        launches report it (``--weight-version``) until the first update, so that staleness is
        right from the first (resumed) rollout."""
        import dataclasses

        from transformers import AutoTokenizer

        from rollout.data import PromptStream, load_prompts
        from rollout.engines.start import make_fleet, start_engines
        from rollout.generate import RolloutGenerator

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        prompts = load_prompts(cfg.rollout.data, self.tokenizer)
        self.stream = PromptStream(prompts, seed=cfg.run.seed)
        log_dir = cfg.rollout.log_dir or os.path.join(run_dir, "engines")
        if cfg.rollout.urls:
            logger.info("attaching to %d running rollout engine(s): %s", len(cfg.rollout.urls), cfg.rollout.urls)
        else:
            logger.info("starting rollout engines (%s x%d) on %s", cfg.rollout.engine, cfg.rollout.num_engines,
                        engine_model_path)
        rollout_cfg = cfg.rollout if engine_version is None else \
            dataclasses.replace(cfg.rollout, weight_version=str(engine_version))
        self.engines = start_engines(rollout_cfg, model_path=engine_model_path, log_dir=log_dir)
        try:
            self.fleet = make_fleet(cfg.rollout, self.engines)
            self.generator = RolloutGenerator(self.fleet, self.tokenizer, cfg.rollout)
        except BaseException:
            self.engines.stop()
            raise
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.producer = None  # asynchronous rollout (rollout.max_staleness >= 1), started on first use
        self.group_log = GroupLog(os.path.join(run_dir, "rollout", "trained_groups.jsonl"))

    def rollout(self, step: int, weight_version: int) -> Tuple[RLBatch, Dict[str, float]]:
        """Generate ``prompts_per_step x n_samples`` samples, score them, compute advantages."""
        from rollout.aio import submit

        cfg = self.cfg
        if cfg.rollout.max_staleness > 0:
            return self._rollout_async(step, weight_version)
        prompts = self.stream.next_batch(cfg.run.prompts_per_step)
        t0 = time.perf_counter()
        future = submit(self.generator.generate(prompts, seed=cfg.rollout.seed + step))
        try:
            samples = future.result()
        except BaseException:  # abandoned (a stop signal) or failed: no request keeps running
            future.cancel()
            raise
        dt = time.perf_counter() - t0
        stale = []
        for s in samples:
            try:
                stale.append(weight_version - int(s.weight_version))
            except (TypeError, ValueError):
                pass
        n = cfg.rollout.n_samples
        self.group_log.write(step, [(g, p.index, [s.weight_version for s in samples[g * n:(g + 1) * n]])
                                    for g, p in enumerate(prompts)])
        return self._batch(samples), self._metrics(samples, dt, stale)

    def _batch(self, samples) -> RLBatch:
        cfg = self.cfg
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        adv = compute_advantages(rewards, cfg.algorithm.advantage, group_size=cfg.rollout.n_samples,
                                 eps=cfg.algorithm.advantage_eps)
        return collate(samples, adv, pad_id=self.pad_id, pad_multiple=seq_pad_multiple(cfg.parallel, cfg.precision))

    def _rollout_async(self, step: int, version: int) -> Tuple[RLBatch, Dict[str, float]]:
        """Step ``step``'s groups from the producer (generated while earlier steps trained)."""
        from rollout.producer import GroupProducer, sample_oldest_version

        cfg = self.cfg
        if self.producer is None:
            self.producer = GroupProducer(self.generator, self.stream, prompts_per_step=cfg.run.prompts_per_step,
                                          max_staleness=cfg.rollout.max_staleness, seed=cfg.rollout.seed,
                                          start_step=step, span_policy=cfg.rollout.span_policy)
            self.producer.start(version)
        else:
            self.producer.set_version(version)
        t0 = time.perf_counter()
        groups = self.producer.take(step)
        waited = time.perf_counter() - t0
        samples = [s for g in groups for s in g.samples]
        keep = self.producer.keep_spanning
        # Staleness of a trained sample: this step minus the oldest version that produced its tokens.
        stale = [step - sample_oldest_version(s, g.issued_version, keep) for g in groups for s in g.samples]
        self.group_log.write(step, [(g.group_id, g.prompt_index, [s.weight_version for s in g.samples],
                                     g.version, g.issued_version) for g in groups])
        # perf/rollout_s is what the step waited for its batch (generation overlapped training);
        # perf/rollout_gen_s spans this step's generation, first group issued to last finished.
        metrics = self._metrics(samples, waited, stale)
        metrics.pop("perf/rollout_tokens_per_s")
        metrics["perf/rollout_gen_s"] = max(g.extra["t_end"] for g in groups) - min(g.extra["t_start"] for g in groups)
        metrics.update({"rollout/stale_regenerated_groups": float(sum(g.regenerated for g in groups)),
                        "rollout/resampled_for_one_version": float(sum(g.extra["resampled"] for g in groups)),
                        "rollout/group_version_min": float(min(g.version for g in groups))})
        return self._batch(samples), metrics

    def _metrics(self, samples, seconds: float, stale) -> Dict[str, float]:
        from rollout.generate import reward_failures

        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        n_tok = [s.num_model_tokens for s in samples]
        lengths = [len(s.response_ids) for s in samples]
        from rollout.tool_metrics import tool_metrics

        groups = rewards.view(-1, self.cfg.rollout.n_samples)
        return {
            **tool_metrics(samples, self.cfg.rollout.multi_turn.enabled),
            "rollout/reward_mean": rewards.mean().item(),
            "rollout/reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "rollout/reward_hist": rewards.tolist(),
            "rollout/pass_rate": (rewards >= 1.0).double().mean().item(),
            "rollout/group_all_same_frac": (groups.std(dim=1) == 0).double().mean().item(),
            "rollout/response_len_mean": sum(lengths) / len(lengths),
            "rollout/response_len_max": float(max(lengths)),
            "rollout/truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "rollout/reward_failures": float(reward_failures(samples)),  # definition: rollout.generate
            "rollout/num_samples": float(len(samples)),
            "rollout/staleness_mean": (sum(stale) / len(stale)) if stale else math.nan,
            "rollout/staleness_max": float(max(stale)) if stale else math.nan,
            "rollout/staleness_hist": [float(x) for x in stale],
            "perf/rollout_s": seconds,
            "perf/rollout_tokens_per_s": sum(n_tok) / max(seconds, 1e-9),
        }

    def state_dict(self, next_step: Optional[int] = None) -> Dict:
        """What a resume needs to continue the rollout where it stopped: the prompt stream's position
        before ``next_step``'s prompts (asynchronous rollout has drawn prompts ahead; they are drawn,
        and generated, again after a resume)."""
        if self.producer is not None and next_step is not None:
            return {"stream": self.producer.stream_state(next_step)}
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.stream.load_state_dict(state["stream"])

    def close(self) -> None:
        from rollout.aio import run_sync

        if self.producer is not None:
            self.producer.close()
        try:
            run_sync(self.fleet.close(), timeout=30)
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.exception("closing the fleet failed")
        self.generator.close()
        self.engines.stop()
