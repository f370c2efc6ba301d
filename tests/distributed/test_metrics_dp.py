"""Metrics across two data-parallel ranks of a real gloo world equal the single-process metrics of
the whole batch: quantiles exactly (gathered values), sums and means to round-off."""

from __future__ import annotations

import math

import torch

from megatron_alp.runtime.spawn import run_world

D = torch.float64
CASES = [(None, {}), ("drpo", {"delta": 0.5}),
         ("mis_seq", {"eps_low": 0.2, "eps_high": 0.28, "is_low": 0.0, "is_high": 2.0, "veto": 1e-3}),
         ("bypass_token", {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0})]
SHARDS = [list(range(0, 3)), list(range(3, 9))]  # rank 0: the heavy-tailed rows; rank 1: the rest


def _full_batch():
    g = torch.Generator().manual_seed(1234)
    b, tt = 9, 12
    lmu = torch.log(torch.rand(b, tt, generator=g, dtype=D) * 0.9 + 0.05)
    spread = torch.tensor([1.5] * 3 + [0.1] * 6, dtype=D).unsqueeze(-1)  # skewed across ranks
    lp = (lmu + spread * torch.randn(b, tt, generator=g, dtype=D)).clamp(max=-1e-3)
    lold = (lmu + 0.5 * spread * torch.randn(b, tt, generator=g, dtype=D)).clamp(max=-1e-3)
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, tt).contiguous()
    lengths = torch.tensor([12, 10, 11, 3, 5, 2, 7, 4, 6])
    mask = (torch.arange(tt).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    ent = torch.rand(b, tt, generator=g, dtype=D)
    lp[5, 1] = float("nan")  # counted on rank 1
    return lp, lmu, lold, adv, mask, ent


def _shard(rank):
    rows = torch.tensor(SHARDS[rank])
    parts = [x[rows] for x in _full_batch()]
    cols = int(parts[4].sum(-1).max())  # each rank pads to its own length
    return [x[:, :cols] for x in parts]


def _metrics(inputs, objective, hparams, group):
    from megatron_alp.algo.metrics import compute_metrics

    lp, lmu, lold, adv, mask, ent = inputs
    out = compute_metrics(lp, lmu, mask, old_logp=lold, base_logp=lold, advantages=adv, entropy=ent,
                          objective=objective, hparams=hparams, group=group, hist_samples=1_000_000)
    return {k: v.tolist() for k, v in out.items()}


def _worker(rank, world_size):
    import torch.distributed as dist

    from megatron_alp.runtime.distributed import init_distributed

    init_distributed()
    inputs = _shard(rank)
    return [_metrics(inputs, obj, hp, dist.group.WORLD) for obj, hp in CASES]


def _same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_metrics_over_two_dp_ranks_equal_full_batch_metrics():
    per_rank = run_world(_worker, 2, timeout=180)
    full_inputs = _full_batch()
    for i, (obj, hp) in enumerate(CASES):
        full = _metrics(full_inputs, obj, hp, None)
        for rank in range(2):
            got = per_rank[rank][i]
            assert set(got) == set(full), (obj, rank)
            for k in full:
                assert _same(got[k], full[k]), (obj, rank, k, got[k], full[k])
        # Quantiles are bit-exact (the same sorted union of values).
        for k in ("ratio/token_p99.9", "ratio/token_p0.1", "ratio/seq_p50"):
            assert per_rank[0][i][k] == full[k]
    # The NaN on rank 1 is counted once, globally.
    assert per_rank[0][0]["train/nonfinite_logp"] == 1.0
    # An average of per-rank quantiles would be wrong here: the test can tell the difference.
    shards = [_metrics(_shard(r), None, {}, None) for r in range(2)]
    full = _metrics(full_inputs, None, {}, None)
    for k in ("ratio/token_p99", "ratio/token_p1"):
        naive = (shards[0][k] + shards[1][k]) / 2
        assert not math.isclose(naive, full[k], rel_tol=1e-3), k
