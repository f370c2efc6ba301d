"""The `rollout` config section (the rollout package owns it; the trainer's tree embeds it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional


@dataclass
class RolloutConfig:
    engine: Literal["local", "sglang"] = "local"
    """Which engine serves generation: the CPU development engine or SGLang servers."""
    urls: List[str] = field(default_factory=list)
    """Attach to running engines at these URLs instead of launching them."""
    num_engines: int = 1
    """How many engines to launch when `urls` is empty."""
    host: str = "127.0.0.1"
    """Bind address of launched engines (localhost unless configured otherwise)."""
    api_key: Optional[str] = None
    """API key required by weight-update endpoints (mandatory when host is not localhost)."""
    n_samples: int = 8
    """Samples per prompt (GRPO group size)."""
    max_new_tokens: int = 64
    """Maximum response tokens per turn."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are computed at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 biases the ratio (ALGORITHMS.md top-p note) and warns."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "bf16"
    """Engine weight precision (fp8 = blockwise e4m3 weights, emulated on CPU)."""
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = "auto"
    """KV cache dtype passed to SGLang."""

    def validate(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"rollout.n_samples must be >= 1, got {self.n_samples}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.api_key:
            raise ValueError(f"rollout.host = {self.host} exposes the engines: set rollout.api_key")
