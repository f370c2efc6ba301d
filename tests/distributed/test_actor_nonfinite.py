"""A non-finite loss or gradient skips the optimizer step (weights untouched) and is reported."""

from __future__ import annotations

import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, make_cfg


def _world(rank, world_size):
    from megatron_alp.model.sharding import full_state_dict
    from megatron_alp.trainer.batch import RLBatch
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.setup import make_actor

    cfg = make_cfg(extra=["optimizer.lr=1e-2", "run.micro_batch_size=2", "alp.enabled=false"])
    model = build(cfg)
    ddp = wrap_ddp(model)
    actor = make_actor(cfg, [ddp], Optimizer([ddp], cfg.optimizer))
    g = torch.Generator().manual_seed(0)
    batch = RLBatch(tokens=torch.randint(0, V, (4, 10), generator=g), loss_mask=torch.ones(4, 10),
                    rollout_logp=-torch.rand(4, 10, generator=g) - 1, advantages=torch.randn(4, generator=g))
    batch.loss_mask[:, 0] = 0
    ok_metrics = actor.train_step(batch, step=0)
    with torch.no_grad():  # poison one weight: every logit, hence the loss, becomes NaN
        model.decoder.final_layernorm.weight[0] = float("nan")
    before = full_state_dict(model, V)
    record = []
    bad_metrics = actor.train_step(batch, step=1, record=record)
    bad_metrics.update(actor.step_metrics(record))
    after = full_state_dict(model, V)
    unchanged = all(torch.equal(before[k], after[k]) or (torch.isnan(before[k]) == torch.isnan(after[k])).all()
                    and torch.equal(torch.nan_to_num(before[k]), torch.nan_to_num(after[k])) for k in before)
    return ok_metrics, bad_metrics, unchanged


def test_nonfinite_loss_skips_the_step():
    ok, bad, unchanged = run_world(_world, 1, timeout=200)[0]
    assert ok["train/skipped_step"] == 0.0 and ok["train/nonfinite_loss"] == 0.0
    # The objective drops the NaN log-probs (counted in train/dropped_tokens), so the loss stays
    # finite; the gradient does not, and the step is skipped.
    assert bad["train/skipped_step"] == 1.0
    assert bad["train/nonfinite_loss"] == 1.0 or bad["train/nonfinite_grad"] == 1.0
    assert bad["train/dropped_tokens"] > 0
    assert unchanged
