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


def grad_norm(params: Iterable[torch.Tensor], model_parallel_group=None, count_nonfinite: bool = False):
    """The global L2 norm of the gradients of ``params`` (this rank's model chunk); with
    ``count_nonfinite`` also whether any gradient of ``params`` on the model-parallel group holds
    a NaN/inf (every one checked, replicated copies included), in the same all-reduce."""
    from megatron.core import parallel_state as ps

    params = list(params)
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    total = torch.zeros(2 if count_nonfinite else 1, dtype=torch.float64)
    counted = [g.detach() for p in params if (g := _grad(p)) is not None and _counted_once(p, tp_rank)]
    if counted:  # one fp64 norm per tensor in one call (what torch.nn.utils.clip_grad_norm_ uses)
        total[0] = torch.stack(torch._foreach_norm(counted, 2.0, dtype=torch.float64)).square().sum()
    if count_nonfinite:
        total[1] = float(_nonfinite(params))
    group = model_parallel_group
    if group is None and ps.model_parallel_is_initialized():
        group = ps.get_model_parallel_group()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    norm = math.sqrt(total[0].item())
    return (norm, bool(total[1].item() > 0)) if count_nonfinite else norm


def _nonfinite(params: List[torch.Tensor]) -> bool:
    """Any NaN/inf among these gradients, with the kernel Megatron's grad scaler uses (no temporary
    the size of the gradients; runtime/device.grads_nonfinite)."""
    by_device = {}
    for p in params:
        g = _grad(p)
        if g is not None:
            by_device.setdefault(g.device, []).append(g)
    found = False
    for dev, grads in by_device.items():
        f = torch.zeros(1, dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, f, torch.ones(1, dtype=torch.float32, device=dev))
        found = found or bool(f.item() > 0)
    return found


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, model_parallel_group=None,
                   count_nonfinite: bool = False):
    """Scale gradients in place so their global norm is at most ``max_norm``; return the norm
    before clipping (``inf``/``nan`` norms are returned untouched, for the caller to skip the step).
    ``count_nonfinite``: return (norm, any NaN/inf gradient on the model-parallel group) instead,
    nothing scaled when there is one."""
    params: List[torch.Tensor] = list(params)
    norm, bad = grad_norm(params, model_parallel_group, count_nonfinite=True) if count_nonfinite else \
        (grad_norm(params, model_parallel_group), False)
    if max_norm > 0 and math.isfinite(norm) and not bad:
        coeff = max_norm / (norm + 1e-6)
        if coeff < 1.0:
            grads = [g for p in params if (g := _grad(p)) is not None]
            if grads:
                torch._foreach_mul_(grads, coeff)
    return (norm, bad) if count_nonfinite else norm
