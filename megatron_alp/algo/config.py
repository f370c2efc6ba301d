"""The `algorithm` config section: which objective, its hyper-parameters, advantages, aggregation.

Orthogonal to the `alp` section (perturbation on/off): Token-ALP is ``alp.enabled: true`` with
``algorithm.objective: bypass_token``. Presets per paper variant live in ``configs/algo/``; the
objectives and their defaults are tabulated in ``docs/objectives.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .hparams import hparam_error
from .registry import OBJECTIVES
from .registry import objective as lookup


@dataclass
class AlgorithmConfig:
    objective: Literal[OBJECTIVES] = "bypass_token"
    """Per-token objective (ALGORITHMS.md sections 1-4); see docs/objectives.md."""
    eps_low: float = 0.2
    """Ratio objectives (bypass_*, ppo, mis_*, tis_*): lower clip range (ratio kept >= 1 - eps_low); in [0, 1]."""
    eps_high: float = 0.28
    """Ratio objectives: upper clip range (ratio kept <= 1 + eps_high)."""
    dual_clip: Optional[float] = None
    """Ratio objectives: dual-clip constant c > 1 capping the loss at -A c where A < 0 (null = off)."""
    is_low: float = 0.0
    """mis_*: lower bound of the kept importance weight pi_old/mu (0 = no lower bound)."""
    is_high: float = 2.0
    """mis_*: upper bound of the kept weight; tis_*: truncation value of pi_old/mu."""
    veto: Optional[float] = None
    """mis_*/tis_*: drop a whole sequence if any token's pi_old/mu is below this, e.g. 1e-4 (null = off)."""
    delta: float = 0.15
    """dppo_tv/dppo_kl: divergence threshold; drpo/drpo_mask: penalty scale delta; spo: its epsilon."""
    dppo_delta: float = 0.15
    """drpo_mask: half-width of the DPPO region |pi - mu| <= dppo_delta outside which the penalty applies;
    also the boundary of the metric drpo/beyond_dppo_frac for every objective."""
    trunc: Optional[float] = None
    """dppo_*: ratio cap C of the detached weight min(pi/mu, C) (null = off; the DPPO authors use 10000)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses are reduced (global normalisers across micro-batches and DP ranks)."""
    horizon: Optional[int] = None
    """Fixed horizon H for seq-mean-token-sum-norm (the DRPO recipe uses 8192)."""
    advantage: Literal["grpo", "grpo_no_std"] = "grpo"
    """GRPO group normalisation with or without the std division (Dr.GRPO/DRPO)."""
    advantage_eps: float = 1e-6
    """Added to the group std before dividing (grpo)."""
    kl_coef: float = 0.0
    """Coefficient of the KL loss to the reference policy (0 = no reference forward)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator for the KL loss (k3 = verl's low_var_kl)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    recompute_old_logp: bool = False
    """Run the extra no-grad forward for pi_old (needed by ppo, mis_*, tis_*; optional diagnostics otherwise)."""

    def objective_hparams(self) -> dict:
        """The keyword hyper-parameters of the configured objective, exactly as ``token_losses`` takes them."""
        return {k: getattr(self, k) for k in lookup(self.objective).hparam_names}

    def validate(self) -> None:
        # Every hyper-parameter field is range-checked, also those the chosen objective ignores.
        fields = ("eps_low", "eps_high", "dual_clip", "is_low", "is_high", "veto", "delta", "dppo_delta", "trunc")
        bad = hparam_error({k: getattr(self, k) for k in fields}, prefix="algorithm.")
        if bad:
            raise ValueError(f"{bad} (algorithm.objective = {self.objective})")
        if self.aggregation == "seq-mean-token-sum-norm" and not self.horizon:
            raise ValueError("algorithm.aggregation = seq-mean-token-sum-norm needs algorithm.horizon")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"algorithm.horizon must be >= 1 (or null), got {self.horizon}")
        if lookup(self.objective).needs_old_logp and not self.recompute_old_logp:
            raise ValueError(
                f"algorithm.objective = {self.objective} needs pi_old: set algorithm.recompute_old_logp = true"
            )
        if self.advantage_eps <= 0:
            raise ValueError(f"algorithm.advantage_eps must be > 0, got {self.advantage_eps}")
        if self.kl_coef < 0:
            raise ValueError(f"algorithm.kl_coef must be >= 0, got {self.kl_coef}")
