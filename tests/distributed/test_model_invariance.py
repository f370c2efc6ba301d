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

V = 250  # real vocabulary: padded to 256 at TP=1 and TP=2


def _cfg(tie: bool):
    from megatron_alp.config import load_config

    return load_config(
        None,
        [
            "model.num_layers=4",
            "model.hidden_size=64",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.ffn_hidden_size=96",
            f"model.vocab_size={V}",
            f"model.tie_embeddings={str(tie).lower()}",
        ],
    )


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (4, 16), generator=g)
    labels = torch.randint(0, V, (4, 16), generator=g)
    return tokens, labels


def _positions(tokens):
    return torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)


def _loss(logits, labels):
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(logits.float().contiguous(), labels).mean()


def _build(cfg, **parallel):
    from megatron_alp.config import ParallelConfig
    from megatron_alp.model.builder import build_gpt_model
    from megatron_alp.runtime.distributed import init_parallel_state

    cfg.parallel = ParallelConfig(**parallel)
    init_parallel_state(cfg.parallel, cfg.model, seed=11)
    return build_gpt_model(cfg.model, cfg.parallel, cfg.precision)


def _gather_tp_logits(logits):
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    g = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(g))]
    dist.all_gather(parts, logits.contiguous(), group=g)
    return torch.cat(parts, dim=-1)


def _wrap_ddp(cfg, model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def _pp_loss_and_grads(cfg, full, tokens, labels):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict
    from megatron_alp.runtime.grad_clip import grad_norm

    model = _build(cfg, pp=2)
    load_full_state_dict(model, full)
    ddp = _wrap_ddp(cfg, model)
    ddp.config.finalize_model_grads_func = finalize_model_grads
    micro = [(tokens[i : i + 2], labels[i : i + 2]) for i in (0, 2)]

    def step(data_iter, m):
        t, lab = next(data_iter)
        out = m(t, _positions(t), None)

        def loss_func(logits):
            loss = _loss(logits, lab)
            return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

        return out, loss_func

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro), model=[ddp], num_microbatches=2,
        seq_length=tokens.shape[1], micro_batch_size=2, forward_only=False,
    )
    loss = torch.stack([d["loss"] for d in losses]).mean() if ps.is_pipeline_last_stage() else None
    return loss, full_state_dict(model, V, grads=True), grad_norm(model.parameters())


def _world(rank, world_size, tie):
    import torch.distributed as dist
    from megatron.core.distributed import finalize_model_grads
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict
    from megatron_alp.runtime.grad_clip import grad_norm

    cfg = _cfg(tie)
    tokens, labels = _batch()
    res = {}

    # Reference: TP=1, PP=1, full batch, on every rank.
    model = _build(cfg)
    full = full_state_dict(model, V)
    load_full_state_dict(model, full)  # zero the padded vocabulary rows, as every other layout gets them
    logits = model(tokens, _positions(tokens), None)
    loss = _loss(logits, labels)
    loss.backward()
    ref = {"logits": logits.detach()[..., :V], "loss": loss.detach(), "grads": full_state_dict(model, V, grads=True),
           "norm": grad_norm(model.parameters())}

    # TP=2, with and without sequence parallel.
    for sp in (False, True):
        model = _build(cfg, tp=2, sequence_parallel=sp)
        load_full_state_dict(model, full)
        ddp = _wrap_ddp(cfg, model)
        ddp.zero_grad_buffer()
        logits = ddp(tokens, _positions(tokens), None)
        loss = _loss(logits, labels)
        loss.backward()
        # Megatron's own gradient finalisation: DP reduction, and the TP all-reduce of the
        # sequence-parallel norm weights and the QK norms.
        finalize_model_grads([ddp])
        res[f"tp2_sp{int(sp)}"] = {
            "logits": _gather_tp_logits(logits.detach())[..., :V],
            "loss": loss.detach(),
            "grads": full_state_dict(model, V, grads=True),
            "norm": grad_norm(model.parameters()),
        }

    # PP=2 through Megatron's 1F1B schedule with 2 micro-batches.
    loss, grads, norm = _pp_loss_and_grads(cfg, full, tokens, labels)
    res["pp2"] = {"loss": loss, "grads": grads, "norm": norm}

    # DP=2 through Megatron's DDP: each rank a half batch, gradients averaged over DP.
    model = _build(cfg)
    load_full_state_dict(model, full)
    ddp = _wrap_ddp(cfg, model)
    ddp.zero_grad_buffer()
    half = slice(2 * rank, 2 * rank + 2)
    loss = _loss(ddp(tokens[half], _positions(tokens[half]), None), labels[half])
    loss.backward()
    ddp.finish_grad_sync()
    dist.all_reduce(loss.detach(), op=dist.ReduceOp.SUM)
    res["dp2"] = {"grads": full_state_dict(model, V, grads=True), "norm": grad_norm(model.parameters())}
    return ref, res


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_layouts_match_tp1(tie):
    results = run_world(_world, 2, args=(tie,), timeout=400)
    ref, _ = results[0]
    for rank, (ref_r, res) in enumerate(results):
        # Both ranks computed the same reference.
        torch.testing.assert_close(ref_r["loss"], ref["loss"], rtol=0, atol=0)
        for key in ("tp2_sp0", "tp2_sp1"):
            torch.testing.assert_close(res[key]["logits"], ref["logits"], rtol=1e-5, atol=2e-5, msg=f"{key} logits")
            torch.testing.assert_close(res[key]["loss"], ref["loss"], rtol=1e-6, atol=2e-5, msg=f"{key} loss")
            assert set(res[key]["grads"]) == set(ref["grads"])
            for name, g in res[key]["grads"].items():
                torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=f"{key} grad {name}")
        # PP: each stage holds half of the layers; the loss lives on the last stage.
        pp = res["pp2"]
        if pp["loss"] is not None:
            torch.testing.assert_close(pp["loss"], ref["loss"], rtol=1e-6, atol=2e-5, msg=lambda m: f"pp2 loss {pp['loss']} vs {ref['loss']}: {m}")
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
