"""GRPO group advantages with and without the std division (ALGORITHMS.md section 5)."""

import statistics

import pytest
import torch

from megatron_alp.algo.advantages import broadcast_to_tokens, compute_advantages, grpo_advantages


def test_grpo_with_std_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    a = grpo_advantages(r, group_size=4)
    expected = []
    for group in ([1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]):
        m, s = statistics.mean(group), statistics.stdev(group)  # sample std
        expected += [(x - m) / (s + 1e-6) for x in group]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-6)
    # first group: +-0.5 / sqrt(1/3)
    assert a[0].item() == pytest.approx(0.5 / (1 / 3) ** 0.5, rel=1e-5)


def test_grpo_without_std_is_mean_centred():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    a = compute_advantages(r, "grpo_no_std", group_size=4)
    assert torch.allclose(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]))


def test_group_index_non_contiguous_equals_contiguous():
    r = torch.tensor([0.2, 1.0, 0.7, 0.0, 0.9, 0.4])
    idx = torch.tensor([7, 3, 7, 3, 7, 3])
    a = grpo_advantages(r, group_index=idx)
    perm = torch.tensor([0, 2, 4, 1, 3, 5])
    b = grpo_advantages(r[perm], group_size=3)
    assert torch.allclose(a[perm], b)


def test_degenerate_groups():
    # all-equal rewards and singleton groups give zero advantage (no NaN)
    assert torch.equal(grpo_advantages(torch.tensor([1.0, 1.0, 1.0]), group_size=3), torch.zeros(3))
    assert torch.equal(grpo_advantages(torch.tensor([5.0, -2.0]), group_size=1), torch.zeros(2))


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.ones(5), group_size=2)
    with pytest.raises(ValueError, match="exactly one"):
        grpo_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(torch.ones(2, 2), group_size=2)
    with pytest.raises(ValueError, match="grpo_x"):
        compute_advantages(torch.ones(2), "grpo_x", group_size=2)


def test_broadcast_to_tokens():
    a = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(broadcast_to_tokens(a, mask), torch.tensor([[1.5, 1.5, 0.0], [-0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="do not match"):
        broadcast_to_tokens(a, mask[:1])
