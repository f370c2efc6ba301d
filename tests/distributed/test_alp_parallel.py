"""ALP under every layout: TP=2 (SP off/on) and PP=2 give TP=1's loss, weight and sigma gradients;
activation recomputation regenerates the same noise; ALP off is bitwise the stock model; exports
exclude sigma.

One 2-process gloo world runs the layouts in sequence with identical full weights (sigma included).
The reference is rank 0's TP=1 run (DP rank 0: the noise key includes the DP rank, and every other
layout here has DP size 1). Tolerances as in test_model_invariance: fp32 round-off.
"""

from __future__ import annotations

import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, batch, build, ce_loss, make_cfg, positions, schedule_loss, wrap_ddp

SIGMA = 0.05
STEP = 7


def _alp_spec(cfg, config):
    from megatron_alp.model.alp import alp_block_spec

    return alp_block_spec(cfg.model, cfg.alp, config)


def _ctx(i):
    from megatron_alp.model.alp import alp_forward

    return alp_forward(step=STEP, micro_batch=i)


def _run(cfg, full, tokens, labels, micro_batch_size=2, **parallel):
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict

    model = build(cfg, block_spec=_alp_spec, **parallel)
    load_full_state_dict(model, full)
    loss = schedule_loss(wrap_ddp(model), tokens, labels, micro_batch_size, forward_ctx=_ctx)
    return {"loss": loss, "grads": full_state_dict(model, V, grads=True, include_alp=True)}


def _reference(cfg, full, tokens, labels, micro_batch_size=2):
    """TP=1 without DDP: in this 2-process world TP=1 means DP=2, and DDP would average the two
    DP ranks' gradients, whose noise differs by design."""
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict

    model = build(cfg, block_spec=_alp_spec)
    load_full_state_dict(model, full)
    n = tokens.shape[0] // micro_batch_size
    losses = []
    for i in range(n):
        t = tokens[i * micro_batch_size:(i + 1) * micro_batch_size]
        lab = labels[i * micro_batch_size:(i + 1) * micro_batch_size]
        with _ctx(i):
            loss = ce_loss(model(t, positions(t), None), lab)
        (loss / n).backward()
        losses.append(loss.detach())
    return {"loss": torch.stack(losses).mean(), "grads": full_state_dict(model, V, grads=True, include_alp=True)}


def _world(rank, world_size, target):
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict

    cfg = make_cfg(tie=False, extra=["alp.enabled=true", f"alp.sigma_init={SIGMA}", f"alp.target={target}"])
    tokens, labels = batch()
    model = build(cfg, block_spec=_alp_spec)
    full = full_state_dict(model, V, include_alp=True)
    out = {"alp_names": sorted(n for n in full if "log_sigma" in n),
           "export_names": sorted(full_state_dict(model, V))}

    out["ref"] = _reference(cfg, full, tokens, labels)
    out["tp2"] = _run(cfg, full, tokens, labels, tp=2)
    out["tp2_sp"] = _run(cfg, full, tokens, labels, tp=2, sequence_parallel=True)
    out["pp2"] = _run(cfg, full, tokens, labels, pp=2)
    # Recompute: the backward runs after the alp_forward block has closed, so the recomputed
    # layers must find their context in the RNG-tracker state Megatron restores.
    cfg_full = make_cfg(tie=False, extra=["alp.enabled=true", f"alp.sigma_init={SIGMA}", f"alp.target={target}",
                                          "parallel.recompute=full", "parallel.recompute_num_layers=2"])
    # (at TP=2 so that DP is 1 and DDP's averaging does not mix two DP ranks' noise)
    out["recompute_full"] = _run(cfg_full, full, tokens, labels, tp=2, recompute="full", recompute_num_layers=2)
    cfg_sel = make_cfg(tie=False, extra=["alp.enabled=true", f"alp.sigma_init={SIGMA}", f"alp.target={target}"])
    out["recompute_selective"] = _run(cfg_sel, full, tokens, labels, tp=2, recompute="selective")

    # Perturbation off (outside alp_forward): bitwise the stock model with the same weights.
    alp_model = build(cfg, block_spec=_alp_spec)
    load_full_state_dict(alp_model, full)
    stock = build(make_cfg(tie=False))
    load_full_state_dict(stock, full_state_dict(alp_model, V))
    with torch.no_grad():
        out["off_alp"] = alp_model(tokens, positions(tokens), None)
        out["off_stock"] = stock(tokens, positions(tokens), None)
        with _ctx(0):
            out["on_alp"] = alp_model(tokens, positions(tokens), None)
    return out


def _check(target):
    results = run_world(_world, 2, args=(target,), timeout=500)
    ref = results[0]["ref"]
    assert ref["loss"] is not None
    sigma_names = results[0]["alp_names"]
    if target == "layers":
        assert len(sigma_names) == 4  # one per decoder layer
    else:
        assert sigma_names == ["decoder.final_layernorm.perturbation.log_sigma"]
    for name in sigma_names:
        assert ref["grads"][name].abs().item() > 0, f"sigma {name} got no gradient"
    for res in results:
        assert not any("log_sigma" in n for n in res["export_names"]), "an export carries sigma"
        for key in ("tp2", "tp2_sp", "pp2", "recompute_full", "recompute_selective"):
            got = res[key]
            if got["loss"] is not None:
                torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=2e-5, msg=f"{key} loss")
            assert got["grads"], key
            for name, g in got["grads"].items():
                torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=f"{key} grad {name}")
        torch.testing.assert_close(res["off_alp"], res["off_stock"], rtol=0, atol=0, msg="ALP off is not bitwise stock")
        assert not torch.allclose(res["on_alp"], res["off_alp"]), "ALP on changed nothing"
    # PP: both stages together cover every gradient, sigma included.
    covered = set(results[0]["pp2"]["grads"]) | set(results[1]["pp2"]["grads"])
    assert covered == set(ref["grads"])


def test_alp_layers_invariant_across_layouts_and_recompute():
    _check("layers")


def test_alp_logits_only_invariant_across_layouts():
    _check("logits")
