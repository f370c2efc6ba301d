"""The trainer's part of one RL step: the unperturbed no-grad forwards, then the mini-batch updates.

pi_old fused into the first update (``run.fuse_old_logp``): at the first optimizer step of a
rollout the weights are pi_old's, so where that forward is unperturbed (ALP off) its detached
log-probs *are* pi_old for the rows of the first mini-batch, and the no-grad pass only runs on the
other mini-batches' rows (not at all with one optimizer step per rollout). The same holds for the
mismatch metrics' unperturbed pi_theta_old (``base_logp``). Under ALP the update forward carries
the perturbation, so the separate pass stays. The one difference: the loss normaliser is counted
before the forward, so a token whose pi_old is non-finite (NaN logits) stays in the normaliser of
the first update (it is still dropped from the loss); with the separate pass it leaves both.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .batch import RLBatch
from .batching import mini_batches, split_rows


def no_grad_fields(cfg) -> Tuple[str, ...]:
    """The unperturbed pi_theta_old fields the step needs: ``old_logp`` (decoupled objectives,
    ``algorithm.recompute_old_logp``) and ``base_logp`` (``logging.mismatch_metrics``)."""
    return tuple(name for name, on in (("old_logp", cfg.algorithm.recompute_old_logp),
                                       ("base_logp", cfg.logging.mismatch_metrics)) if on)


def fused_fields(cfg) -> Tuple[str, ...]:
    """The fields the first update's forward fills itself (empty: the separate pass does all)."""
    if not cfg.run.fuse_old_logp or cfg.alp.enabled:  # ALP: the update forward is perturbed
        return ()
    return no_grad_fields(cfg)


def _fill(actor, local: RLBatch, fields: Sequence[str], skip: int) -> None:
    """pi_theta_old of rows ``skip:`` into ``fields`` (rows ``:skip`` hold zeros until the first
    update's forward replaces them); one no-grad pass whatever the number of fields."""
    if not fields:
        return
    rest = local.select(slice(skip, len(local)))
    lp = actor.compute_logprobs(rest) if len(rest) else None
    if lp is not None or not len(rest):
        full = torch.zeros(local.tokens.shape, dtype=torch.float32, device=local.tokens.device)
        if lp is not None:
            full = full.to(lp.device, lp.dtype)
            full[skip:] = lp
    else:  # not the last pipeline stage: log-probs live on the last one only
        full = None
    for name in fields:
        setattr(local, name, full)


def run_updates(cfg, trainer, local: RLBatch, sizes: Optional[List[int]], step: int
                ) -> Tuple[List[Dict[str, float]], Dict[str, object]]:
    """No-grad forwards, then ``run.mini_batches_per_step`` optimizer steps on this rank's rows
    (``sizes``: each mini-batch's row count under packing's balanced split, else equal splits).
    Returns the per-update scalars and the step-level token metrics (:meth:`Actor.step_metrics`)."""
    actor, n_mini = trainer.actor, cfg.run.mini_batches_per_step
    first = sizes[0] if sizes else len(local) // n_mini
    fused = fused_fields(cfg)
    _fill(actor, local, no_grad_fields(cfg), skip=first if fused else 0)
    if trainer.ref_actor is not None:
        local.ref_logp = trainer.ref_actor.compute_logprobs(local)
    minis = split_rows(local, sizes) if sizes else mini_batches(local, n_mini)
    record: List[dict] = []
    per_update = [actor.train_step(mb, step=step * n_mini + k, record=record,
                                   fill_from_forward=fused if k == 0 else ())
                  for k, mb in enumerate(minis)]
    return per_update, actor.step_metrics(record)
