"""pi_old fused into the first update's forward (run.fuse_old_logp, trainer/updates.py) is exact:
the same losses, gradient norms, final weights and step metrics (ratio/, mismatch/, objective
internals) as the separate no-grad pass, over three updates that move the weights (so the later
mini-batches' pi_old must still come from the pass), at TP=2 padded and DP=2 packed; with one
update per rollout the pass does not run at all; under ALP nothing is fused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, make_cfg

pytestmark = pytest.mark.slow  # spawned two-rank worlds (make test still runs it)

N, L = 12, 14


def _batch():
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (N, L), generator=g)
    mask = torch.zeros(N, L)
    for i in range(N):
        mask[i, 3 + i % 3: L - (i % 5)] = 1
    rollout_logp = -torch.rand(N, L, generator=g) * 2 - 4.5
    return RLBatch(tokens=tokens, loss_mask=mask, rollout_logp=rollout_logp, advantages=torch.randn(N, generator=g),
                   sample_ids=torch.arange(N))


def _world(rank, world_size, extra, layout, updates):
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict
    from megatron_alp.trainer.batching import dp_balanced_shard, dp_shard
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.setup import make_actor
    from megatron_alp.trainer.updates import fused_fields, run_updates

    # Adam with eps = 1 steps by about lr x gradient: it does not blow up rounding-level gradient
    # differences (packs planned over other rows) into sign-sized updates as eps = 1e-8 would.
    cfg = make_cfg(extra=["optimizer.lr=1.0", "optimizer.adam_eps=1.0", "optimizer.weight_decay=0.0",
                          "run.micro_batch_size=2", "alp.enabled=false",
                          "algorithm.recompute_old_logp=true", "logging.mismatch_metrics=true",
                          f"run.mini_batches_per_step={updates}", *extra])
    packed = layout == "dp2_packed"
    parallel = {"tp": 2} if layout == "tp2" else {}
    full = full_state_dict(build(cfg, **parallel), V)
    out = {}
    for fuse in (False, True):
        cfg.run.fuse_old_logp = fuse
        cfg.run.max_tokens_per_micro_batch = 24 if packed else 0
        model = build(cfg, **parallel)
        load_full_state_dict(model, full)
        ddp = wrap_ddp(model)
        actor = make_actor(cfg, [ddp], Optimizer([ddp], cfg.optimizer, alp=cfg.alp))
        passes = []
        inner = actor.compute_logprobs
        actor.compute_logprobs = lambda b, inner=inner, passes=passes: (passes.append(len(b)), inner(b))[1]
        batch = _batch()
        if packed:
            local, sizes = dp_balanced_shard(batch, rank, 2, updates)
        else:
            local, sizes = (dp_shard(batch, rank, 2) if layout == "dp2" else batch), None
        per_update, step_level = run_updates(cfg, SimpleNamespace(actor=actor, ref_actor=None), local, sizes, step=0)
        out[fuse] = {"per_update": per_update, "step": step_level, "passes": passes, "fields": fused_fields(cfg),
                     "weights": full_state_dict(model, V), "moved": max(float((w - full[k]).abs().max())
                                                                   for k, w in full_state_dict(model, V).items())}
    return out


def _close(a, b, what):  # scalars and sample lists (histograms, same order: same rows, same packs)
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6, nan_ok=True), what


@pytest.mark.parametrize("extra,layout,updates", [
    (["algorithm.objective=ppo", "algorithm.eps_low=0.2", "algorithm.eps_high=0.2"], "tp2", 3),
    (["algorithm.objective=mis_seq_geo", "algorithm.eps_low=0.2", "algorithm.eps_high=0.2",
      "algorithm.is_low=0.5", "algorithm.is_high=2.0", "algorithm.aggregation=seq-mean-token-mean"], "dp2_packed", 3),
    (["algorithm.objective=ppo", "algorithm.eps_low=0.2", "algorithm.eps_high=0.2"], "dp2", 1),
], ids=["ppo_tp2_3updates", "mis_seq_geo_dp2_packed_3updates", "ppo_dp2_1update"])
def test_fused_old_logp_equals_the_separate_pass(extra, layout, updates):
    for res in run_world(_world, 2, args=(extra, layout, updates), timeout=400):
        sep, fused = res[False], res[True]
        assert fused["fields"] == ("old_logp", "base_logp") and sep["fields"] == ()
        # The separate pass ran over every row; the fused one over the later mini-batches' rows only.
        assert len(sep["passes"]) == 1 and sep["passes"][0] > 0
        if updates == 1:
            assert fused["passes"] == []
        else:
            assert len(fused["passes"]) == 1 and 0 < fused["passes"][0] < sep["passes"][0]
        for k, (a, b) in enumerate(zip(sep["per_update"], fused["per_update"], strict=True)):
            assert sorted(a) == sorted(b)
            for key in a:
                _close(a[key], b[key], (k, key))
        assert sorted(sep["step"]) == sorted(fused["step"])
        for key, v in sep["step"].items():
            _close(v, fused["step"][key], key)
        for name, w in sep["weights"].items():
            torch.testing.assert_close(fused["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
        assert any("mismatch/" in k for k in sep["step"]) and "train/loss" in sep["per_update"][0]
        assert sep["moved"] > 1e-3  # the updates moved the policy: later pi_old != the current policy


def test_alp_update_forward_never_stands_in_for_pi_old():
    from megatron_alp.trainer.updates import fused_fields

    cfg = make_cfg(extra=["alp.enabled=true", "algorithm.recompute_old_logp=true"])
    assert fused_fields(cfg) == ()
    cfg.alp.enabled = False
    assert fused_fields(cfg) == ("old_logp", "base_logp")
    cfg.run.fuse_old_logp = False
    assert fused_fields(cfg) == ()
