"""Step metrics over several mini-batch updates and two data-parallel ranks (issue 22).

- The logged ratio quantiles, extremes and counts are those of *all* tokens of the step (every
  update, both DP ranks), not an average of per-update values.
- With ``recompute_old_logp: false`` and ALP on, ``mismatch/k3`` is the unperturbed pi_old-vs-mu
  value at the start of the step (computed here by an independent plain forward), not the
  perturbed or stale one.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, make_cfg

N, L, UPDATES = 12, 14, 3  # 12 sequences: 6 per DP rank, 3 mini-batch updates of 2


def _batch():
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (N, L), generator=g)
    mask = torch.zeros(N, L)
    for i in range(N):
        mask[i, 3 + i % 3: L - (i % 5)] = 1
    rollout_logp = -torch.rand(N, L, generator=g) * 3 - 3.5
    return RLBatch(tokens=tokens, loss_mask=mask, rollout_logp=rollout_logp, advantages=torch.randn(N, generator=g))


def _plain_logprobs(model, tokens):
    """Independent unperturbed forward: the model called directly, plain log_softmax."""
    pos = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    with torch.no_grad():
        logits = model(tokens, pos, None)[..., :V].float()
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(tokens.shape[0], 1), lp], 1)


def _world(rank, world_size):
    import torch.distributed as dist

    from megatron_alp.model.alp import alp_block_spec
    from megatron_alp.trainer.batching import dp_shard, mini_batches
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.setup import make_actor
    from megatron_alp.trainer.step_metrics import merge_step_metrics

    cfg = make_cfg(extra=["optimizer.lr=3e-2", "run.micro_batch_size=1", "alp.enabled=true", "alp.sigma_init=0.3",
                          "algorithm.objective=bypass_seq", "algorithm.eps_low=0.5", "algorithm.eps_high=3.0",
                          "algorithm.recompute_old_logp=false"])
    model = build(cfg, block_spec=lambda c, cc: alp_block_spec(c.model, c.alp, cc))
    ddp = wrap_ddp(model)
    actor = make_actor(cfg, [ddp], Optimizer([ddp], cfg.optimizer, alp=cfg.alp))
    local = dp_shard(_batch(), rank, world_size)
    model.eval()
    plain = _plain_logprobs(model, local.tokens)  # before any update: the unperturbed pi_old
    model.train()
    local.base_logp = actor.compute_logprobs(local)  # what the loop does when pi_old is not recomputed
    per_update, record = [], []
    for k, mb in enumerate(mini_batches(local, UPDATES)):
        per_update.append(actor.train_step(mb, step=k, record=record))
    metrics = merge_step_metrics(per_update, actor.step_metrics(record), src_rank=0)
    # Every token of the step on this rank: (pi - mu) log-ratios as the updates saw them.
    mine = torch.cat([torch.cat(r["lp"]).double() - torch.cat([mb.rollout_logp for mb in r["mb"]]).double()
                      for r in record])
    mask = torch.cat([torch.cat([mb.loss_mask for mb in r["mb"]]) for r in record]) > 0
    seq = torch.cat([torch.cat([((lp.double() - mb.rollout_logp.double()) * mb.loss_mask).sum(-1)
                                for lp, mb in zip(r["lp"], r["mb"], strict=True)])
                     for r in record])
    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, (mine[mask].double(), seq.double(), plain, local.rollout_logp, local.loss_mask,
                                      [u.get("train/loss") for u in per_update]))
    return metrics, per_rank


def test_step_quantiles_are_exact_over_all_updates_and_ranks_and_mismatch_is_unperturbed():
    results = run_world(_world, 2, timeout=400)
    metrics, per_rank = results[0]
    assert results[1][0] == metrics  # every rank gets the same merged metrics
    tok = torch.cat([p[0] for p in per_rank]).exp()
    seq = torch.cat([p[1] for p in per_rank]).exp()
    assert metrics["train/tokens"] == tok.numel()  # summed over updates and ranks, not averaged
    assert metrics["train/sequences"] == N
    qs = {"p0.1": 0.001, "p1": 0.01, "p50": 0.5, "p99": 0.99, "p99.9": 0.999}
    for prefix, vals in (("ratio/token", tok), ("ratio/seq", seq)):
        for label, q in qs.items():
            want = torch.quantile(vals, q).item()
            assert metrics[f"{prefix}_{label}"] == pytest.approx(want, rel=1e-9, abs=1e-12), (prefix, label)
        assert metrics[f"{prefix}_min"] == pytest.approx(vals.min().item(), rel=1e-12)
        assert metrics[f"{prefix}_max"] == pytest.approx(vals.max().item(), rel=1e-12)
    # Bypass_seq's loss ratio is the sequence ratio counted once per token (ALP reference's logging).
    per_tok_seq = torch.cat([p[1].repeat_interleave(p[4].sum(-1).long()[:, None].reshape(-1)) for p in per_rank])
    assert per_tok_seq.numel() == tok.numel()
    assert metrics["ratio/loss_p50"] == pytest.approx(torch.quantile(per_tok_seq.clamp(-20, 20).exp(), 0.5).item(),
                                                     rel=1e-9)
    # The updates moved the policy, so an average of per-update maxima would differ from the max.
    assert metrics["ratio/k3"] != metrics["ratio/k3_first_update"]
    # mismatch/k3: the unperturbed pi_old (plain forward before the step) vs mu, over both ranks.
    d = torch.cat([(p[2] - p[3])[p[4] > 0].double() for p in per_rank])
    k3 = (d.exp() - 1 - d).mean().item()
    assert metrics["mismatch/k3"] == pytest.approx(k3, rel=1e-5)
    # ... which is not what the perturbed first update saw (sigma = 0.3 moves the log-probs).
    assert not math.isclose(metrics["ratio/k3_first_update"], k3, rel_tol=1e-3)
    assert metrics["train/loss"] == pytest.approx(sum(per_rank[0][5]) / UPDATES, rel=1e-12)
