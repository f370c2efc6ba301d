"""No collective a layout does not need, in one policy update on CPU (issue 23):

- the optimizer step makes one model-parallel all-reduce (gradient norm and NaN/inf check
  together; Megatron's own unused norm is not computed), none at all without model parallelism;
- the actor makes no call on a one-rank data-parallel group (normaliser, loss total, pack count);
  the one left there is Megatron DDP's gradient all-reduce, which we do not control;
- a NaN gradient on one rank still skips the step on every rank (in that same all-reduce).

The update's values are unchanged: tests/distributed/test_actor_layouts.py checks them.
"""

from __future__ import annotations

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, make_cfg

N, L = 8, 12


def _batch():
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(N, L)
    for i in range(N):
        mask[i, 3 + i % 3: L - (i % 4)] = 1
    return RLBatch(tokens=torch.randint(0, V, (N, L), generator=g), loss_mask=mask,
                   rollout_logp=-torch.rand(N, L, generator=g) * 2 - 4.0, advantages=torch.randn(N, generator=g),
                   sample_ids=torch.arange(N))


def _world(rank, world_size):
    import torch.distributed as dist

    from megatron_alp.trainer.batching import dp_shard
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.setup import make_actor

    calls = []
    real = dist.all_reduce

    def counting(t, *a, group=None, **k):
        calls.append(dist.get_world_size(group))
        return real(t, *a, group=group, **k)

    cfg = make_cfg(extra=["optimizer.lr=1e-3", "run.micro_batch_size=2", "alp.enabled=false",
                          "algorithm.objective=bypass_token", "algorithm.eps_low=0.5", "algorithm.eps_high=3.0"])
    out = {}
    for name, parallel in (("tp2", {"tp": 2}), ("dp2", {})):
        model = build(cfg, **parallel)
        ddp = wrap_ddp(model)
        actor = make_actor(cfg, [ddp], Optimizer([ddp], cfg.optimizer, alp=cfg.alp))
        batch = _batch() if name == "tp2" else dp_shard(_batch(), rank, 2)
        step = actor.optimizer.step
        in_step = []

        def counted_step(step=step, in_step=in_step):
            before = len(calls)
            result = step()
            in_step.append(calls[before:])
            return result

        actor.optimizer.step = counted_step
        dist.all_reduce = counting
        try:
            calls.clear()
            metrics = actor.train_step(batch, step=0)
        finally:
            dist.all_reduce = real
        out[name] = {"optimizer": in_step[0], "size1": calls.count(1), "all": len(calls),
                     "grad_norm": metrics["train/grad_norm"], "loss": metrics["train/loss"]}
    return out


def test_one_update_makes_only_the_collectives_its_layout_needs():
    for res in run_world(_world, 2, timeout=300):
        tp2, dp2 = res["tp2"], res["dp2"]
        assert tp2["optimizer"] == [2]  # one all-reduce over the TP=2 model-parallel group
        assert dp2["optimizer"] == []  # no model parallelism: nothing to reduce
        assert tp2["size1"] == 1  # Megatron DDP's gradient all-reduce over the one-rank DP group
        assert dp2["size1"] == 0
        for r in (tp2, dp2):
            assert r["grad_norm"] > 0 and torch.isfinite(torch.tensor(r["grad_norm"]))
        # 4 micro-batches x (forward: 4 layers x 2 + embedding + 2 log-prob; backward: 4 x 2 + output
        # layer) + the finite-loss check + the optimizer's one + Megatron DDP's size-1 one.
        assert tp2["all"] == 4 * (11 + 9) + 3


@pytest.mark.parametrize("bad", [False, True])
def test_cpu_step_skips_on_a_nonfinite_gradient_in_one_all_reduce(bad):
    results = run_world(_nonfinite_world, 2, args=(bad,), timeout=300)
    for ok, norm, n_calls in results:
        assert ok is (not bad)
        assert n_calls == 1
        assert (norm != norm) if bad else norm > 0


def _nonfinite_world(rank, world_size, bad):
    import torch.distributed as dist

    from megatron_alp.trainer.optim import Optimizer, wrap_ddp

    cfg = make_cfg(extra=["optimizer.lr=1e-3"])
    model = build(cfg, tp=2)
    ddp = wrap_ddp(model)
    opt = Optimizer([ddp], cfg.optimizer)
    opt.zero_grad()
    params = [p for p in ddp.parameters() if p.requires_grad]
    for p in params:
        p.main_grad.fill_(0.01)
    if bad and rank == 1:  # a NaN on one TP rank only, in a TP-replicated parameter (not counted in the norm)
        replicated = [p for p in params if not getattr(p, "tensor_model_parallel", False)]
        replicated[0].main_grad[..., 0] = float("nan")
    n = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (n.append(1), real(*a, **k))[1]
    try:
        ok, norm = opt.step()
    finally:
        dist.all_reduce = real
    return ok, norm, len(n)
