"""Megatron DDP wrapping and the optimizer, on GPU and CPU.

GPU: Megatron's distributed optimizer with its own gradient clipping. CPU: the plain Megatron
optimizer (the distributed one refuses CPU tensors) with ``clip_grad=0`` inside Megatron and our
CPU-safe clipping before the step (PLATFORM.md, CPU item 5). Parameters can be split into groups
(ALP's sigma gets its own learning rate and no weight decay) via ``param_groups``.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import torch

from ..runtime.device import grads_nonfinite
from ..runtime.grad_clip import clip_grad_norm
from .optim_state import load_sub, save_sub

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
                 total_steps: Optional[int] = None, initial_loss_scale: Optional[float] = None):
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
        if initial_loss_scale is not None:  # fp16's dynamic scaler starts here (Megatron's default: 2**32)
            mcfg.initial_loss_scale = float(initial_loss_scale)
        self.megatron = get_megatron_optimizer(mcfg, model_chunks, config_overrides=param_group_overrides(opt_cfg, alp),
                                               # on CPU every group is gloo already
                                               use_gloo_process_groups=self.on_gpu)
        decay_steps = max(1, (total_steps or 1) - opt_cfg.warmup_steps)
        style = opt_cfg.schedule if opt_cfg.schedule != "constant" else "constant"
        self.scheduler = OptimizerParamScheduler(
            self.megatron, init_lr=0.0 if opt_cfg.warmup_steps else opt_cfg.lr, max_lr=opt_cfg.lr,
            min_lr=opt_cfg.min_lr, lr_warmup_steps=opt_cfg.warmup_steps,
            lr_decay_steps=opt_cfg.warmup_steps + decay_steps, lr_decay_style=style,
            start_wd=opt_cfg.weight_decay, end_wd=opt_cfg.weight_decay, wd_incr_steps=1,
            wd_incr_style="constant",
        )
        self.has_scaler = any(getattr(o, "grad_scaler", None) is not None for o in self._chained())
        if self.has_scaler:
            # The schedule multiplies each micro-batch's loss by config.grad_scale_func before the
            # backward (pipeline_parallel/schedules.py backward_step); without it the loss is never
            # scaled while the optimizer still unscales by the loss scale. Megatron's training loop
            # sets it the same way (config.grad_scale_func = optimizer.scale_loss).
            for c in model_chunks:
                c.config.grad_scale_func = self.megatron.scale_loss
        _mark_reduced_grad_owners(model_chunks, self._chained())
        self._params: Optional[List[torch.Tensor]] = None
        self._prefer_foreach()

    def _prefer_foreach(self) -> None:
        """On CPU, torch's Adam defaults to one Python-level update per tensor; its ``foreach``
        implementation (torch's default on GPUs) gives the same values (bitwise, checked in
        tests/distributed/test_alp_optimizer.py) in a few calls over all tensors. Re-applied after a
        state load, which restores the saved groups' flags."""
        if self.on_gpu:
            return
        for o in self._chained():
            inner = getattr(o, "optimizer", None)
            if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                for group in inner.param_groups:
                    group["foreach"] = True

    def _trained_params(self) -> List[torch.Tensor]:
        if self._params is None:  # what requires a gradient is fixed when the model is built
            self._params = [p for c in self.chunks for p in c.parameters() if p.requires_grad]
        return self._params

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.megatron.zero_grad()

    def step(self):
        """Clip (CPU) and step. Returns (stepped, grad_norm); a non-finite gradient skips the step.

        Without a grad scaler (fp32, bf16) Megatron does not look for NaN/inf: a NaN norm passes its
        clip check and Adam writes NaN into every weight, so we check first, on CPU and GPU alike.
        With one (fp16) Megatron checks, skips, backs the scale off and returns a None norm."""
        if not self.on_gpu and not self.has_scaler:
            # CPU (fp32): one model-parallel all-reduce gives the norm and the NaN/inf
            # check (data-parallel ranks hold identical reduced gradients: the same answer on every
            # rank); Megatron's step would all-reduce a norm of its own that nothing uses (its clip
            # is off here), so its two halves are called directly (MegatronOptimizer.step minus that).
            norm, bad = clip_grad_norm(self._trained_params(), self.clip, count_nonfinite=True)
            if bad:
                return False, math.nan
            if not math.isfinite(norm):
                return False, norm
            ok = not self.megatron.prepare_grads() and self.megatron.step_with_ready_grads()
            if ok:
                self.scheduler.step(1)
            return ok, norm
        if not self.has_scaler and grads_nonfinite(self.chunks):
            return False, math.nan
        if not self.on_gpu:
            norm = clip_grad_norm(self._trained_params(), self.clip)
            if not torch.isfinite(torch.tensor(norm)):
                return False, norm
        ok, norm_m, _ = self.megatron.step()
        if ok:
            self.scheduler.step(1)
        return ok, (norm_m if self.on_gpu else norm)

    def scale_metrics(self) -> Dict[str, float]:
        """``train/loss_scale`` under fp16 (the dynamic scaler's current value); nothing otherwise."""
        if not self.has_scaler:
            return {}
        return {"train/loss_scale": float(self.megatron.get_loss_scale())}

    def lrs(self) -> List[float]:
        return [g["lr"] for g in self.megatron.param_groups]

    def _chained(self):
        return list(getattr(self.megatron, "chained_optimizers", [self.megatron]))

    def state_dict(self):
        """Everything a same-layout resume needs, per sub-optimizer (see :mod:`.optim_state`): the
        distributed optimizer's Adam states live outside ``state_dict()`` and are saved with it."""
        return {"subs": [save_sub(o) for o in self._chained()], "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state) -> None:
        if "subs" not in state:  # written before per-sub-optimizer saving (CPU runs only: plain optimizer)
            self.megatron.load_state_dict(state["optimizer"])
        else:
            subs = self._chained()
            if len(state["subs"]) != len(subs):
                raise ValueError(f"optimizer state has {len(state['subs'])} sub-optimizers, this run {len(subs)}")
            for o, entry in zip(subs, state["subs"], strict=True):
                load_sub(o, entry)
        self.scheduler.load_state_dict(state["scheduler"])
        self._prefer_foreach()


def _mark_reduced_grad_owners(chunks, subs) -> None:
    """Set ``p.grad_reduced_here``: whether this rank's ``main_grad`` of ``p`` holds the DP-reduced
    gradient after the schedule. Everywhere with the plain optimizer (all-reduce); with the
    distributed one only on the DP rank whose shard holds the parameter (reduce-scatter)."""
    owned = set()
    distributed = False
    for o in subs:
        index = getattr(o, "model_param_group_index_map", None)
        if index is not None:
            distributed = True
            owned.update(id(p) for p in index)
    for c in chunks:
        for p in c.parameters():
            p.grad_reduced_here = (not distributed) or id(p) in owned
