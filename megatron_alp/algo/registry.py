"""The one table of RL objectives: name -> family (which loss function), granularity,
hyper-parameters, whether it needs pi_old. Torch-free, so the config section can use it.

The loss of each family is in :mod:`megatron_alp.algo.objectives` (``token_losses``), its metrics
in :mod:`megatron_alp.algo.metrics`; docs/objectives.md tabulates the objectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

_CLIP = ("eps_low", "eps_high")


@dataclass(frozen=True)
class Objective:
    name: str
    family: str
    """``bypass`` (clip of pi/mu), ``ppo`` (clip of pi/pi_old), ``mis``/``tis`` (ppo times a masked /
    truncated pi_old/mu weight), ``dppo`` (divergence-masked), ``drpo`` (divergence-regularised)."""
    kind: str
    """The family's variant: ratio level (token, seq, geo), divergence (tv, kl) or the drpo variant."""
    required: Tuple[str, ...]
    """Hyper-parameters the loss needs."""
    optional: Dict[str, Optional[float]] = field(default_factory=dict)
    """Hyper-parameters with their defaults (None = off)."""
    needs_old_logp: bool = False
    """The loss uses pi_old (the recomputed no-grad log-probs): ``algorithm.recompute_old_logp``."""

    @property
    def sequence_level(self) -> bool:
        """A non-finite token drops its whole sequence (the sequence ratio is undefined)."""
        return self.kind in ("seq", "geo")

    @property
    def clips_ratio(self) -> bool:
        """A PPO-clipped ratio objective (clip fractions are measured)."""
        return self.family in ("bypass", "ppo", "mis", "tis")

    @property
    def hparam_names(self) -> Tuple[str, ...]:
        return (*self.required, *self.optional)


def _ratio(name: str, family: str, kind: str, extra: Tuple[str, ...] = (), veto: bool = False) -> Objective:
    optional = {"dual_clip": None, "veto": None} if veto else {"dual_clip": None}
    return Objective(name, family, kind, _CLIP + extra, optional, needs_old_logp=family != "bypass")


REGISTRY: Dict[str, Objective] = {o.name: o for o in (
    _ratio("bypass_token", "bypass", "token"),
    _ratio("bypass_seq", "bypass", "seq"),
    _ratio("bypass_geo", "bypass", "geo"),
    _ratio("ppo", "ppo", "token"),
    _ratio("mis_token", "mis", "token", ("is_low", "is_high"), veto=True),
    _ratio("mis_seq", "mis", "seq", ("is_low", "is_high"), veto=True),
    # GSPO as verl's recipe runs it: geometric sequence ratio vs pi_old x sequence-level MIS weight
    _ratio("mis_seq_geo", "mis", "geo", ("is_low", "is_high"), veto=True),
    _ratio("tis_token", "tis", "token", ("is_high",), veto=True),
    _ratio("tis_seq", "tis", "seq", ("is_high",), veto=True),
    Objective("dppo_tv", "dppo", "tv", ("delta",), {"trunc": None}),
    Objective("dppo_kl", "dppo", "kl", ("delta",), {"trunc": None}),
    Objective("drpo", "drpo", "drpo", ("delta",)),
    Objective("spo", "drpo", "spo", ("delta",)),
    Objective("drpo_mask", "drpo", "drpo_mask", ("delta", "dppo_delta")),
)}
OBJECTIVES: Tuple[str, ...] = tuple(REGISTRY)


def objective(name: str) -> Objective:
    """The registry entry of ``name``; ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}") from None
