"""Ratio objectives: log-ratios (token / straight-through sequence / geometric), the PPO clip with
dual clip, and the rollout importance weights of the decoupled objectives (ALGORITHMS.md 1-2).

Pure tensor functions on ``[B, T]`` inputs whose invalid positions have already been zeroed and
masked by :func:`megatron_alp.algo.objectives.token_losses`; ``valid`` is the boolean mask of the
tokens that count. Nothing here reduces across processes.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .registry import objective as lookup

# ALGORITHMS.md section 1: log rho is clamped to [-20, 20] before exp (the reference does the same).
LOG_RATIO_CLAMP = 20.0


def sequence_log_ratio(log_ratio: torch.Tensor, valid: torch.Tensor, geometric: bool = False) -> torch.Tensor:
    """``S_i = sum_t m_t log_ratio_t`` per row (``[B]``); the geometric mean divides by the token count."""
    s = (log_ratio * valid).sum(dim=-1)
    if geometric:
        s = s / valid.sum(dim=-1).clamp(min=1).to(s.dtype)
    return s


def policy_log_ratio(kind: str, logp: torch.Tensor, anchor_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token ``log rho`` (not yet clamped) of a ratio objective against ``anchor_logp``.

    - ``token``: ``lp_t - l_anchor_t``.
    - ``seq`` / ``geo``: the straight-through form ``sg(S_i) + lp_t - sg(lp_t)``: its value is the
      sequence log-ratio (full sum, or geometric mean for ``geo`` as in GSPO), its gradient w.r.t.
      ``lp_t`` is 1 (the token score). The idea is the ALP reference's ``compute_policy_loss_perturbed``
      (and GSPO's sequence ratio); the code is ours.
    """
    diff = logp - anchor_logp
    if kind == "token":
        return diff
    if kind in ("seq", "geo"):
        s = sequence_log_ratio(diff.detach(), valid, geometric=(kind == "geo"))
        return s.unsqueeze(-1) + logp - logp.detach()
    raise ValueError(f"unknown ratio kind {kind!r} (expected 'token', 'seq' or 'geo')")


def loss_log_ratio(
    objective: str, logp: torch.Tensor, rollout_logp: torch.Tensor, old_logp: Optional[torch.Tensor],
    valid: torch.Tensor,
) -> torch.Tensor:
    """Per-token ``log rho`` (not yet clamped) that a ratio objective's PPO clip sees.

    ``bypass_<kind>``: :func:`policy_log_ratio` against the rollout log-probs; ``mis_seq_geo``
    (GSPO as the ALP reference's ``train_gspo.sh`` runs it: ``ppo_is_geometric=True``): the
    geometric-mean sequence ratio against the recomputed ``pi_old``; the other decoupled objectives
    (``ppo``, ``mis_*``, ``tis_*``): the token ratio ``lp - lold``.
    """
    spec = lookup(objective)
    if spec.family == "bypass":
        return policy_log_ratio(spec.kind, logp, rollout_logp, valid)
    if spec.kind == "geo":
        return policy_log_ratio("geo", logp, old_logp, valid)
    return logp - old_logp


def ppo_clip_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: Optional[float],
) -> torch.Tensor:
    """Per-token PPO-clip loss (to minimise) with optional dual clip, ALGORITHMS.md section 1.

    ``rho = exp(clamp(log_ratio, -20, 20))``; ``Lc = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high))``;
    where ``A < 0`` and ``dual_clip = c`` is set: ``L = min(Lc, -A c)``.
    """
    rho = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    loss = torch.maximum(-advantages * rho, -advantages * rho.clamp(1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss


def importance_weight(
    level: str,
    mode: str,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    valid: torch.Tensor,
    *,
    is_low: float = 0.0,
    is_high: float,
    veto: Optional[float] = None,
) -> Tuple[torch.Tensor, dict]:
    """Detached rollout-correction weight ``w = pi_old / mu`` per token (``[B, T]``), section 2.

    ``level``: ``token`` (``exp(lold_t - lmu_t)``) or ``seq`` (``exp(sum_t m_t (lold_t - lmu_t))``
    broadcast to the sequence's tokens). ``mode``: ``mask`` (MIS / IcePop: ``w * 1[is_low <= w <=
    is_high]``) or ``truncate`` (TIS: ``min(w, is_high)``). ``veto``: a sequence with any token
    whose ``pi_old/mu < veto`` gets weight 0 everywhere.

    The bounds are applied on the log scale, so a huge sequence weight never overflows (``exp`` is
    only taken of values ``<= log(is_high)``). Returns ``(w, info)`` where ``info`` holds boolean
    ``[B, T]`` masks ``masked`` (outside the bounds, mask mode), ``truncated`` (truncate mode) and
    ``vetoed`` (the whole sequence was vetoed), for the metrics.
    """
    with torch.no_grad():
        d = (old_logp - rollout_logp).detach()
        if level == "token":
            log_w = d
        elif level == "seq":
            log_w = sequence_log_ratio(d, valid).unsqueeze(-1).expand_as(d)
        else:
            raise ValueError(f"unknown importance-weight level {level!r} (expected 'token' or 'seq')")
        log_hi = math.log(is_high)
        masked = torch.zeros_like(valid)
        truncated = torch.zeros_like(valid)
        if mode == "mask":
            log_lo = math.log(is_low) if is_low > 0 else -math.inf
            keep = (log_w >= log_lo) & (log_w <= log_hi)
            masked = valid & ~keep
            w = torch.where(keep, log_w.clamp(max=log_hi).exp(), torch.zeros_like(log_w))
        elif mode == "truncate":
            truncated = valid & (log_w > log_hi)
            w = log_w.clamp(max=log_hi).exp()
        else:
            raise ValueError(f"unknown importance-weight mode {mode!r} (expected 'mask' or 'truncate')")
        vetoed = torch.zeros_like(valid)
        if veto is not None:
            below = valid & (d < math.log(veto))
            vetoed = below.any(dim=-1, keepdim=True).expand_as(valid) & valid
            w = torch.where(vetoed, torch.zeros_like(w), w)
        w = torch.where(valid, w, torch.zeros_like(w))
    return w, {"masked": masked, "truncated": truncated, "vetoed": vetoed}
