"""The trainer's batch type: one data-parallel rank's share of a mini-batch.

Every per-token array is ``[N, L]`` aligned with ``tokens``; entry ``[i, t]`` concerns token ``t``
(predicted from positions ``< t``), so position 0 never counts. Built by :mod:`.batching`,
consumed by :mod:`.actor`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class RLBatch:
    """One data-parallel rank's share of a mini-batch (see module docstring)."""

    tokens: torch.Tensor  # [N, L] int64
    loss_mask: torch.Tensor  # [N, L] float/bool: counted response tokens
    rollout_logp: torch.Tensor  # [N, L] fp32
    advantages: torch.Tensor  # [N] fp32
    old_logp: Optional[torch.Tensor] = None  # [N, L]
    ref_logp: Optional[torch.Tensor] = None  # [N, L]
    base_logp: Optional[torch.Tensor] = None  # [N, L] unperturbed pi_old at the step's start: metrics only
    sample_ids: Optional[torch.Tensor] = None  # [N] int64: identity in the step's batch (keys ALP's noise)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx) -> "RLBatch":
        return RLBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                          for f in fields(self)})
