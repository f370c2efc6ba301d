"""GRPO advantages: per prompt group, ``A = (R - mean(R)) / (std(R) + eps)`` or, for Dr.GRPO / DRPO,
``A = R - mean(R)`` (ALGORITHMS.md section 5), broadcast over the response tokens.

Conventions (written down because implementations differ):
- the std is the unbiased sample std (``correction = 1``), as verl's ``compute_grpo_outcome_advantage``;
- a group of one sample has ``A = 0`` (nothing to compare with; verl instead returns the raw reward);
- statistics are computed in float64 and the result has the rewards' dtype (at least float32);
- a non-finite reward is an error (an advantage must never silently become NaN).

Groups are either contiguous blocks of ``group_size`` samples (the order the driver produces: the
``n`` samples of a prompt one after the other) or given by an integer ``group_index`` per sample.
"""

from __future__ import annotations

from typing import Optional

import torch


def _group_ids(n: int, group_size: Optional[int], group_index: Optional[torch.Tensor], device) -> torch.Tensor:
    if (group_size is None) == (group_index is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_index (a group id per sample)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"{n} rewards do not split into groups of group_size = {group_size}")
        return torch.arange(n, device=device) // group_size
    if not isinstance(group_index, torch.Tensor) or group_index.shape != (n,):
        got = getattr(group_index, "shape", group_index)
        raise ValueError(f"group_index must be a tensor of shape ({n},), got {got}")
    if group_index.is_floating_point() or group_index.dtype == torch.bool:
        raise TypeError(f"group_index must be an integer tensor, got {group_index.dtype}")
    _, ids = torch.unique(group_index.to(device), return_inverse=True)
    return ids


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    *,
    group_index: Optional[torch.Tensor] = None,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample GRPO advantages ``[N]`` from scalar rewards ``[N]``.

    ``std_normalize=False`` gives the mean-centred (Dr.GRPO / DRPO) variant.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N], got {getattr(rewards, 'shape', type(rewards).__name__)}")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        where = bad.nonzero().flatten().tolist()[:8]
        raise ValueError(f"{int(bad.sum())} reward(s) are NaN or infinite (samples {where})")
    n = rewards.shape[0]
    ids = _group_ids(n, group_size, group_index, rewards.device)
    g = int(ids.max()) + 1 if n else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, ids, torch.ones_like(r))
    mean = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, ids, r) / count
    centred = r - mean[ids]
    if std_normalize:
        sq = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, ids, centred.square())
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std[ids] + eps)
    out_dtype = torch.promote_types(rewards.dtype, torch.float32) if rewards.is_floating_point() else torch.float32
    return centred.to(out_dtype)


def compute_advantages(
    rewards: torch.Tensor,
    mode: str,
    group_size: Optional[int] = None,
    *,
    group_index: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages for the config value ``algorithm.advantage``: ``grpo`` or ``grpo_no_std``."""
    if mode not in ("grpo", "grpo_no_std"):
        raise ValueError(f"unknown advantage mode {mode!r}; expected 'grpo' or 'grpo_no_std'")
    return grpo_advantages(rewards, group_size, group_index=group_index, std_normalize=(mode == "grpo"), eps=eps)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` per-sample advantages -> ``[N, T]`` per-token advantages, 0 where ``mask`` is 0."""
    if advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"advantages [N] and mask [N, T] do not match: {tuple(advantages.shape)} vs {tuple(mask.shape)}"
        )
    a = advantages.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask != 0, a, torch.zeros((), dtype=a.dtype, device=a.device))
