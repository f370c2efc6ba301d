"""Megatron DDP wrapping and the optimizer, on GPU and CPU.

GPU: Megatron's distributed optimizer with its own gradient clipping. CPU: the plain Megatron
optimizer (the distributed one refuses CPU tensors) with ``clip_grad=0`` inside Megatron and our
CPU-safe clipping before the step (PLATFORM.md, CPU item 5). Parameters can be split into groups
(ALP's sigma gets its own learning rate and no weight decay) via ``param_groups``.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch

from .runtime.grad_clip import clip_grad_norm

logger = logging.getLogger(__name__)


def wrap_ddp(model, overlap: Optional[bool] = None):
    """Megatron's DistributedDataParallel around one model chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    on_gpu = torch.cuda.is_available()
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(on_gpu if overlap is None else overlap),
        use_distributed_optimizer=on_gpu,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


class Optimizer:
    """Megatron optimizer + our CPU clipping path, one ``step()`` for both."""

    def __init__(self, model_chunks: List, opt_cfg, precision: str = "fp32",
                 overrides: Optional[Dict] = None):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.on_gpu = torch.cuda.is_available()
        self.clip = opt_cfg.clip_grad
        self.chunks = model_chunks
        mcfg = OptimizerConfig(
            optimizer="adam",
            lr=opt_cfg.lr,
            min_lr=opt_cfg.min_lr,
            weight_decay=opt_cfg.weight_decay,
            adam_beta1=opt_cfg.adam_beta1,
            adam_beta2=opt_cfg.adam_beta2,
            adam_eps=opt_cfg.adam_eps,
            bf16=precision in ("bf16", "fp8"),
            fp16=precision == "fp16",
            params_dtype=torch.bfloat16 if precision in ("bf16", "fp8") else (
                torch.float16 if precision == "fp16" else torch.float32),
            use_distributed_optimizer=self.on_gpu,
            clip_grad=opt_cfg.clip_grad if self.on_gpu else 0.0,
        )
        self.megatron = get_megatron_optimizer(mcfg, model_chunks, config_overrides=overrides,
                                               use_gloo_process_groups=self.on_gpu)  # on CPU every group is gloo already

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.megatron.zero_grad()

    def step(self):
        """Clip (CPU) and step. Returns (stepped, grad_norm); a non-finite norm skips the step."""
        if not self.on_gpu:
            params = [p for c in self.chunks for p in c.parameters() if p.requires_grad]
            norm = clip_grad_norm(params, self.clip)
            if not torch.isfinite(torch.tensor(norm)):
                return False, norm
        ok, norm_m, _ = self.megatron.step()
        return ok, (norm_m if self.on_gpu else norm)

    def state_dict(self):
        return self.megatron.state_dict()

    def load_state_dict(self, state) -> None:
        self.megatron.load_state_dict(state)
