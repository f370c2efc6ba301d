"""Packed micro-batches through the local spec's attention (model/attention.py), by its PackedRows
mask (the CPU default) and by the THD format (Megatron's packed_seq_params path, GPU's), give the
padded rows' log-probs, as the dense block-diagonal mask does (a model whose core attention is
Megatron's stock ``DotProductAttention`` still packs that way); one process (gloo), TP=1.
Tolerance: fp32 round-off, atol 2e-5 on log-probs (RoPE angles of a packed row differ in the last
bits)."""

from __future__ import annotations

import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, make_cfg

N, L = 10, 16


def _batch():
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(4)
    mask = torch.zeros(N, L)
    for i in range(N):
        mask[i, 2 + i % 3: L - (i * 3) % 11] = 1
    return RLBatch(tokens=torch.randint(0, V, (N, L), generator=g), loss_mask=mask,
                   rollout_logp=-torch.rand(N, L, generator=g), advantages=torch.randn(N, generator=g),
                   sample_ids=torch.arange(N))


def _world(rank, world_size):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_alp.model.attention import PackedDotProductAttention
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict
    from megatron_alp.model.specs import final_norm_spec, packing_mode
    from megatron_alp.trainer.setup import make_actor

    cfg = make_cfg(extra=["run.max_tokens_per_micro_batch=40"])
    batch = _batch()
    ours = build(cfg)
    full = full_state_dict(ours, V)
    load_full_state_dict(ours, full)

    def stock_spec(_cfg, config):  # Megatron's own local spec: DotProductAttention, no THD
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=final_norm_spec())

    stock = build(cfg, block_spec=stock_spec)
    load_full_state_dict(stock, full)
    out = {"modes": (packing_mode([ours]), packing_mode([stock])),
           "ours_class": sum(isinstance(m, PackedDotProductAttention) for m in ours.modules())}
    rows, mask = make_actor(cfg, [ours]), make_actor(cfg, [stock])
    out["rows"], out["mask"] = rows.compute_logprobs(batch), mask.compute_logprobs(batch)
    rows._packing = "thd"  # what a GPU with Transformer Engine gets: packed_seq_params
    out["thd"] = rows.compute_logprobs(batch)
    rows.max_tokens = 0
    out["padded"] = rows.compute_logprobs(batch)
    out["micro"] = len(rows._micro_batches(batch)), len(make_actor(cfg, [ours])._micro_batches(batch))
    return out


def test_packed_rows_and_thd_equal_the_dense_mask_and_the_padded_rows():
    res = run_world(_world, 1, timeout=300)[0]
    assert res["modes"] == ("rows", "mask") and res["ours_class"] == 4
    assert res["micro"][1] < N // 2  # the budget packs several samples per micro-batch
    m = _batch().loss_mask > 0
    for name in ("rows", "thd", "mask"):
        torch.testing.assert_close(res[name][m], res["padded"][m], rtol=0, atol=2e-5, msg=name)
    assert res["padded"][m].abs().min() > 0
