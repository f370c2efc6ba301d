"""Megatron DDP wrapping and the optimizer, on GPU and CPU.

GPU: Megatron's distributed optimizer with its own gradient clipping. CPU: the plain Megatron
optimizer (the distributed one refuses CPU tensors) with ``clip_grad=0`` inside Megatron and our
CPU-safe clipping before the step (PLATFORM.md, CPU item 5). Parameters can be split into groups
(ALP's sigma gets its own learning rate and no weight decay) via ``param_groups``.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

from ..runtime.grad_clip import clip_grad_norm

logger = logging.getLogger(__name__)


def wrap_ddp(model, overlap: Optional[bool] = None):
    """Megatron's DistributedDataParallel around one model chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    on_gpu = torch.cuda.is_available()
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(on_gpu if overlap is None else overlap),
        use_distributed_optimizer=on_gpu,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
    # The schedules call this after the last micro-batch's backward: DP gradient reduction, the TP
    # all-reduce of sequence-parallel norm weights (and ALP's sigma under SP), tied embeddings.
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def param_group_overrides(opt_cfg, alp=None) -> Dict:
    """Megatron ``config_overrides``: no weight decay on biases and 1-D weights (Megatron's
    standard rule), and, with ALP, log-sigma in its own group (``sigma_param_group_overrides``)."""
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    no_wd = ParamWithNamePredicate(
        name="no_wd_1d_or_bias",
        fn=lambda p, n: (len(p.shape) == 1 or n.endswith(".bias")) and not getattr(p, "alp_sigma", False),
    )
    overrides = {ParamKey(with_name_predicate=no_wd): {"wd_mult": 0.0}}
    if alp is not None and alp.enabled:
        from ..model.alp import sigma_param_group_overrides

        overrides.update(sigma_param_group_overrides(alp, opt_cfg.weight_decay))
    return overrides


class Optimizer:
    """Megatron optimizer + LR schedule + our CPU clipping path, one ``step()`` for both."""

    def __init__(self, model_chunks: List, opt_cfg, precision: str = "fp32", alp=None,
                 total_steps: Optional[int] = None):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

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
        self.megatron = get_megatron_optimizer(mcfg, model_chunks, config_overrides=param_group_overrides(opt_cfg, alp),
                                               use_gloo_process_groups=self.on_gpu)  # on CPU every group is gloo already
        decay_steps = max(1, (total_steps or 1) - opt_cfg.warmup_steps)
        style = opt_cfg.schedule if opt_cfg.schedule != "constant" else "constant"
        self.scheduler = OptimizerParamScheduler(
            self.megatron, init_lr=0.0 if opt_cfg.warmup_steps else opt_cfg.lr, max_lr=opt_cfg.lr,
            min_lr=opt_cfg.min_lr, lr_warmup_steps=opt_cfg.warmup_steps,
            lr_decay_steps=opt_cfg.warmup_steps + decay_steps, lr_decay_style=style,
            start_wd=opt_cfg.weight_decay, end_wd=opt_cfg.weight_decay, wd_incr_steps=1,
            wd_incr_style="constant",
        )

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
        if ok:
            self.scheduler.step(1)
        return ok, (norm_m if self.on_gpu else norm)

    def lrs(self) -> List[float]:
        return [g["lr"] for g in self.megatron.param_groups]

    def _chained(self):
        return list(getattr(self.megatron, "chained_optimizers", [self.megatron]))

    def state_dict(self):
        """Everything a same-layout resume needs. The distributed optimizer (GPU) keeps its Adam
        states outside ``state_dict()``: this rank's shard is saved with them (DP-reshardable form)."""
        out = {"optimizer": self.megatron.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.on_gpu:
            out["param_state"] = [o.get_parameter_state_dp_reshardable() for o in self._chained()]
        return out

    def load_state_dict(self, state) -> None:
        self.megatron.load_state_dict(state["optimizer"])
        for o, s in zip(self._chained(), state.get("param_state") or []):
            o.load_parameter_state_from_dp_reshardable(s)
        self.scheduler.load_state_dict(state["scheduler"])
