"""The `algorithm` config section: which objective, its hyper-parameters, advantages, aggregation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

OBJECTIVES = (
    "bypass_token", "bypass_seq", "bypass_geo", "ppo",
    "mis_token", "mis_seq", "tis_token", "tis_seq",
    "dppo_tv", "dppo_kl", "drpo", "spo", "drpo_mask",
)


@dataclass
class AlgorithmConfig:
    objective: Literal[
        "bypass_token", "bypass_seq", "bypass_geo", "ppo",
        "mis_token", "mis_seq", "tis_token", "tis_seq",
        "dppo_tv", "dppo_kl", "drpo", "spo", "drpo_mask",
    ] = "bypass_token"
    """Per-token objective (ALGORITHMS.md sections 1-4); see docs/objectives.md."""
    eps_low: float = 0.2
    """Lower clip range of the ratio (ratio kept >= 1 - eps_low)."""
    eps_high: float = 0.28
    """Upper clip range of the ratio (ratio kept <= 1 + eps_high)."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c for A < 0 (None = off)."""
    is_low: float = 0.0
    """MIS: lower bound of the kept importance weight pi_old/mu."""
    is_high: float = 2.0
    """MIS: upper bound; TIS: truncation value of pi_old/mu."""
    veto: Optional[float] = None
    """Drop a whole sequence if any token's pi_old/mu is below this (None = off)."""
    delta: float = 0.15
    """DPPO divergence threshold / DRPO and SPO penalty scale."""
    dppo_delta: float = 0.15
    """drpo_mask: the DPPO region outside which the DRPO penalty applies."""
    trunc: Optional[float] = None
    """DPPO ratio cap C (None = off)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses are reduced (global normalisers across micro-batches and DP ranks)."""
    horizon: Optional[int] = None
    """Fixed horizon H for seq-mean-token-sum-norm."""
    advantage: Literal["grpo", "grpo_no_std"] = "grpo"
    """GRPO group normalisation with or without the std division (Dr.GRPO/DRPO)."""
    kl_coef: float = 0.0
    """Coefficient of the KL loss to the reference policy (0 = no reference forward)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator for the KL loss."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    recompute_old_logp: bool = False
    """Run the extra no-grad forward for pi_old (needed by ppo, mis_*, tis_*)."""

    def validate(self) -> None:
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"algorithm.eps_low/eps_high must be >= 0, got {self.eps_low}/{self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"algorithm.dual_clip must be > 1 (or null), got {self.dual_clip}")
        if self.aggregation == "seq-mean-token-sum-norm" and not self.horizon:
            raise ValueError("algorithm.aggregation = seq-mean-token-sum-norm needs algorithm.horizon")
        if self.objective in ("ppo", "mis_token", "mis_seq", "tis_token", "tis_seq") and not self.recompute_old_logp:
            raise ValueError(
                f"algorithm.objective = {self.objective} needs pi_old: set algorithm.recompute_old_logp = true"
            )
        if self.delta <= 0:
            raise ValueError(f"algorithm.delta must be > 0, got {self.delta}")
