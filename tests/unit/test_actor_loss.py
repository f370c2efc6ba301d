"""Actor._loss: the objective's loss plus the KL penalty against the reference minus the entropy
bonus (docs/objectives.md), checked against the terms written out in float64 (token-mean over the
loss mask, the global normaliser given), values and gradients. No Megatron world is needed: _loss
reads only the algorithm config."""

from types import SimpleNamespace

import pytest
import torch

from megatron_alp.algo.objectives import token_losses
from megatron_alp.config import load_config
from megatron_alp.trainer.actor import Actor

D = torch.float64


def _case(seed=0, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(b, t, generator=g, dtype=D) * 0.8 + 0.1)
    lp = (mu + 0.2 * torch.randn(b, t, generator=g, dtype=D)).clamp(max=-1e-3)
    ref = (mu + 0.2 * torch.randn(b, t, generator=g, dtype=D)).clamp(max=-1e-3)
    ent = torch.rand(b, t, generator=g, dtype=D) * 2
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, t).contiguous()
    mask = torch.ones(b, t, dtype=D)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    mb = SimpleNamespace(rollout_logp=mu, advantages=adv, loss_mask=mask, old_logp=None, ref_logp=ref)
    return lp, ent, mb


@pytest.mark.parametrize("kl_coef,entropy_coef", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.01), (0.3, 0.02)])
def test_loss_adds_the_kl_penalty_and_subtracts_the_entropy_bonus(kl_coef, entropy_coef):
    algo = load_config(None, [f"algorithm.kl_coef={kl_coef}", f"algorithm.entropy_coef={entropy_coef}",
                              "algorithm.kl_estimator=k3", "algorithm.aggregation=token-mean"]).algorithm
    actor = SimpleNamespace(algo=algo, hparams=algo.objective_hparams())
    lp, ent, mb = _case()
    normalizer = torch.tensor(20.0, dtype=D)  # the global token count (other ranks' tokens included)
    leaf, ent_leaf = lp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    loss = Actor._loss(actor, leaf, ent_leaf, mb, normalizer)

    m = mb.loss_mask
    policy = token_losses(algo.objective, lp, mb.rollout_logp, mb.advantages, m, **actor.hparams)
    k3 = torch.exp(mb.ref_logp - lp) - (mb.ref_logp - lp) - 1  # Schulman's k3 estimator of KL(pi || ref)
    expected = ((policy + kl_coef * k3 - entropy_coef * ent) * m).sum() / normalizer
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)

    loss.backward()
    lp2 = lp.clone().requires_grad_(True)
    (token_losses(algo.objective, lp2, mb.rollout_logp, mb.advantages, m, **actor.hparams) * m).sum().backward()
    # d k3 / d lp = 1 - exp(ref - lp); the entropy term's gradient goes to the entropy input alone.
    grad_lp = (lp2.grad + kl_coef * (1 - torch.exp(mb.ref_logp - lp)) * m) / normalizer
    torch.testing.assert_close(leaf.grad, grad_lp, rtol=1e-10, atol=1e-12)
    if entropy_coef > 0:
        torch.testing.assert_close(ent_leaf.grad, -entropy_coef * m / normalizer, rtol=1e-12, atol=1e-14)
    else:
        assert ent_leaf.grad is None


def test_no_reference_log_probs_means_no_kl_term():
    algo = load_config(None, ["algorithm.kl_coef=0.5"]).algorithm
    actor = SimpleNamespace(algo=algo, hparams=algo.objective_hparams())
    lp, ent, mb = _case(seed=1)
    normalizer = mb.loss_mask.sum()
    with_ref = Actor._loss(actor, lp, ent, mb, normalizer)
    mb.ref_logp = None
    without = Actor._loss(actor, lp, ent, mb, normalizer)
    policy = token_losses(algo.objective, lp, mb.rollout_logp, mb.advantages, mb.loss_mask, **actor.hparams)
    torch.testing.assert_close(without, (policy * mb.loss_mask).sum() / normalizer, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(with_ref, without)
