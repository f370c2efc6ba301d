"""RMSNorm for Megatron's local layer spec that also works under sequence parallelism.

Megatron's local spec falls back to ``WrappedTorchNorm`` when Apex is absent (always on CPU), and
that wrapper refuses ``sequence_parallel``. Under SP each TP rank normalises its own slice of the
sequence, so the norm weight's gradient is a partial sum: Megatron's ``finalize_model_grads``
all-reduces it over the TP group for every parameter marked ``sequence_parallel = True`` (as the
TE and Apex norms mark theirs). This module is ``torch.nn.RMSNorm`` plus that mark; without SP it
is numerically identical to ``WrappedTorchNorm``.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's constructor signature and the SP gradient mark."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
