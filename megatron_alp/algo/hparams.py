"""Range checks of the objectives' hyper-parameters (which objective takes which is in
:mod:`.registry`); torch-free, so the config section can share it with the objectives."""

from __future__ import annotations

from typing import Optional

from .registry import objective as lookup

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
    spec = lookup(objective)
    required, optional = spec.required, spec.optional
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
