"""Same weights, different parallel layouts -> same logits, loss and gradients.

One spawned gloo world of 2 processes runs the layouts one after another (TP=1 reference, TP=2,
TP=2 with sequence parallel, PP=2 through Megatron's 1F1B schedule, DP=2 through Megatron's DDP),
loading the reference's full weights into each. Tolerance: fp32 round-off, atol 2e-5 on logits
and loss, rtol 1e-4 / atol 1e-6 on gradients (summation order differs across layouts).
"""

from __future__ import annotations

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import (
    V,
    batch,
    build,
    ce_loss,
    gather_tp_logits,
    make_cfg,
    positions,
    schedule_loss,
    wrap_ddp,
)


def _world(rank, world_size, tie):
    from megatron.core.distributed import finalize_model_grads

    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict
    from megatron_alp.runtime.grad_clip import grad_norm

    cfg = make_cfg(tie)
    tokens, labels = batch()
    res = {}

    # Reference: TP=1, PP=1, full batch, on every rank.
    model = build(cfg)
    full = full_state_dict(model, V)
    load_full_state_dict(model, full)  # zero the padded vocabulary rows, as every other layout gets them
    logits = model(tokens, positions(tokens), None)
    loss = ce_loss(logits, labels)
    loss.backward()
    ref = {"logits": logits.detach()[..., :V], "loss": loss.detach(), "grads": full_state_dict(model, V, grads=True),
           "norm": grad_norm(model.parameters())}

    # TP=2, with and without sequence parallel.
    for sp in (False, True):
        model = build(cfg, tp=2, sequence_parallel=sp)
        load_full_state_dict(model, full)
        ddp = wrap_ddp(model)
        ddp.zero_grad_buffer()
        logits = ddp(tokens, positions(tokens), None)
        loss = ce_loss(logits, labels)
        loss.backward()
        # Megatron's own gradient finalisation: DP reduction, and the TP all-reduce of the
        # sequence-parallel norm weights and the QK norms.
        finalize_model_grads([ddp])
        res[f"tp2_sp{int(sp)}"] = {
            "logits": gather_tp_logits(logits.detach())[..., :V],
            "loss": loss.detach(),
            "grads": full_state_dict(model, V, grads=True),
            "norm": grad_norm(model.parameters()),
        }

    # PP=2 through Megatron's 1F1B schedule with 2 micro-batches.
    model = build(cfg, pp=2)
    load_full_state_dict(model, full)
    loss = schedule_loss(wrap_ddp(model), tokens, labels, micro_batch_size=2)
    res["pp2"] = {"loss": loss, "grads": full_state_dict(model, V, grads=True), "norm": grad_norm(model.parameters())}

    # DP=2 through Megatron's DDP: each rank a half batch, gradients averaged over DP.
    model = build(cfg)
    load_full_state_dict(model, full)
    ddp = wrap_ddp(model)
    ddp.zero_grad_buffer()
    half = slice(2 * rank, 2 * rank + 2)
    loss = ce_loss(ddp(tokens[half], positions(tokens[half]), None), labels[half])
    loss.backward()
    ddp.finish_grad_sync()
    res["dp2"] = {"grads": full_state_dict(model, V, grads=True), "norm": grad_norm(model.parameters())}
    return ref, res


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_layouts_match_tp1(tie):
    results = run_world(_world, 2, args=(tie,), timeout=400)
    ref, _ = results[0]
    for ref_r, res in results:
        # Both ranks computed the same reference.
        torch.testing.assert_close(ref_r["loss"], ref["loss"], rtol=1e-6, atol=1e-7)  # two processes: no bitwise claim
        for key in ("tp2_sp0", "tp2_sp1"):
            torch.testing.assert_close(res[key]["logits"], ref["logits"], rtol=1e-5, atol=2e-5, msg=f"{key} logits")
            torch.testing.assert_close(res[key]["loss"], ref["loss"], rtol=1e-6, atol=2e-5, msg=f"{key} loss")
            assert set(res[key]["grads"]) == set(ref["grads"])
            for name, g in res[key]["grads"].items():
                torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=f"{key} grad {name}")
        # PP: each stage holds half of the layers; the loss lives on the last stage.
        pp = res["pp2"]
        if pp["loss"] is not None:
            torch.testing.assert_close(pp["loss"], ref["loss"], rtol=1e-6, atol=2e-5,
                                       msg=lambda m, pp=pp: f"pp2 loss {pp['loss']} vs {ref['loss']}: {m}")
        assert pp["grads"], "a pipeline stage returned no gradients"
        for name, g in pp["grads"].items():
            # Tied embeddings: the last stage's output_layer.weight is the embedding's copy, and
            # Megatron all-reduces the two copies' gradients (finalize_model_grads).
            ref_name = "embedding.word_embeddings.weight" if (tie and name == "output_layer.weight") else name
            torch.testing.assert_close(g, ref["grads"][ref_name], rtol=1e-4, atol=1e-6, msg=f"pp2 grad {name}")
        # The global gradient norm used for clipping counts every parameter once in every layout.
        for key in ("tp2_sp0", "tp2_sp1", "pp2", "dp2"):
            assert abs(res[key]["norm"] - ref["norm"]) <= 1e-5 * ref["norm"], (key, res[key]["norm"], ref["norm"])
        for name, g in res["dp2"]["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=f"dp2 grad {name}")
    # Between them, the two PP stages cover every parameter.
    covered = set(results[0][1]["pp2"]["grads"]) | set(results[1][1]["pp2"]["grads"])
    assert covered >= set(ref["grads"]) - {"output_layer.weight"}
