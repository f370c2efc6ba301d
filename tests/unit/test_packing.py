"""Sequence packing's pieces: the pack plan under a token budget, DP balance by tokens, the mini-batch
membership it keeps, the block-diagonal causal mask, unpacking, and ALP's token-keyed noise."""

import pytest
import torch

from megatron_alp.model.alp.noise import gaussian_codes, token_codes
from megatron_alp.trainer.batch import RLBatch
from megatron_alp.trainer.batching import dp_balanced_shard, dp_shard, mini_batches, split_rows
from megatron_alp.trainer.packing import balance_over_dp, make_packs, plan_packs, sample_lengths


def _batch(lengths, L=None, prompt=2):
    L = L or max(lengths) + 3
    n = len(lengths)
    mask = torch.zeros(n, L)
    for i, m in enumerate(lengths):
        mask[i, prompt:m] = 1
    tokens = torch.arange(n * L).reshape(n, L) % 97 + 1
    return RLBatch(tokens=tokens, loss_mask=mask, rollout_logp=-mask, advantages=torch.arange(n, dtype=torch.float32),
                   sample_ids=torch.arange(n))


def test_plan_respects_the_budget_and_covers_every_row_once():
    lengths = [30, 5, 17, 9, 9, 40, 3, 22, 11, 8]
    plan = plan_packs(lengths, 40)
    assert sorted(i for p in plan for i in p) == list(range(10))
    assert all(sum(lengths[i] for i in p) <= 40 for p in plan)
    assert len(plan) == 4  # 154 tokens: the lower bound ceil(154 / 40) = 4 is reached
    big = plan_packs([50, 10, 10], 40)
    assert [0] in big and sorted(i for p in big for i in p) == [0, 1, 2]  # too long: alone


def test_sample_lengths_end_at_the_last_counted_token():
    b = _batch([6, 9, 4], L=12)
    assert sample_lengths(b) == [6, 9, 4]


def test_dp_balance_by_tokens():
    lengths = [100, 3, 3, 3, 3, 90, 5, 5]
    ranks = balance_over_dp(lengths, 2)
    assert sorted(i for r in ranks for i in r) == list(range(8))
    loads = [sum(lengths[i] for i in r) for r in ranks]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    assert abs(loads[0] - loads[1]) < abs(sum(lengths[:4]) - sum(lengths[4:]))  # better than contiguous
    with pytest.raises(ValueError, match="cannot feed"):
        balance_over_dp([3], 2)


@pytest.mark.parametrize("dp,count", [(2, 2), (2, 1), (4, 2)])
def test_balanced_shard_keeps_each_mini_batch_membership(dp, count):
    lengths = [3 + (7 * i) % 13 for i in range(16)]
    b = _batch(lengths)
    for k in range(count):
        padded = set()
        balanced = set()
        for r in range(dp):
            padded |= set(mini_batches(dp_shard(b, r, dp), count)[k].sample_ids.tolist())
            local, sizes = dp_balanced_shard(b, r, dp, count)
            assert len(sizes) == count and sum(sizes) == len(local)
            balanced |= set(split_rows(local, sizes)[k].sample_ids.tolist())
        assert balanced == padded


def test_packs_mask_positions_and_unpack():
    b = _batch([5, 7, 4, 6], L=10)
    packs = make_packs(b, budget=12, count=4, pad_multiple=4)
    real = [p for p in packs if not p.dummy]
    assert len(packs) == 4 and len(real) == 2 and all(p.total % 4 == 0 for p in packs)
    assert sorted(i for p in real for i in p.index) == [0, 1, 2, 3]
    for p in real:
        mask = p.attention_mask()[0, 0]
        for s, n, i in zip(p.starts, p.lengths, p.index, strict=True):
            assert torch.equal(p.tokens[0, s:s + n], b.tokens[i, :n])
            assert p.positions[0, s:s + n].tolist() == list(range(n))
            # token t of a sample sees exactly its own tokens <= t
            for t in range(n):
                visible = (~mask[s + t]).nonzero().flatten().tolist()
                assert visible == list(range(s, s + t + 1))
        values = torch.arange(p.total, dtype=torch.float32)[None]
        rows = p.unpack(values)
        for k, (s, n) in enumerate(zip(p.starts, p.lengths, strict=True)):
            assert rows[k, 0] == 0 and rows[k, 1:n].tolist() == list(range(s + 1, s + n))
            assert rows[k, n:].abs().sum() == 0
    for d in packs:
        if d.dummy:
            assert d.rows.loss_mask.sum() == 0
    with pytest.raises(ValueError, match="agreed"):
        make_packs(b, budget=12, count=1)


def test_token_noise_depends_on_the_token_only():
    ids = torch.tensor([3, 3, 3, 8])
    idx = torch.tensor([0, 1, 2, 0])
    codes = token_codes(ids, idx)
    a = gaussian_codes(codes, 64, key=123)
    b = gaussian_codes(codes.flip(0), 64, key=123).flip(0)  # other order, other neighbours
    assert torch.equal(a, b)
    assert torch.equal(gaussian_codes(codes[2:3], 64, key=123), a[2:3])
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[0], a[3])
    assert not torch.allclose(gaussian_codes(codes, 64, key=124), a)
    big = gaussian_codes(token_codes(torch.arange(64).repeat_interleave(64), torch.arange(64).repeat(64)), 256, 7)
    assert abs(big.mean().item()) < 0.01 and abs(big.var().item() - 1) < 0.01
