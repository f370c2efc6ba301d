"""Divergence-based objectives: DPPO (binary TV / KL hard mask) and DRPO with its variants SPO and
Mask-DRPO (ALGORITHMS.md sections 3-4). All anchored on the rollout policy ``mu``.

Pure tensor functions on sanitised ``[B, T]`` inputs (see :mod:`megatron_alp.algo.objectives`).
Ideas from the DPPO paper / ``sail-sg/Stable-RL`` and the DRPO paper / ``Tencent-Hunyuan/UniRL``
(``unirl/algorithms/drpo.py``); the code is ours.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ratio import LOG_RATIO_CLAMP


def harmful_direction(advantages: torch.Tensor, prob_diff: torch.Tensor) -> torch.Tensor:
    """True where the policy moved the way the advantage pushes it (``A > 0, pi > mu`` or ``A < 0, pi < mu``)."""
    return ((advantages > 0) & (prob_diff > 0)) | ((advantages < 0) & (prob_diff < 0))


def binary_kl(logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(q) || Bern(p)) = q log(q/p) + (1-q) log((1-q)/(1-p))`` with ``q = mu``, ``p = pi``.

    Computed from log-probs with ``expm1`` and ``xlogy`` so that ``q = 1`` gives 0 for the second
    term and ``p = 1 > q`` gives ``+inf`` (never NaN).
    """
    q = rollout_logp.exp()
    one_m_q = -torch.expm1(rollout_logp)
    one_m_p = -torch.expm1(logp)
    return q * (rollout_logp - logp) + torch.xlogy(one_m_q, one_m_q) - torch.xlogy(one_m_q, one_m_p)


def dppo_invalid(
    divergence: str, logp: torch.Tensor, rollout_logp: torch.Tensor, advantages: torch.Tensor, delta: float
) -> torch.Tensor:
    """DPPO's hard mask (boolean ``[B, T]``): tokens beyond the trust region *and* moving the harmful way.

    ``tv``: ``(A > 0 and pi - mu > delta) or (A < 0 and pi - mu < -delta)``.
    ``kl``: ``binary_kl(pi, mu) > delta`` and harmful direction.
    """
    with torch.no_grad():
        lp, lmu = logp.detach(), rollout_logp.detach()
        diff = lp.exp() - lmu.exp()
        harmful = harmful_direction(advantages, diff)
        if divergence == "tv":
            return harmful & (diff.abs() > delta)
        if divergence == "kl":
            return harmful & (binary_kl(lp, lmu) > delta)
    raise ValueError(f"unknown DPPO divergence {divergence!r} (expected 'tv' or 'kl')")


def dppo_loss(
    divergence: str,
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    delta: float,
    trunc: Optional[float],
) -> torch.Tensor:
    """``L_t = -A * sg(min(pi/mu, C)) * (1 - invalid_t) * lp_t`` (section 3; ``C = trunc``, None = off).

    The log-ratio is clamped to [-20, 20] before ``exp`` like every other objective's (the DPPO
    reference, sail-sg/Stable-RL ``verl/trainer/ppo/core_algos.py`` @c6af1d1, clamps it at max 20
    before its ``clip_ratio_c`` cap); unclamped, ``exp`` overflows to inf and ``inf * 0`` on a
    masked token is NaN. It is detached, so its gradient is ``-A sg(r) (1 - invalid)`` w.r.t. ``lp``.
    """
    invalid = dppo_invalid(divergence, logp, rollout_logp, advantages, delta)
    ratio = (logp.detach() - rollout_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    if trunc is not None:
        ratio = ratio.clamp(max=trunc)
    keep = (~invalid).to(logp.dtype)
    return -advantages * ratio * keep * logp


def drpo_ratio(logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """Differentiable ``r = pi/mu`` with the log-ratio clamped to [-20, 20] (section 4)."""
    return (logp - rollout_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()


def drpo_loss(
    variant: str,
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    delta: float,
    dppo_delta: Optional[float] = None,
) -> torch.Tensor:
    """Per-token DRPO-family loss (section 4).

    - ``drpo``: ``-A r + |A| sg(mu) (r - 1)^2 / (2 delta)``; its gradient w.r.t. ``lp`` is
      ``-A r w_t`` with ``w_t = 1 - sign(A (r - 1)) |pi - mu| / delta``.
    - ``spo``: the same without the ``mu`` factor: ``-A r + |A| (r - 1)^2 / (2 delta)``.
    - ``drpo_mask``: the DRPO penalty only on tokens outside the DPPO trust region
      ``|pi - mu| <= dppo_delta`` (our reading of Mask-DRPO: the region is symmetric, as DPPO's
      binary-TV region is; the indicator is detached).
    """
    r = drpo_ratio(logp, rollout_logp)
    mu = rollout_logp.detach().exp()
    quad = (r - 1.0).square() / (2.0 * delta)
    if variant == "drpo":
        penalty = advantages.abs() * mu * quad
    elif variant == "spo":
        penalty = advantages.abs() * quad
    elif variant == "drpo_mask":
        if dppo_delta is None:
            raise ValueError("drpo_mask needs the hyper-parameter 'dppo_delta'")
        outside = ((logp.detach().exp() - mu).abs() > dppo_delta).to(r.dtype)
        penalty = advantages.abs() * mu * quad * outside
    else:
        raise ValueError(f"unknown DRPO variant {variant!r} (expected 'drpo', 'spo' or 'drpo_mask')")
    return -advantages * r + penalty


def drpo_weight(
    variant: str,
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    delta: float,
    dppo_delta: Optional[float] = None,
) -> torch.Tensor:
    """The per-token gradient weight ``w_t`` (``d L / d lp = -A r w_t``) of a DRPO-family loss, detached.

    ``drpo``: ``1 - sign(A (r-1)) |pi - mu| / delta``; ``spo``: ``1 - sign(A (r-1)) |r - 1| / delta``;
    ``drpo_mask``: the DRPO weight outside the region ``|pi - mu| <= dppo_delta``, 1 inside.
    """
    with torch.no_grad():
        lp, lmu = logp.detach(), rollout_logp.detach()
        r = drpo_ratio(lp, lmu)
        sign = torch.sign(advantages * (r - 1.0))
        diff = (lp.exp() - lmu.exp()).abs()
        if variant == "spo":
            return 1.0 - sign * (r - 1.0).abs() / delta
        w = 1.0 - sign * diff / delta
        if variant == "drpo":
            return w
        if variant == "drpo_mask":
            return torch.where(diff > dppo_delta, w, torch.ones_like(w))
    raise ValueError(f"unknown DRPO variant {variant!r} (expected 'drpo', 'spo' or 'drpo_mask')")
