"""Gradient identities (autograd), on-policy sanity and aggregation invariance of the objectives."""

import math

import pytest
import torch

from megatron_alp.algo.objectives import (
    AGGREGATIONS,
    OBJECTIVES,
    aggregate,
    effective_mask,
    normalizer_count,
    token_losses,
)
from tests.unit._objective_cases import HP

D = torch.float64


def _batch(b=6, tt=7, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lmu = torch.log(torch.rand(b, tt, generator=g, dtype=D) * 0.9 + 0.05)
    lp = (lmu + spread * torch.randn(b, tt, generator=g, dtype=D)).clamp(max=-1e-3)
    lold = (lmu + 0.5 * spread * torch.randn(b, tt, generator=g, dtype=D)).clamp(max=-1e-3)
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, tt).contiguous()
    lengths = torch.randint(2, tt + 1, (b,), generator=g)
    mask = (torch.arange(tt).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    return lp, lmu, lold, adv, mask


def _grad(objective, lp, lmu, adv, mask, lold=None, **hp):
    leaf = lp.clone().requires_grad_(True)
    token_losses(objective, leaf, lmu, adv, mask, old_logp=lold, **hp).sum().backward()
    return leaf.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drpo_gradient_identity(seed):
    """d L / d log pi = -A r w_t, w_t = 1 - sign(A (r - 1)) |pi - mu| / delta (DRPO paper Eq. 9)."""
    lp, lmu, _, adv, mask = _batch(seed=seed, spread=0.8)
    for delta in (0.15, 1.0, 12.5):
        grad = _grad("drpo", lp, lmu, adv, mask, delta=delta)
        pi, mu = lp.exp(), lmu.exp()
        r = pi / mu
        w = 1 - torch.sign(adv * (r - 1)) * (pi - mu).abs() / delta
        assert torch.allclose(grad, -adv * r * w * mask, atol=1e-10)
    # At delta = 0.15 some tokens are beyond the boundary: their weight is corrective (negative).
    w = 1 - torch.sign(adv * (r - 1)) * (pi - mu).abs() / 0.15
    assert ((w < 0) & (mask > 0)).any()


def test_spo_and_mask_drpo_gradient_weights():
    lp, lmu, _, adv, mask = _batch(seed=3, spread=0.8)
    pi, mu = lp.exp(), lmu.exp()
    r = pi / mu
    s = torch.sign(adv * (r - 1))
    grad = _grad("spo", lp, lmu, adv, mask, delta=0.2)
    assert torch.allclose(grad, -adv * r * (1 - s * (r - 1).abs() / 0.2) * mask, atol=1e-10)
    grad = _grad("drpo_mask", lp, lmu, adv, mask, delta=0.5, dppo_delta=0.15)
    outside = (pi - mu).abs() > 0.15
    w = torch.where(outside, 1 - s * (pi - mu).abs() / 0.5, torch.ones_like(r))
    assert outside.any() and (~outside & (mask > 0)).any()
    assert torch.allclose(grad, -adv * r * w * mask, atol=1e-10)


def test_straight_through_sequence_ratio():
    """Value = sequence ratio on every token; gradient of token t flows to log pi_t only, scaled by it."""
    lp, lmu, _, adv, mask = _batch(seed=4, spread=0.05)
    seq_log = ((lp - lmu) * mask).sum(-1, keepdim=True)
    wide = dict(eps_low=1.0, eps_high=1e6)  # no clipping: the loss is -A rho exactly
    out = token_losses("bypass_seq", lp, lmu, adv, mask, **wide)
    assert torch.allclose(out, -adv * seq_log.exp() * mask, atol=1e-12)
    # Random weights c_t on the per-token losses: d(sum c L)/d lp_t = c_t (-A_t rho_i), no cross terms.
    c = torch.rand(lp.shape, dtype=D, generator=torch.Generator().manual_seed(9))
    leaf = lp.clone().requires_grad_(True)
    (c * token_losses("bypass_seq", leaf, lmu, adv, mask, **wide)).sum().backward()
    assert torch.allclose(leaf.grad, c * (-adv * seq_log.exp()) * mask, atol=1e-12)
    # Geometric variant: value exp(mean log-ratio), same token-score gradient.
    geo_log = seq_log / mask.sum(-1, keepdim=True)
    leaf = lp.clone().requires_grad_(True)
    out = token_losses("bypass_geo", leaf, lmu, adv, mask, **wide)
    assert torch.allclose(out.detach(), -adv * geo_log.exp() * mask, atol=1e-12)
    out.sum().backward()
    assert torch.allclose(leaf.grad, -adv * geo_log.exp() * mask, atol=1e-12)
    # Clipped sequences (sequence ratio outside the range, moving the profitable way) get no gradient.
    g = _grad("bypass_seq", lp + 0.5 * mask, lmu, adv.abs(), mask, eps_low=0.2, eps_high=0.28)
    assert torch.all(g == 0)


def test_dual_clip_caps_loss_for_negative_advantage():
    lmu = torch.full((1, 4), math.log(0.01), dtype=D)
    ratios = torch.tensor([[2.0, 9.0, 11.0, 50.0]], dtype=D)
    lp = lmu + ratios.log()
    adv = torch.tensor([[-2.0, -2.0, -2.0, 2.0]], dtype=D)
    mask = torch.ones(1, 4, dtype=D)
    hp = dict(eps_low=0.2, eps_high=0.28)
    capped = token_losses("bypass_token", lp, lmu, adv, mask, dual_clip=10.0, **hp)
    free = token_losses("bypass_token", lp, lmu, adv, mask, **hp)
    # A < 0: loss |A| rho until rho = c, then |A| c; A > 0 is untouched by the dual clip.
    assert torch.allclose(free, torch.tensor([[4.0, 18.0, 22.0, -2.0 * 1.28]], dtype=D))
    assert torch.allclose(capped, torch.tensor([[4.0, 18.0, 20.0, -2.0 * 1.28]], dtype=D))
    g = _grad("bypass_token", lp, lmu, adv, mask, dual_clip=10.0, **hp)
    assert torch.allclose(g, torch.tensor([[4.0, 18.0, 0.0, 0.0]], dtype=D))  # -A rho below c, 0 above


def test_dppo_masks_only_harmful_direction():
    lp, lmu, _, adv, mask = _batch(seed=5, spread=0.9)
    pi, mu = lp.exp(), lmu.exp()
    diff = pi - mu
    harmful = ((adv > 0) & (diff > 0)) | ((adv < 0) & (diff < 0))
    beyond = diff.abs() > 0.15
    g = _grad("dppo_tv", lp, lmu, adv, mask, delta=0.15)
    m = mask > 0
    assert (harmful & beyond & m).any() and (~harmful & beyond & m).any()
    assert torch.all(g[harmful & beyond] == 0)
    keep = m & ~(harmful & beyond)
    assert torch.allclose(g[keep], (-adv * pi / mu)[keep], atol=1e-12)  # beyond delta but corrective: kept


def test_grads_only_reach_logp():
    lp, lmu, lold, adv, mask = _batch(seed=6)
    lmu, lold, adv = (x.clone().requires_grad_(True) for x in (lmu, lold, adv))
    leaf = lp.clone().requires_grad_(True)
    for obj in OBJECTIVES:
        token_losses(obj, leaf, lmu, adv, mask, old_logp=lold, **HP[obj]).sum().backward()
    assert lmu.grad is None and lold.grad is None and adv.grad is None and leaf.grad is not None


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_on_policy_gives_vanilla_policy_gradient(objective):
    lp, _, _, adv, mask = _batch(seed=7)
    leaf = lp.clone().requires_grad_(True)
    out = token_losses(objective, leaf, lp.clone(), adv, mask, old_logp=lp.clone(), **HP[objective])
    out.sum().backward()
    assert torch.allclose(leaf.grad, -adv * mask, atol=1e-12)
    if not objective.startswith("dppo_"):  # DPPO's value is -A lp by construction
        assert torch.allclose(out.detach(), -adv * mask, atol=1e-12)


def _split(tensors, rows, cols):
    return [x[rows][:, :cols] for x in tensors]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_aggregation_invariance_micro_batches_and_dp_shards(objective):
    """Two DP shards x two micro-batches (each padded to its own length) with global normalisers
    give the full-batch loss and gradient, for every aggregation mode."""
    lp, lmu, lold, adv, mask = _batch(b=8, tt=9, seed=8)
    for mode in AGGREGATIONS:
        kw = dict(horizon=16) if mode == "seq-mean-token-sum-norm" else {}
        leaf = lp.clone().requires_grad_(True)
        full = aggregate(token_losses(objective, leaf, lmu, adv, mask, old_logp=lold, **HP[objective]), mask, mode,
                         **kw)
        full.backward()
        g_full = leaf.grad.clone()

        leaf = lp.clone().requires_grad_(True)
        shards = [[[0, 3], [5]], [[1, 6, 7], [2, 4]]]  # rank -> micro-batches (row indices)
        pieces = []
        for rank in shards:
            for rows in rank:
                cols = int(mask[rows].sum(-1).max())  # trim padding per micro-batch
                pieces.append((torch.tensor(rows), cols))
        global_n = sum(normalizer_count(mask[r][:, :c], mode) for r, c in pieces)  # the DP all-reduce
        total = 0.0
        for rows, cols in pieces:
            p_lp, p_lmu, p_lold, p_adv, p_mask = _split((leaf, lmu, lold, adv, mask), rows, cols)
            part = aggregate(token_losses(objective, p_lp, p_lmu, p_adv, p_mask, old_logp=p_lold, **HP[objective]),
                             p_mask, mode, normalizer=global_n, **kw)
            part.backward()  # gradient accumulation across micro-batches and (summed) DP ranks
            total = total + part.detach()
        assert torch.allclose(total, full.detach(), atol=1e-12), (objective, mode)
        assert torch.allclose(leaf.grad, g_full, atol=1e-12), (objective, mode)
        # Without the global normaliser the split loss differs (the test can fail).
        local = sum(
            aggregate(token_losses(objective, *_split((lp,), r, c), *_split((lmu, adv, mask), r, c),
                                   old_logp=_split((lold,), r, c)[0], **HP[objective]), mask[r][:, :c], mode, **kw)
            for r, c in pieces
        ) / len(pieces)
        assert not torch.allclose(local, full.detach(), atol=1e-9), (objective, mode)


def test_effective_mask_matches_normaliser_use():
    lp, lmu, lold, adv, mask = _batch(seed=10)
    lmu = lmu.clone()
    lmu[2, 0] = float("-inf")
    tok = effective_mask("bypass_token", mask, lp, lmu, adv)
    seq = effective_mask("bypass_seq", mask, lp, lmu, adv)
    assert int(tok.sum()) == int(mask.sum()) - 1
    assert int(seq.sum()) == int(mask.sum()) - int(mask[2].sum())
    assert normalizer_count(seq, "seq-mean-token-mean").item() == mask.shape[0] - 1
