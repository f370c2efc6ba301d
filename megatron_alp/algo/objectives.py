"""Per-token RL objectives and their aggregation (ALGORITHMS.md sections 1-5).

Public API (called exactly like this by the actor and the tests)::

    losses = token_losses("bypass_seq", logp, rollout_logp, advantages, mask,
                          eps_low=0.5, eps_high=3.0, dual_clip=10.0)          # [B, T]
    loss = aggregate(losses, mask, "token-mean", normalizer=global_token_count)

Objectives (hyper-parameters in brackets are optional, ``None`` = off):

=============  ==========================================================  =====================
name           loss per token                                              hyper-parameters
=============  ==========================================================  =====================
bypass_token   PPO clip of ``pi/mu`` (token)                               eps_low, eps_high, [dual_clip]
bypass_seq     PPO clip of the straight-through sequence ratio             eps_low, eps_high, [dual_clip]
bypass_geo     same with the geometric-mean sequence ratio (GSPO)          eps_low, eps_high, [dual_clip]
ppo            PPO clip of ``pi/pi_old``                                   eps_low, eps_high, [dual_clip]
mis_token/seq  ``sg(w 1[is_low<=w<=is_high]) * ppo``, ``w = pi_old/mu``    eps_low, eps_high, is_low, is_high,
                                                                           [dual_clip, veto]
mis_seq_geo    mis_seq with the PPO clip on the geometric sequence         same as mis_seq
               ratio ``(pi/pi_old)^(1/|y|)`` (straight-through; GSPO)
tis_token/seq  ``sg(min(w, is_high)) * ppo``                               eps_low, eps_high, is_high, [dual_clip, veto]
dppo_tv/kl     ``-A sg(min(r, C)) (1 - invalid) lp``                       delta, [trunc]
drpo           ``-A r + |A| sg(mu) (r-1)^2 / (2 delta)``                   delta
spo            ``-A r + |A| (r-1)^2 / (2 delta)``                          delta
drpo_mask      drpo with the penalty only outside ``|pi-mu| <= dppo_delta``  delta, dppo_delta
=============  ==========================================================  =====================

Bad input: tokens whose log-probs (or advantage) are NaN or +-inf are removed from the loss (a
sequence-level objective drops the whole sequence, whose ratio is undefined); the count is
reported by :func:`megatron_alp.algo.metrics.compute_metrics` (``train/dropped_tokens``). Use
:func:`effective_mask` to build normalisers that agree with what was kept.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .divergence import dppo_loss, drpo_loss
from .hparams import AGGREGATIONS, check_hparams
from .ratio import importance_weight, loss_log_ratio, policy_log_ratio, ppo_clip_loss
from .registry import OBJECTIVES, REGISTRY, Objective  # noqa: F401  (OBJECTIVES: re-exported, part of the API)
from .registry import objective as lookup

Number = Union[int, float]


# ---------------------------------------------------------------------------------------------
# Argument checking


def _as_2d(name: str, t, shape) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of logp, [B, T])")
    return t


def _bool_mask(mask: torch.Tensor, shape) -> torch.Tensor:
    _as_2d("mask", mask, shape)
    if mask.dtype == torch.bool:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must contain only 0 and 1 (it selects tokens; it is not a weight)")
    return mask != 0


def broadcast_advantages(advantages: torch.Tensor, shape) -> torch.Tensor:
    """Accept ``[B, T]``, ``[B, 1]`` or ``[B]`` advantages and return a ``[B, T]`` view."""
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    b, t = shape
    if advantages.dim() == 1 and advantages.shape[0] == b:
        return advantages.unsqueeze(-1).expand(b, t)
    if advantages.dim() == 2 and advantages.shape[0] == b and advantages.shape[1] in (1, t):
        return advantages.expand(b, t)
    raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B, T] = {tuple(shape)}, [B, 1] or [B]")


def effective_mask(
    objective: Optional[str],
    mask: torch.Tensor,
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The boolean ``[B, T]`` mask of the tokens an objective really uses.

    ``mask`` minus tokens whose ``logp``, ``rollout_logp``, advantage or (for objectives that use
    it) ``old_logp`` is not finite; for sequence-level objectives a non-finite token drops its
    whole sequence. ``objective=None`` applies the token-level rule (and checks ``old_logp`` when given).
    """
    shape = tuple(logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {shape}")
    m = _bool_mask(mask, shape)
    ok = torch.isfinite(logp.detach()) & torch.isfinite(_as_2d("rollout_logp", rollout_logp, shape))
    if advantages is not None:
        ok &= torch.isfinite(broadcast_advantages(advantages, shape))
    spec = lookup(objective) if objective is not None else None
    if old_logp is not None and (spec is None or spec.needs_old_logp):
        ok &= torch.isfinite(_as_2d("old_logp", old_logp, shape))
    valid = m & ok
    if spec is not None and spec.sequence_level:
        valid = valid & ~(m & ~ok).any(dim=-1, keepdim=True)
    return valid


# ---------------------------------------------------------------------------------------------
# Per-token losses


def token_losses(
    objective: str,
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: Optional[torch.Tensor] = None,
    **hparams,
) -> torch.Tensor:
    """Per-token loss ``[B, T]`` to minimise; 0 where ``mask`` is 0 (and on dropped non-finite tokens).

    ``logp`` is the differentiable log-prob of the sampled tokens under the policy being trained;
    ``rollout_logp``, ``old_logp`` and ``advantages`` are treated as constants (detached). The
    result is in ``logp``'s dtype promoted to at least float32. See the module docstring for the
    objectives and their hyper-parameters.
    """
    hp = check_hparams(objective, hparams)
    spec = REGISTRY[objective]
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        raise ValueError(f"logp must be a [B, T] tensor, got {getattr(logp, 'shape', type(logp).__name__)}")
    if not logp.is_floating_point():
        raise TypeError(f"logp must be floating point, got {logp.dtype}")
    shape = tuple(logp.shape)
    if spec.needs_old_logp and old_logp is None:
        raise ValueError(f"objective {objective!r} needs old_logp (the recomputed pi_old log-probs)")
    valid = effective_mask(objective, mask, logp, rollout_logp, advantages, old_logp)

    dtype = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def clean(t: torch.Tensor) -> torch.Tensor:
        # torch.where (not multiplication) so NaN/inf never reach the graph or its gradient.
        return torch.where(valid, t.to(dtype), zero)

    lp = clean(logp)
    lmu = clean(rollout_logp.detach())
    adv = clean(broadcast_advantages(advantages.detach(), shape))
    lold = clean(old_logp.detach()) if spec.needs_old_logp else None
    loss = _FAMILY_LOSS[spec.family](spec, hp, lp, lmu, lold, adv, valid)
    return torch.where(valid, loss, zero)


def _bypass_loss(spec: Objective, hp: dict, lp, lmu, lold, adv, valid) -> torch.Tensor:
    log_rho = policy_log_ratio(spec.kind, lp, lmu, valid)
    return ppo_clip_loss(log_rho, adv, hp["eps_low"], hp["eps_high"], hp["dual_clip"])


def _ppo_loss(spec: Objective, hp: dict, lp, lmu, lold, adv, valid) -> torch.Tensor:
    """The PPO clip of pi/pi_old (token ratio; geometric sequence ratio for ``mis_seq_geo``)."""
    return ppo_clip_loss(loss_log_ratio(spec.name, lp, lmu, lold, valid), adv, hp["eps_low"], hp["eps_high"],
                         hp["dual_clip"])


def _weighted_ppo_loss(spec: Objective, hp: dict, lp, lmu, lold, adv, valid) -> torch.Tensor:
    """mis_*/tis_*: the ppo loss times the masked / truncated importance weight pi_old/mu."""
    w, _ = importance_weight(is_weight_level(spec), is_weight_mode(spec), lold, lmu, valid,
                             is_low=hp.get("is_low", 0.0), is_high=hp["is_high"], veto=hp["veto"])
    return w * _ppo_loss(spec, hp, lp, lmu, lold, adv, valid)


def _dppo_loss(spec: Objective, hp: dict, lp, lmu, lold, adv, valid) -> torch.Tensor:
    return dppo_loss(spec.kind, lp, lmu, adv, hp["delta"], hp["trunc"])


def _drpo_loss(spec: Objective, hp: dict, lp, lmu, lold, adv, valid) -> torch.Tensor:
    return drpo_loss(spec.kind, lp, lmu, adv, hp["delta"], hp.get("dppo_delta"))


def is_weight_level(spec: Objective) -> str:
    """``token`` or ``seq``: the level of mis_* / tis_*'s importance weight (geo weights per sequence)."""
    return "seq" if spec.sequence_level else "token"


def is_weight_mode(spec: Objective) -> str:
    """How mis_* / tis_* treat the importance weight pi_old/mu out of range."""
    return "mask" if spec.family == "mis" else "truncate"


# The loss of each family of the registry (megatron_alp.algo.registry).
_FAMILY_LOSS = {"bypass": _bypass_loss, "ppo": _ppo_loss, "mis": _weighted_ppo_loss, "tis": _weighted_ppo_loss,
                "dppo": _dppo_loss, "drpo": _drpo_loss}


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token KL-to-reference loss ``[B, T]`` (section 5), 0 where masked or non-finite.

    k1 = ``lp - lref``; k2 = ``0.5 (lp - lref)^2``; k3 (low-variance) = ``exp(lref - lp) - (lref - lp) - 1``.
    """
    valid = effective_mask(None, mask, logp, ref_logp)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    d = torch.where(valid, logp.to(dtype) - ref_logp.detach().to(dtype), zero)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d.square()
    elif estimator == "k3":
        kl = torch.expm1(-d) + d
    else:
        raise ValueError(f"unknown KL estimator {estimator!r} (expected 'k1', 'k2' or 'k3')")
    return torch.where(valid, kl, zero)


# ---------------------------------------------------------------------------------------------
# Aggregation


def _check_mode(mode: str, horizon: Optional[Number]) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGGREGATIONS)}")
    if mode == "seq-mean-token-sum-norm" and (horizon is None or horizon <= 0):
        raise ValueError(f"aggregation 'seq-mean-token-sum-norm' needs a positive horizon, got {horizon!r}")


def normalizer_count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """This shard's contribution to the global normaliser of ``mode`` (a 0-d float64 tensor).

    Token count for ``token-mean``, count of sequences with at least one counted token for the
    ``seq-mean-*`` modes. Sum it over micro-batches and all-reduce it over data-parallel ranks,
    then pass it as ``aggregate(..., normalizer=...)`` so the loss does not depend on the layout.
    """
    _check_mode(mode, 1)
    m = mask != 0
    if mode == "token-mean":
        return m.sum().to(torch.float64)
    return m.any(dim=-1).sum().to(torch.float64)


def aggregate(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    horizon: Optional[Number] = None,
    normalizer: Optional[Union[Number, torch.Tensor]] = None,
) -> torch.Tensor:
    """Reduce per-token losses ``[B, T]`` to a scalar (section 5).

    - ``token-mean``: ``sum_{i,t} m L / N_tokens``;
    - ``seq-mean-token-mean``: ``sum_i (sum_t m L / sum_t m) / N_seq``;
    - ``seq-mean-token-sum``: ``sum_i sum_t m L / N_seq``;
    - ``seq-mean-token-sum-norm``: ``sum_i (sum_t m L / horizon) / N_seq`` (DRPO / Dr.GRPO).

    ``N`` is ``normalizer`` when given (the *global* count from :func:`normalizer_count`, summed
    over micro-batches and data-parallel ranks), else this batch's own count. With the global
    normaliser the returned value is this shard's share: summing it over micro-batches and ranks
    gives the full-batch loss (so average-reducing data-parallel gradients must be scaled by the
    DP size by the caller). Sequences without counted tokens contribute 0. An empty batch gives 0.
    """
    _check_mode(mode, horizon)
    if not isinstance(token_losses, torch.Tensor) or token_losses.dim() != 2:
        raise ValueError(f"token_losses must be a [B, T] tensor, got {getattr(token_losses, 'shape', None)}")
    m = _bool_mask(mask, token_losses.shape)
    zero = torch.zeros((), dtype=token_losses.dtype, device=token_losses.device)
    masked = torch.where(m, token_losses, zero)
    if normalizer is None:
        normalizer = normalizer_count(m, mode)
    denom = torch.as_tensor(normalizer, dtype=token_losses.dtype, device=token_losses.device)
    if denom.dim() != 0:
        raise ValueError(f"normalizer must be a scalar, got shape {tuple(denom.shape)}")
    denom = denom.clamp(min=1.0)  # an empty global batch: the numerator is 0 too
    if mode == "token-mean":
        return masked.sum() / denom
    seq_sum = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq_sum = seq_sum / m.sum(dim=-1).clamp(min=1).to(seq_sum.dtype)
    elif mode == "seq-mean-token-sum-norm":
        seq_sum = seq_sum / float(horizon)
    return seq_sum.sum() / denom
