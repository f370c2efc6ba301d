"""Global gradient-norm clipping that works on CPU tensors (PLATFORM.md, CPU item 5).

Megatron's ``clip_grad_by_total_norm_fp32`` asserts CUDA gradients, so on CPU the optimizer is
built with ``clip_grad=0.0`` and the actor clips here first. The rule is Megatron's: every
parameter is counted once across the model-parallel group (a TP-replicated parameter only on TP
rank 0; the tied embedding's copy on the last pipeline stage not at all), squared norms are summed
over TP x PP, and data-parallel ranks already hold identical reduced gradients.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist


def _grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def _counted_once(p: torch.Tensor, tp_rank: int) -> bool:
    if getattr(p, "shared", False):  # the tied embedding's copy on the last stage
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


def grad_norm(params: Iterable[torch.Tensor], model_parallel_group=None) -> float:
    """The global L2 norm of the gradients of ``params`` (this rank's model chunk)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = _grad(p)
        if g is not None and _counted_once(p, tp_rank):
            total += g.detach().double().pow(2).sum()
    group = model_parallel_group
    if group is None and ps.model_parallel_is_initialized():
        group = ps.get_model_parallel_group()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return math.sqrt(total.item())


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, model_parallel_group=None) -> float:
    """Scale gradients in place so their global norm is at most ``max_norm``; return the norm
    before clipping (``inf``/``nan`` norms are returned untouched, for the caller to skip the step).
    """
    params: List[torch.Tensor] = list(params)
    norm = grad_norm(params, model_parallel_group)
    if max_norm > 0 and math.isfinite(norm):
        coeff = max_norm / (norm + 1e-6)
        if coeff < 1.0:
            for p in params:
                g = _grad(p)
                if g is not None:
                    g.mul_(coeff)
    return norm
