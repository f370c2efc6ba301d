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
from typing import Dict, Tuple

import torch

from ..algo.advantages import compute_advantages
from .batch import RLBatch
from .batching import collate, seq_pad_multiple

logger = logging.getLogger(__name__)


class RolloutDriver:
    def __init__(self, cfg, run_dir: str, tokenizer_path: str, engine_model_path: str):
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
        self.engines = start_engines(cfg.rollout, model_path=engine_model_path, log_dir=log_dir)
        try:
            self.fleet = make_fleet(cfg.rollout, self.engines)
            self.generator = RolloutGenerator(self.fleet, self.tokenizer, cfg.rollout)
        except BaseException:
            self.engines.stop()
            raise
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def rollout(self, step: int, weight_version: int) -> Tuple[RLBatch, Dict[str, float]]:
        """Generate ``prompts_per_step x n_samples`` samples, score them, compute advantages."""
        from rollout.aio import submit

        cfg = self.cfg
        prompts = self.stream.next_batch(cfg.run.prompts_per_step)
        t0 = time.perf_counter()
        future = submit(self.generator.generate(prompts, seed=cfg.rollout.seed + step))
        try:
            samples = future.result()
        except BaseException:  # abandoned (a stop signal) or failed: no request keeps running
            future.cancel()
            raise
        dt = time.perf_counter() - t0
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        adv = compute_advantages(rewards, cfg.algorithm.advantage, group_size=cfg.rollout.n_samples,
                                 eps=cfg.algorithm.advantage_eps)
        batch = collate(samples, adv, pad_id=self.pad_id, pad_multiple=seq_pad_multiple(cfg.parallel, cfg.precision))
        return batch, self._metrics(samples, rewards, dt, weight_version)

    def _metrics(self, samples, rewards: torch.Tensor, seconds: float, version: int) -> Dict[str, float]:
        from rollout.generate import reward_failures

        n_tok = [s.num_model_tokens for s in samples]
        lengths = [len(s.response_ids) for s in samples]
        stale = []
        for s in samples:
            try:
                stale.append(version - int(s.weight_version))
            except (TypeError, ValueError):
                pass
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
            "perf/rollout_s": seconds,
            "perf/rollout_tokens_per_s": sum(n_tok) / max(seconds, 1e-9),
        }

    def state_dict(self) -> Dict:
        """What a resume needs to continue the rollout where it stopped (the prompt stream's position)."""
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.stream.load_state_dict(state["stream"])

    def close(self) -> None:
        from rollout.aio import run_sync

        try:
            run_sync(self.fleet.close(), timeout=30)
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.exception("closing the fleet failed")
        self.generator.close()
        self.engines.stop()
