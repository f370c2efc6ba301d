"""Where tensors live: one device-placement function and one collective-tensor helper.

Every path of the trainer (CPU and GPU) goes through these, so the CPU tests exercise the same
code a GPU run executes:

- :func:`compute_device` is the device the model lives on: the current CUDA device when CUDA is
  available (``init_distributed`` set it from ``LOCAL_RANK``), else the CPU.
- :func:`to_device` moves a batch (any dataclass of tensors, e.g. ``RLBatch``) there. On CPU it is
  a no-op move; on GPU it is what puts the rollout batch (built on the CPU by ``collate``) next to
  the CUDA weights before the embedding looks the tokens up.
- :func:`collective_device` / :func:`collective_tensor`: tensors handed to ``all_reduce`` /
  ``broadcast`` must be on the backend's device: CUDA for NCCL (it has no CPU path), CPU for gloo.
- :func:`grads_nonfinite`: did any rank get a NaN/inf gradient? Megatron's optimizer only checks
  when it has a grad scaler (fp16); bf16 and fp32 must check themselves before ``step()``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist


def compute_device() -> torch.device:
    """The device this process computes on (the model's)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch, device: Optional[torch.device] = None):
    """A copy of ``batch`` (a dataclass of optional tensors, or a tensor) whose tensors are on
    ``device`` (default :func:`compute_device`); tensors already there are not copied."""
    device = device or compute_device()
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if not dataclasses.is_dataclass(batch):
        raise TypeError(f"to_device: expected a tensor or a dataclass of tensors, got {type(batch).__name__}")
    moved = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return dataclasses.replace(batch, **moved)


def collective_device(group=None, backend: Optional[str] = None) -> torch.device:
    """The device a tensor for a collective on ``group`` must be on: CUDA for NCCL, CPU otherwise.

    ``backend`` overrides the group's backend (tests pass ``"nccl"`` to inspect the GPU choice)."""
    name = str(backend if backend is not None else dist.get_backend(group)).lower()
    if "nccl" in name:
        if not torch.cuda.is_available():
            raise RuntimeError("an NCCL collective needs CUDA, and torch.cuda.is_available() is False")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_tensor(values: Sequence[float], dtype=torch.float32, group=None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """``torch.tensor(values)`` on the device the backend of ``group`` needs."""
    return torch.tensor(list(values), dtype=dtype, device=collective_device(group, backend))


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` when ``flag`` is true on any of them (a MAX all-reduce)."""
    t = collective_tensor([1.0 if flag else 0.0], group=group)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def _grads(chunks: Iterable[torch.nn.Module]):
    for c in chunks:
        for p in c.parameters():
            if not p.requires_grad:
                continue
            g = getattr(p, "main_grad", None)
            g = g if g is not None else p.grad
            if g is not None:
                yield g


def grads_nonfinite(chunks: Iterable[torch.nn.Module], group=None) -> bool:
    """True on every rank when any rank's gradients hold a NaN or inf.

    Checked with the kernel Megatron's grad scaler uses (``_amp_foreach_non_finite_check_and_unscale_``
    with a unit scale: no temporary the size of the gradients, values untouched). Gradients that
    were reduce-scattered (distributed optimizer) are checked whole: a non-finite local gradient
    makes the reduced sum non-finite too, so the flag is the same as checking only owned shards.
    """
    found = collective_tensor([0.0], group=group)
    by_device = {}
    for g in _grads(chunks):
        by_device.setdefault(g.device, []).append(g)
    for dev, grads in by_device.items():
        f = torch.zeros(1, dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, f, torch.ones(1, dtype=torch.float32, device=dev))
        found = torch.maximum(found, f.to(found.device))
    dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return bool(found.item() > 0)
