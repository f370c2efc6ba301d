"""The shared CPU/GPU paths in a real (one-rank, gloo) Megatron world: the actor's batch reaches the
model's device, a NaN gradient is caught before the optimizer step by the check bf16 relies on,
an optimizer saved before its first step resumes exactly, and a checkpoint without
``_extra_state`` objects loads into a model that asks for them (the TE spec does)."""

from __future__ import annotations

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, make_cfg


def _batch():
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(0)
    b = RLBatch(tokens=torch.randint(0, V, (4, 10), generator=g), loss_mask=torch.ones(4, 10),
                rollout_logp=-torch.rand(4, 10, generator=g) - 1, advantages=torch.randn(4, generator=g))
    b.loss_mask[:, 0] = 0
    return b


def _actor(lr="1e-2"):
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.setup import make_actor

    cfg = make_cfg(extra=[f"optimizer.lr={lr}", "run.micro_batch_size=2", "alp.enabled=false"])
    model = build(cfg)
    ddp = wrap_ddp(model)
    opt = Optimizer([ddp], cfg.optimizer)
    return model, ddp, opt, make_actor(cfg, [ddp], opt)


def _device_and_nan(rank, world_size):
    from megatron_alp.runtime.device import grads_nonfinite

    model, ddp, opt, actor = _actor()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].device))
    m0 = actor.train_step(_batch(), step=0)
    weight_device = next(model.parameters()).device
    # A NaN in one gradient after the schedule: the shared check sees it; step() skips untouched.
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    opt.zero_grad()
    clean = grads_nonfinite([ddp])
    p = next(q for q in model.parameters() if q.requires_grad)
    p.main_grad.view(-1)[0] = float("nan")
    dirty = grads_nonfinite([ddp])
    ok, norm = opt.step()
    after = model.state_dict()
    untouched = all(torch.equal(before[k], after[k]) for k in before)
    return {"seen": [str(d) for d in seen], "weights": str(weight_device), "m0": m0, "clean": clean,
            "dirty": dirty, "ok": ok, "norm": norm, "untouched": untouched}


def _all(rank, world_size, path):
    return _device_and_nan(rank, world_size), _resume_before_first_step(rank, world_size), \
        _extra_state_load(rank, world_size, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One spawned world for the three scenarios (each spawn costs ~15 s of imports)."""
    return run_world(_all, 1, args=(str(tmp_path_factory.mktemp("ckpt") / "c"),), timeout=400)[0]


def test_batch_on_model_device_and_nan_gradient_skipped(world):
    r = world[0]
    assert r["seen"] and all(d == r["weights"] for d in r["seen"])
    assert r["m0"]["train/skipped_step"] == 0.0
    assert r["clean"] is False and r["dirty"] is True
    assert r["ok"] is False and r["norm"] != r["norm"]  # NaN
    assert r["untouched"]


def _resume_before_first_step(rank, world_size):
    import io

    model, ddp, opt, actor = _actor()
    state = opt.state_dict()  # before any step: nothing to assert on
    empty = [e["state"] is None for e in state["subs"]]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": state}, buf)
    m1 = actor.train_step(_batch(), step=0)
    after_a = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model2, ddp2, opt2, actor2 = _actor()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    m2 = actor2.train_step(_batch(), step=0)
    after_b = model2.state_dict()
    same = all(torch.equal(after_a[k], after_b[k]) for k in after_a)
    return empty, same, m1["train/loss"], m2["train/loss"]


def test_optimizer_saved_before_first_step_resumes_exactly(world):
    empty, same, l1, l2 = world[1]
    assert empty and all(empty)
    assert same and l1 == l2  # same process, same thread count: bitwise


def _extra_state_load(rank, world_size, path):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_alp.convert.mcore_ckpt import load_megatron_checkpoint, meta_for, save_megatron_checkpoint

    cfg = make_cfg()
    model = build(cfg)
    save_megatron_checkpoint(model, path, meta_for(cfg.model, None, torch.float32, 1, 1, None))
    target = build(make_cfg())
    original = target.sharded_state_dict

    def with_extra(*a, **k):  # what a TE module adds: an FP8-metadata object per layer
        sd = original(*a, **k)
        key = "decoder.layers.self_attention.core_attention._extra_state"  # TEDotProductAttention's
        sd[key] = ShardedObject(key, None, (1,), (0,), replica_id=0)
        return sd

    target.sharded_state_dict = with_extra
    load_megatron_checkpoint(target, path)
    equal = all(torch.equal(a, b)
                for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True)
                if isinstance(a, torch.Tensor))

    def with_unknown(*a, **k):
        sd = original(*a, **k)
        w = sd["decoder.final_layernorm.weight"]
        sd["decoder.final_layernorm.weight"] = w.__class__.from_rank_offsets("not.in.checkpoint", w.data)
        return sd

    target.sharded_state_dict = with_unknown
    try:
        load_megatron_checkpoint(target, path)
        refused = False
    except KeyError as e:
        refused = "not.in.checkpoint" in str(e)
    return equal, refused


def test_checkpoint_without_extra_state_loads_into_a_model_that_wants_it(world):
    equal, refused = world[2]
    assert equal, "weights must load although the model asks for _extra_state the checkpoint lacks"
    assert refused, "a genuinely missing tensor must still fail"
