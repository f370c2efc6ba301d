"""sigma as a parameter: its optimizer group, its exclusion from exports, its values for logging."""

from __future__ import annotations

from typing import Dict


def is_alp_param(name: str, param=None) -> bool:
    """True for ALP's log-sigma parameters: they never leave the trainer (bus, converter)."""
    if param is not None and getattr(param, "alp_sigma", False):
        return True
    return name.endswith("perturbation.log_sigma")


def sigma_param_group_overrides(alp, weight_decay: float) -> Dict:
    """Megatron optimizer ``config_overrides`` giving log-sigma its own group.

    Learning rate ``alp.sigma_lr`` (constant through the schedule's decay: max_lr = min_lr) and
    weight decay ``alp.sigma_weight_decay`` (default 0). The reference decays log-sigma with the
    model's AdamW weight decay; decaying log-sigma pulls sigma towards 1, which is not a
    regulariser anyone asked for, so we default to none (docs/alp.md).
    """
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer.optimizer_config import ParamPredicate

    wd_mult = (alp.sigma_weight_decay / weight_decay) if weight_decay > 0 else 0.0
    key = ParamKey(predicate=ParamPredicate(name="alp_sigma", fn=lambda p: bool(getattr(p, "alp_sigma", False))))
    # is_decoupled_lr: Megatron identifies parameter groups in checkpoints by (wd_mult, lr_mult,
    # is_expert_parallel, is_decoupled_lr); without it sigma's group would collide with the
    # undecayed 1-D weights' group on resume. It is also what the group is: a decoupled LR.
    return {key: {"max_lr": alp.sigma_lr, "min_lr": alp.sigma_lr, "wd_mult": wd_mult, "is_decoupled_lr": True}}
