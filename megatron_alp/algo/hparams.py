"""Which hyper-parameters each objective takes, and their range checks (torch-free, so the config
section can share it with :mod:`megatron_alp.algo.objectives`)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

# name -> (required hyper-parameters, optional hyper-parameters with their defaults; None = off)
_CLIP = ("eps_low", "eps_high")
HPARAMS: Dict[str, Tuple[Tuple[str, ...], Dict[str, Optional[float]]]] = {
    "bypass_token": (_CLIP, {"dual_clip": None}),
    "bypass_seq": (_CLIP, {"dual_clip": None}),
    "bypass_geo": (_CLIP, {"dual_clip": None}),
    "ppo": (_CLIP, {"dual_clip": None}),
    "mis_token": (_CLIP + ("is_low", "is_high"), {"dual_clip": None, "veto": None}),
    "mis_seq": (_CLIP + ("is_low", "is_high"), {"dual_clip": None, "veto": None}),
    "mis_seq_geo": (_CLIP + ("is_low", "is_high"), {"dual_clip": None, "veto": None}),
    "tis_token": (_CLIP + ("is_high",), {"dual_clip": None, "veto": None}),
    "tis_seq": (_CLIP + ("is_high",), {"dual_clip": None, "veto": None}),
    "dppo_tv": (("delta",), {"trunc": None}),
    "dppo_kl": (("delta",), {"trunc": None}),
    "drpo": (("delta",), {}),
    "spo": (("delta",), {}),
    "drpo_mask": (("delta", "dppo_delta"), {}),
}
OBJECTIVES = tuple(HPARAMS)
NEEDS_OLD_LOGP = frozenset({"ppo", "mis_token", "mis_seq", "mis_seq_geo", "tis_token", "tis_seq"})
SEQUENCE_LEVEL = frozenset({"bypass_seq", "bypass_geo", "mis_seq", "mis_seq_geo", "tis_seq"})
RATIO_OBJECTIVES = frozenset(
    {"bypass_token", "bypass_seq", "bypass_geo", "ppo", "mis_token", "mis_seq", "mis_seq_geo", "tis_token", "tis_seq"}
)
DRPO_FAMILY = frozenset({"drpo", "spo", "drpo_mask"})
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def hparam_error(hp: dict, prefix: str = "") -> Optional[str]:
    """A message naming the first out-of-range hyper-parameter in ``hp`` (None when all are fine).

    ``prefix`` is put before each name (the config passes ``"algorithm."``).
    """
    g = hp.get

    def n(k: str) -> str:
        return prefix + k

    if g("eps_low") is not None and not 0.0 <= g("eps_low") <= 1.0:
        return f"{n('eps_low')} must be in [0, 1], got {g('eps_low')}"
    if g("eps_high") is not None and g("eps_high") < 0:
        return f"{n('eps_high')} must be >= 0, got {g('eps_high')}"
    if g("dual_clip") is not None and g("dual_clip") <= 1.0:
        return f"{n('dual_clip')} must be > 1 (or null), got {g('dual_clip')}"
    for k in ("delta", "dppo_delta", "is_high"):
        if g(k) is not None and g(k) <= 0:
            return f"{n(k)} must be > 0, got {g(k)}"
    if g("is_low") is not None and g("is_high") is not None and not 0.0 <= g("is_low") < g("is_high"):
        return f"{n('is_low')} must be in [0, {n('is_high')} = {g('is_high')}), got {g('is_low')}"
    for k in ("veto", "trunc"):
        if g(k) is not None and g(k) <= 0:
            return f"{n(k)} must be > 0 (or null), got {g(k)}"
    return None


def check_hparams(objective: str, hparams: dict) -> dict:
    """Validate the keyword hyper-parameters of ``objective``; return them with optional defaults filled.

    Unknown objective -> ValueError; unknown or missing keyword -> TypeError naming it; a value out
    of range -> ValueError naming it.
    """
    if objective not in HPARAMS:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    required, optional = HPARAMS[objective]
    unknown = sorted(set(hparams) - set(required) - set(optional))
    if unknown:
        raise TypeError(
            f"objective {objective!r} got unknown hyper-parameter(s) {unknown}; "
            f"it takes {list(required) + list(optional)}"
        )
    missing = [k for k in required if hparams.get(k) is None]
    if missing:
        raise TypeError(f"objective {objective!r} is missing required hyper-parameter(s) {missing}")
    hp = {**optional, **hparams}
    for k, v in hp.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(f"hyper-parameter {k!r} of {objective!r} must be a number, got {v!r}")
    bad = hparam_error(hp)
    if bad:
        raise ValueError(f"objective {objective!r}: {bad}")
    return hp
