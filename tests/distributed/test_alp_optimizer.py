"""sigma's own optimizer group through Megatron's optimizer: sigma_lr, no weight decay, and a
fixed sigma (learnable: false) that never moves."""

from __future__ import annotations

import math

import torch

from megatron_alp.runtime.spawn import run_world


def _world(rank, world_size, learnable):
    from megatron_alp.config import load_config
    from megatron_alp.config.loader import CONFIG_ROOT
    from megatron_alp.model.alp import alp_block_spec, alp_forward
    from megatron_alp.model.builder import build_gpt_model
    from megatron_alp.runtime.distributed import init_parallel_state
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp

    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml", [
        "alp.enabled=true", "alp.sigma_init=0.1", "alp.sigma_lr=0.05", f"alp.learnable={str(learnable).lower()}",
        "optimizer.lr=1e-4", "optimizer.weight_decay=0.1",
    ])
    init_parallel_state(cfg.parallel, cfg.model, seed=0)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel, cfg.precision,
                                     block_spec=lambda c: alp_block_spec(cfg.model, cfg.alp, c)))
    opt = Optimizer([model], cfg.optimizer, alp=cfg.alp)
    sigmas = lambda: [p.detach().clone() for n, p in model.named_parameters() if n.endswith("log_sigma")]  # noqa: E731
    before = sigmas()
    groups = []
    for g in opt.megatron.param_groups:
        groups.append({"lr": g["lr"], "wd": g["weight_decay"],
                       "n_sigma": sum(1 for p in g["params"] if getattr(p, "alp_sigma", False)),
                       "n": len(g["params"])})
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    pos = torch.arange(16)[None].expand(2, -1)
    for step in range(3):
        opt.zero_grad()
        with alp_forward(step, 0):
            logits = model(tokens, pos, None)
        logits.float().pow(2).mean().backward()
        model.finish_grad_sync()
        opt.step()
    return groups, before, sigmas()


def test_sigma_group_and_learning():
    groups, before, after = run_world(_world, 1, args=(True,), timeout=200)[0]
    sigma_groups = [g for g in groups if g["n_sigma"]]
    assert len(sigma_groups) == 1 and sigma_groups[0]["n_sigma"] == sigma_groups[0]["n"] == 4
    assert math.isclose(sigma_groups[0]["lr"], 0.05) and sigma_groups[0]["wd"] == 0.0
    others = [g for g in groups if not g["n_sigma"]]
    assert all(math.isclose(g["lr"], 1e-4) for g in others)
    assert any(g["wd"] > 0 for g in others) and any(g["wd"] == 0 for g in others)  # 1-D weights undecayed
    # Adam moves each parameter by about lr per step: 3 steps at sigma_lr = 0.05 move log-sigma by
    # 0.05-0.15; at the weights' lr (1e-4) it would barely move.
    for a, b in zip(after, before, strict=True):
        assert 0.04 < (a - b).abs().item() <= 0.15 + 1e-6, (a, b)


def test_fixed_sigma_does_not_move():
    groups, before, after = run_world(_world, 1, args=(False,), timeout=200)[0]
    assert not any(g["n_sigma"] for g in groups), "a fixed sigma must not be handed to the optimizer"
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def _foreach_world(rank, world_size):
    from megatron_alp.config import load_config
    from megatron_alp.config.loader import CONFIG_ROOT
    from megatron_alp.model.builder import build_gpt_model
    from megatron_alp.runtime.distributed import init_parallel_state
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp

    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml", ["optimizer.lr=1e-2", "optimizer.clip_grad=0.05"])
    init_parallel_state(cfg.parallel, cfg.model, seed=0)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel, cfg.precision))
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None].expand(2, -1)
    out = {}
    for foreach in (True, False):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(start[k])
        opt = Optimizer([model], cfg.optimizer)
        flags = {g.get("foreach") for g in opt.megatron.param_groups}
        if not foreach:
            for g in opt.megatron.param_groups:
                g["foreach"] = False
        norms = []
        for _ in range(3):
            opt.zero_grad()
            model(tokens, pos, None).float().pow(2).mean().backward()
            model.finish_grad_sync()
            norms.append(opt.step()[1])
        opt.load_state_dict(opt.state_dict())
        moved = any(not torch.equal(p, start[k]) for k, p in model.named_parameters())
        reloaded = {g.get("foreach") for g in opt.megatron.param_groups}
        out[foreach] = {"flags": flags, "moved": moved, "reloaded": reloaded,
                        "norms": norms, "weights": {k: p.detach().clone() for k, p in model.named_parameters()}}
    return out


def test_cpu_adam_runs_foreach_with_the_same_values():
    """On CPU the optimizer runs torch's foreach Adam (also after a state load): bitwise the same
    weights as the per-tensor loop, with gradient clipping active."""
    out = run_world(_foreach_world, 1, timeout=200)[0]
    assert out[True]["flags"] == {True} and out[True]["reloaded"] == {True} and out[True]["moved"]
    assert out[True]["norms"] == out[False]["norms"] and out[True]["norms"][0] > 0.05  # clipped
    for k, v in out[True]["weights"].items():
        assert torch.equal(v, out[False]["weights"][k]), k
