"""The actor's policy update is layout-independent: the RL loss and every gradient at TP=2 (SP),
PP=2 and DP=2 (global normalisers, two micro-batches per rank) equal the TP=1 single-rank values,
with ALP on (its noise is keyed on each token's sample and index, so DP=2 sees the same noise) and
for the sequence-level objective and aggregation (straight-through ratio, seq-mean-token-sum-norm).
Sequence packing (run.max_tokens_per_micro_batch) gives the same loss, gradients (sigma's too) and
metrics as padding at TP=2 + SP, PP=2 and DP=2 (rows balanced by tokens), ALP on and off."""

from __future__ import annotations

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, make_cfg

pytestmark = pytest.mark.slow  # several spawned worlds per case (make test still runs it)

N, L = 8, 12


def _batch():
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (N, L), generator=g)
    mask = torch.zeros(N, L)
    for i in range(N):  # prompt of 3-5 tokens, response to a random end, right padding
        start, end = 3 + i % 3, L - (i % 4)
        mask[i, start:end] = 1
    rollout_logp = -torch.rand(N, L, generator=g) * 3 - 2.5
    adv = torch.randn(N, generator=g)
    return RLBatch(tokens=tokens, loss_mask=mask, rollout_logp=rollout_logp, advantages=adv,
                   sample_ids=torch.arange(N))


def _naive(cfg, spec, full, batch):
    """Independent reference: TP=1 model called directly (no schedule, no DDP, no actor), plain
    log_softmax log-probs, the whole batch's loss from token_losses + aggregate (own normaliser)."""
    from megatron_alp.algo.objectives import aggregate, token_losses
    from megatron_alp.model.alp import alp_forward, token_codes
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict

    model = build(cfg, block_spec=spec)
    load_full_state_dict(model, full)
    lps = []
    mbs = cfg.run.micro_batch_size
    for i in range(0, N, mbs):
        t = batch.tokens[i:i + mbs]
        pos = torch.arange(L)[None].expand(t.shape[0], -1)
        codes = token_codes(torch.arange(i, i + t.shape[0])[:, None].expand(-1, L), torch.arange(L)[None])
        with alp_forward(3, i // mbs, codes) if cfg.alp.enabled else torch.enable_grad():
            logits = model(t, pos, None)[..., :V].float()
        lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, t[:, 1:, None]).squeeze(-1)
        lps.append(torch.cat([torch.zeros(t.shape[0], 1), lp], 1))
    lp = torch.cat(lps)
    algo = cfg.algorithm
    loss = aggregate(token_losses(algo.objective, lp, batch.rollout_logp, batch.advantages, batch.loss_mask,
                                  **algo.objective_hparams()), batch.loss_mask, algo.aggregation, horizon=algo.horizon)
    loss.backward()
    return {"loss": loss.item(), "grads": full_state_dict(model, V, grads=True, include_alp=True)}


def _world(rank, world_size, extra, packing):
    from megatron_alp.model.alp import alp_block_spec
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.packing import balance_over_dp, sample_lengths
    from megatron_alp.trainer.setup import make_actor

    cfg = make_cfg(extra=["optimizer.lr=0.0", "optimizer.clip_grad=0.0", "run.micro_batch_size=2",
                          "alp.sigma_init=0.05", *extra])
    spec = lambda c, cc: alp_block_spec(c.model, c.alp, cc)  # noqa: E731
    batch = _batch()
    out = {}

    def run(name, data, budget=0, **parallel):
        cfg.run.max_tokens_per_micro_batch = budget
        model = build(cfg, block_spec=spec, **parallel)
        load_full_state_dict(model, full)
        ddp = wrap_ddp(model)
        actor = make_actor(cfg, [ddp], Optimizer([ddp], cfg.optimizer, alp=cfg.alp))
        record = []
        metrics = actor.train_step(data, step=3, record=record)
        metrics.update(actor.step_metrics(record))  # the token metrics (ratio/, mismatch/...) of the update
        out[name] = {"loss": metrics.get("train/loss"),
                     "grads": full_state_dict(model, V, grads=True, include_alp=True),
                     "metrics": metrics}

    model = build(cfg, block_spec=spec, tp=2)  # any layout: only to draw the full weights
    full = full_state_dict(model, V, include_alp=True)
    out["naive"] = _naive(cfg, spec, full, batch)
    run("tp2", batch, tp=2)
    run("tp2_sp", batch, tp=2, sequence_parallel=True)
    run("pp2", batch, pp=2)
    half = slice(rank * N // 2, (rank + 1) * N // 2)
    run("dp2", batch.select(half))
    if packing:  # 3 packs of <= 20 tokens per rank (samples of 9-12 tokens)
        run("tp2_sp_packed", batch, budget=20, tp=2, sequence_parallel=True)
        run("pp2_packed", batch, budget=20, pp=2)
        rows = balance_over_dp(sample_lengths(batch), 2)[rank]
        run("dp2_packed", batch.select(torch.tensor(rows)), budget=20)
    return out


@pytest.mark.parametrize("extra,packing", [
    (["alp.enabled=true", "algorithm.objective=bypass_token", "algorithm.eps_low=0.5", "algorithm.eps_high=3.0"], True),
    (["alp.enabled=false", "algorithm.objective=bypass_seq", "algorithm.aggregation=seq-mean-token-sum-norm",
      "algorithm.horizon=16", "algorithm.dual_clip=3.0"], True),
    (["alp.enabled=false", "algorithm.objective=drpo", "algorithm.delta=0.5"], False),
], ids=["token_alp", "seq_bypass_seqnorm", "drpo"])
def test_actor_layout_invariance(extra, packing):
    results = run_world(_world, 2, args=(extra, packing), timeout=500)
    # Rank 0's naive run has DP rank 0, like every layout below (their DP size is 1).
    ref = results[0]["naive"]
    ref_loss = ref["loss"]
    assert abs(ref_loss) > 0
    for res in results:
        for key, got in res.items():
            if key == "naive":
                continue
            if got["loss"] is not None:
                assert got["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), key
            for name, g in got["grads"].items():
                torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
    assert any(g.abs().sum() > 0 for g in ref["grads"].values())
    if packing:  # every metric of a packed update equals the padded one's (same layout, same rank)
        for res in results:
            for name in ("tp2_sp", "pp2", "dp2"):
                padded, packed = res[name]["metrics"], res[name + "_packed"]["metrics"]
                assert sorted(padded) == sorted(packed), name
                assert 0 <= packed["perf/padding_frac"] < 1 and 0 <= padded["perf/padding_frac"] < 1, name
                for k, v in padded.items():
                    if k.startswith("perf/"):  # padding and micro-batch counts: what packing changes
                        continue
                    if isinstance(v, list):
                        assert sorted(packed[k]) == pytest.approx(sorted(v), rel=1e-4, abs=1e-5), (name, k)
                    else:
                        assert packed[k] == pytest.approx(v, rel=1e-4, abs=1e-5, nan_ok=True), (name, k)
        assert any("alp/" in k or "ratio/" in k for k in results[-1]["pp2"]["metrics"])
