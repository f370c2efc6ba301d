"""The ``eval`` config section: which benchmarks, how many samples, which sampling settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from ..config import RolloutConfig


@dataclass
class EvalConfig:
    """Benchmark evaluation, offline (tools/eval.py) and during training (docs/eval.md)."""

    datasets: List[str] = field(default_factory=list)
    """Benchmark files, each ``PATH`` or ``NAME=PATH``; NAME picks the registry entry (its fields),
    else the file name does (rollout/eval/benchmarks.py)."""
    interval: int = 0
    """During training: evaluate the current bus version every N steps (0 = never between steps)."""
    at_start: bool = False
    """During training: evaluate the starting weights before the first step."""
    final: bool = True
    """During training: evaluate after the last step (when `datasets` is set)."""
    n: int = 16
    """Samples per problem (avg@n, pass@k for k <= n)."""
    pass_k: List[int] = field(default_factory=list)
    """Extra k for the short table and TensorBoard (pass@k for every k <= n is always in the CSV)."""
    temperature: float = 1.0
    """Sampling temperature of evaluation."""
    top_p: float = 1.0
    """Nucleus sampling of evaluation."""
    max_new_tokens: int = 0
    """Response tokens per turn (0 = rollout.max_new_tokens)."""
    max_response_len: int = 0
    """Multi-turn: budget of all response tokens of a sample (0 = rollout.multi_turn.max_response_len)."""
    max_prompt_len: int = 0
    """Prompts longer than this are dropped and counted (0 = rollout.data.max_prompt_len)."""
    prompt_key: str = "problem"
    """Question field of a benchmark outside the registry (dotted keys reach into nested records)."""
    label_key: str = "answer"
    """Answer field of a benchmark outside the registry."""
    instruction: Optional[str] = None
    """Text appended to every question (after a space), e.g. the reference's boxed-answer request."""
    correct_threshold: float = 1.0
    """A sample counts as correct for pass@k when its reward is >= this (math rewards are 0/1)."""
    max_problems: int = 0
    """Use only the first N problems of each benchmark (0 = all); for quick evals during training."""
    seed: int = 0
    """Sampling seed base (every request carries a derived `sampling_seed`)."""

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"eval.n must be >= 1, got {self.n}")
        for name in ("interval", "max_new_tokens", "max_response_len", "max_prompt_len", "max_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"eval.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.top_p}")
        bad = [k for k in self.pass_k if not 1 <= k <= self.n]
        if bad:
            raise ValueError(f"eval.pass_k = {bad}: pass@k needs 1 <= k <= eval.n = {self.n} samples per problem")


@dataclass
class EvalJobConfig:
    """What tools/eval.py reads (configs/eval/*.yaml): the rollout settings and the eval section."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Engines, chat template, stop tokens, multi-turn tool loop, reward: as in training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmarks and sampling."""
