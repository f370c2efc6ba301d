"""Each objective on inputs small enough to check by hand (ALGORITHMS.md sections 1-4).

Expected numbers are written from the formulas with plain ``math``, not from the implementation.
"""

import math

import pytest
import torch

from megatron_alp.algo.objectives import OBJECTIVES, aggregate, kl_penalty, token_losses
from tests.unit._objective_cases import HP

D = torch.float64
MU = 0.02  # rollout probability of every token in the ratio tests


def t(rows):
    return torch.tensor(rows, dtype=D)


def logs(rows):
    return torch.tensor([[math.log(x) for x in r] for r in rows], dtype=D)


def test_bypass_token_clip_and_dual_clip():
    ratio = [[2.0, 5.0, 0.25, 20.0, 0.25, 3.0]]
    adv = t([[1.0, 1.0, -1.0, -1.0, 2.0, 1.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    lmu = torch.full((1, 6), math.log(MU), dtype=D)
    lp = logs([[r * MU for r in ratio[0]]])
    out = token_losses("bypass_token", lp, lmu, adv, mask, eps_low=0.5, eps_high=3.0, dual_clip=10.0)
    # 2 in [0.5, 4]: -2 | 5 -> clip 4: max(-5, -4) = -4 | A<0, 0.25: max(0.25, 0.5) = 0.5
    # A<0, 20: min(max(20, 4), 10) = 10 | A=2, 0.25: max(-0.5, -1) = -0.5 | masked: 0
    assert torch.allclose(out, t([[-2.0, -4.0, 0.5, 10.0, -0.5, 0.0]]), atol=1e-12)
    no_dual = token_losses("bypass_token", lp, lmu, adv, mask, eps_low=0.5, eps_high=3.0)
    assert no_dual[0, 3].item() == pytest.approx(20.0)


def test_bypass_seq_full_product_excludes_masked_tokens():
    # seq 0: 2 x 1.5 = 3 (inside [0.5, 4]); seq 1: 2 x 3 = 6 -> clipped to 4 (masked 100 excluded);
    # seq 2 (A < 0): 0.5 x 0.5 = 0.25 -> max(0.25, 0.5) = 0.5.
    ratio = [[2.0, 1.5, 1.0], [2.0, 3.0, 100.0], [0.5, 0.5, 1.0]]
    mask = t([[1, 1, 0], [1, 1, 0], [1, 1, 0]])
    adv = t([[1.0] * 3, [1.0] * 3, [-1.0] * 3])
    lmu = torch.full((3, 3), math.log(MU), dtype=D)
    lp = logs([[r * MU for r in row] for row in ratio])
    out = token_losses("bypass_seq", lp, lmu, adv, mask, eps_low=0.5, eps_high=3.0)
    want = t([[-3.0, -3.0, 0.0], [-4.0, -4.0, 0.0], [0.5, 0.5, 0.0]])
    assert torch.allclose(out, want, atol=1e-12)


def test_bypass_geo_geometric_mean():
    # geometric mean of 2 and 8 is 4 (the masked 50 is excluded); A = 0.5 -> -2 inside [0.5, 6]
    lmu = torch.full((1, 3), math.log(MU), dtype=D)
    lp = logs([[2 * MU, 8 * MU, 50 * MU]])
    out = token_losses("bypass_geo", lp, lmu, t([[0.5] * 3]), t([[1, 1, 0]]), eps_low=0.5, eps_high=5.0)
    assert torch.allclose(out, t([[-2.0, -2.0, 0.0]]), atol=1e-12)


def test_gspo_clip_value():
    # Explicitly: A > 0, rho = 4 > 1 + 4e-4 -> L = max(-A*4, -A*1.0004) = -A*1.0004
    lmu = torch.full((1, 2), math.log(MU), dtype=D)
    lp = logs([[2 * MU, 8 * MU]])
    out = token_losses("bypass_geo", lp, lmu, t([[0.5, 0.5]]), t([[1, 1]]), eps_low=3e-4, eps_high=4e-4,
                       dual_clip=100.0)
    assert torch.allclose(out, t([[-0.5 * 1.0004] * 2]), atol=1e-12)


def test_ppo_uses_old_logp_not_rollout():
    lold = logs([[0.1, 0.1, 0.1]])
    lp = logs([[0.11, 0.2, 0.05]])  # ratios 1.1, 2.0, 0.5
    lmu = logs([[0.9, 0.001, 0.3]])  # irrelevant for ppo
    adv = t([[1.0, 1.0, -1.0]])
    out = token_losses("ppo", lp, lmu, adv, t([[1, 1, 1]]), old_logp=lold, eps_low=0.2, eps_high=0.28)
    # 1.1 inside: -1.1 | 2.0 -> max(-2, -1.28) = -1.28 | A<0, 0.5 -> max(0.5, 0.8) = 0.8
    assert torch.allclose(out, t([[-1.1, -1.28, 0.8]]), atol=1e-12)


def test_mis_and_tis_token_weights():
    lmu = logs([[0.2, 0.025, 0.05, 0.1]])
    lold = logs([[0.1, 0.1, 0.1, 0.1]])  # w = pi_old/mu = 0.5, 4, 2, 1
    lp = logs([[0.11, 0.11, 0.11, 0.11]])  # r = 1.1 everywhere
    adv = t([[1.0, 1.0, 1.0, -2.0]])
    mask = t([[1, 1, 1, 1]])
    hp = dict(eps_low=0.2, eps_high=0.28)
    ppo = t([[-1.1, -1.1, -1.1, 2.2]])
    mis = token_losses("mis_token", lp, lmu, adv, mask, old_logp=lold, is_low=0.0, is_high=3.0, **hp)
    assert torch.allclose(mis, ppo * t([[0.5, 0.0, 2.0, 1.0]]), atol=1e-12)
    mis_lo = token_losses("mis_token", lp, lmu, adv, mask, old_logp=lold, is_low=0.6, is_high=3.0, **hp)
    assert torch.allclose(mis_lo, ppo * t([[0.0, 0.0, 2.0, 1.0]]), atol=1e-12)
    tis = token_losses("tis_token", lp, lmu, adv, mask, old_logp=lold, is_high=3.0, **hp)
    assert torch.allclose(tis, ppo * t([[0.5, 3.0, 2.0, 1.0]]), atol=1e-12)


def test_mis_and_tis_sequence_weights_and_veto():
    lold = logs([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    # seq 0: w = 2 * 1.5 = 3 (masked third token excluded); seq 1: 4 * 2 = 8
    lmu = logs([[0.05, 0.1 / 1.5, 0.5], [0.025, 0.05, 0.5]])
    lp = lold.clone()  # r = 1 -> ppo loss = -A
    adv = t([[1.0] * 3, [0.5] * 3])
    mask = t([[1, 1, 0], [1, 1, 0]])
    hp = dict(eps_low=0.2, eps_high=0.28)
    mis = token_losses("mis_seq", lp, lmu, adv, mask, old_logp=lold, is_low=0.0, is_high=5.0, **hp)
    assert torch.allclose(mis, t([[-3.0, -3.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-12)
    tis = token_losses("tis_seq", lp, lmu, adv, mask, old_logp=lold, is_high=5.0, **hp)
    assert torch.allclose(tis, t([[-3.0, -3.0, 0.0], [-2.5, -2.5, 0.0]]), atol=1e-12)
    # veto: a token with pi_old/mu = 1e-5 < 1e-4 drops its whole sequence (token-level weights too)
    lmu_v = logs([[0.1, 0.1, 0.1], [0.1, 1e4 * 0.1, 0.1]])
    lmu_v[1, 1] = math.log(0.1) - math.log(1e-5)
    tisv = token_losses("tis_token", lp, lmu_v, adv, t([[1, 1, 1], [1, 1, 1]]), old_logp=lold,
                        is_high=5.0, veto=1e-4, **hp)
    assert torch.allclose(tisv, t([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]), atol=1e-12)


def _dppo_inputs():
    q = [0.5, 0.5, 0.5, 0.5, 0.5, 0.9]
    p = [0.8, 0.8, 0.6, 0.2, 0.52, 0.97]
    adv = t([[1.0, -1.0, 1.0, -1.0, 1.0, 1.0]])
    return logs([p]), logs([q]), adv, p, q


def test_dppo_tv_values():
    lp, lmu, adv, p, q = _dppo_inputs()
    mask = t([[1] * 6])
    out = token_losses("dppo_tv", lp, lmu, adv, mask, delta=0.15)
    a = [1, -1, 1, -1, 1, 1]
    keep = [0, 1, 1, 0, 1, 1]  # +0.3 with A>0 and -0.3 with A<0 are harmful beyond 0.15
    want = [-a[i] * (p[i] / q[i]) * keep[i] * math.log(p[i]) for i in range(6)]
    assert torch.allclose(out, t([want]), atol=1e-12)
    capped = token_losses("dppo_tv", lp, lmu, adv, mask, delta=0.15, trunc=1.5)
    want_c = [-a[i] * min(p[i] / q[i], 1.5) * keep[i] * math.log(p[i]) for i in range(6)]
    assert torch.allclose(capped, t([want_c]), atol=1e-12)


def test_dppo_kl_values():
    lp, lmu, adv, p, q = _dppo_inputs()
    out = token_losses("dppo_kl", lp, lmu, adv, t([[1] * 6]), delta=0.05)

    def bkl(qq, pp):
        return qq * math.log(qq / pp) + (1 - qq) * math.log((1 - qq) / (1 - pp))

    assert bkl(0.5, 0.8) == pytest.approx(0.5 * math.log(1.5625))  # the hand value
    a = [1, -1, 1, -1, 1, 1]
    harmful = [(a[i] > 0 and p[i] > q[i]) or (a[i] < 0 and p[i] < q[i]) for i in range(6)]
    keep = [0.0 if harmful[i] and bkl(q[i], p[i]) > 0.05 else 1.0 for i in range(6)]
    # token 2: KL(0.5||0.6) = 0.0204 < 0.05 is kept; token 5: KL(mu=0.9 || pi=0.97) = 0.053 > 0.05 is
    # masked although the reverse KL(pi || mu) = 0.036 would keep it (the direction matters).
    assert keep == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert bkl(0.97, 0.9) < 0.05
    want = [-a[i] * (p[i] / q[i]) * keep[i] * math.log(p[i]) for i in range(6)]
    assert torch.allclose(out, t([want]), atol=1e-12)


def test_drpo_spo_and_mask_values():
    lp, lmu, adv, p, q = _dppo_inputs()
    mask = t([[1] * 6])
    a = [1, -1, 1, -1, 1, 1]
    r = [p[i] / q[i] for i in range(6)]
    delta = 0.15
    drpo = token_losses("drpo", lp, lmu, adv, mask, delta=delta)
    want = [-a[i] * r[i] + abs(a[i]) * q[i] * (r[i] - 1) ** 2 / (2 * delta) for i in range(6)]
    assert torch.allclose(drpo, t([want]), atol=1e-12)
    # token 0 by hand: -1.6 + 0.5 * 0.36 / 0.3 = -1.0
    assert drpo[0, 0].item() == pytest.approx(-1.0)
    spo = token_losses("spo", lp, lmu, adv, mask, delta=0.2)
    want = [-a[i] * r[i] + abs(a[i]) * (r[i] - 1) ** 2 / 0.4 for i in range(6)]
    assert torch.allclose(spo, t([want]), atol=1e-12)
    dm = token_losses("drpo_mask", lp, lmu, adv, mask, delta=delta, dppo_delta=0.15)
    outside = [abs(p[i] - q[i]) > 0.15 for i in range(6)]  # 0.3, 0.3, 0.1, 0.3, 0.02, 0.07
    want = [-a[i] * r[i] + (abs(a[i]) * q[i] * (r[i] - 1) ** 2 / (2 * delta) if outside[i] else 0.0) for i in range(6)]
    assert torch.allclose(dm, t([want]), atol=1e-12)


def test_log_ratio_clamped_to_20():
    lp, lmu = t([[0.0, -1.0]]), t([[-30.0, 29.0]])  # log-ratios 30 and -30
    out = token_losses("bypass_token", lp, lmu, t([[-1.0, 1.0]]), t([[1, 1]]), eps_low=1.0, eps_high=1e12)
    assert torch.allclose(out, t([[math.exp(20.0), -math.exp(-20.0)]]), rtol=1e-12)
    dr = token_losses("drpo", lp, lmu, t([[1.0, 1.0]]), t([[1, 1]]), delta=1.0)
    r = math.exp(20.0)
    assert dr[0, 0].item() == pytest.approx(-r + math.exp(-30.0) * (r - 1) ** 2 / 2, rel=1e-12)


def test_kl_penalty_estimators():
    lp, lref = logs([[0.5, 0.2]]), logs([[0.4, 0.25]])
    mask = t([[1, 1]])
    d = [math.log(0.5 / 0.4), math.log(0.2 / 0.25)]
    assert torch.allclose(kl_penalty(lp, lref, mask, "k1"), t([d]))
    assert torch.allclose(kl_penalty(lp, lref, mask, "k2"), t([[0.5 * x * x for x in d]]))
    assert torch.allclose(kl_penalty(lp, lref, mask, "k3"), t([[math.exp(-x) + x - 1 for x in d]]))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(lp, lref, mask, "k4")


def test_aggregation_modes_by_hand():
    losses = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert aggregate(losses, mask, "token-mean").item() == pytest.approx(15 / 5)
    assert aggregate(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.5) / 2)
    assert aggregate(losses, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 9) / 2)
    assert aggregate(losses, mask, "seq-mean-token-sum-norm", horizon=10).item() == pytest.approx((0.6 + 0.9) / 2)
    assert aggregate(losses, mask, "token-mean", normalizer=30).item() == pytest.approx(0.5)
    empty = aggregate(losses, torch.zeros_like(mask), "seq-mean-token-mean")
    assert empty.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input


def _rand_inputs(b=3, tt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, tt, generator=g, dtype=D) * 3
    lmu = lp + 0.1 * torch.randn(b, tt, generator=g, dtype=D)
    lold = lp + 0.05 * torch.randn(b, tt, generator=g, dtype=D)
    adv = torch.randn(b, generator=g, dtype=D).unsqueeze(-1).expand(b, tt).contiguous()
    return lp, lmu, lold, adv, torch.ones(b, tt, dtype=D)


SEQ_LEVEL = {"bypass_seq", "bypass_geo", "mis_seq", "mis_seq_geo", "tis_seq"}


def test_hp_table_covers_every_objective():
    assert set(HP) == set(OBJECTIVES)


@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("where", ["logp", "rollout_logp", "old_logp"])
def test_nonfinite_logprobs_are_masked_not_propagated(where, bad_value):
    for obj, hp in HP.items():
        lp, lmu, lold, adv, mask = _rand_inputs()
        inputs = {"logp": lp, "rollout_logp": lmu, "old_logp": lold}
        inputs[where] = inputs[where].clone()
        inputs[where][1, 2] = bad_value
        leaf = inputs["logp"].clone().requires_grad_(True)
        out = token_losses(obj, leaf, inputs["rollout_logp"], adv, mask, old_logp=inputs["old_logp"], **hp)
        uses_input = where != "old_logp" or obj in {"ppo", "mis_token", "mis_seq", "mis_seq_geo", "tis_token",
                                                    "tis_seq"}
        assert torch.isfinite(out).all(), (obj, where)
        out.sum().backward()
        assert torch.isfinite(leaf.grad).all(), (obj, where)
        if not uses_input:
            continue
        # The same as masking the bad token (or its whole sequence, for sequence-level objectives) by hand.
        m2 = mask.clone()
        if obj in SEQ_LEVEL:
            m2[1, :] = 0
        else:
            m2[1, 2] = 0
        clean = {k: torch.where(m2 > 0, v, torch.zeros_like(v)) for k, v in inputs.items()}
        ref = token_losses(obj, clean["logp"], clean["rollout_logp"], adv, m2, old_logp=clean["old_logp"], **hp)
        assert torch.allclose(out.detach(), ref, atol=1e-12), (obj, where)
        assert out[1, 2].item() == 0.0


def test_nan_advantage_is_masked():
    lp, lmu, lold, adv, mask = _rand_inputs()
    adv = adv.clone()
    adv[0, 1] = float("nan")
    out = token_losses("drpo", lp, lmu, adv, mask, delta=12.5)
    assert torch.isfinite(out).all() and out[0, 1].item() == 0.0


def test_shape_errors_name_the_argument():
    lp, lmu, lold, adv, mask = _rand_inputs()
    hp = HP["bypass_token"]
    with pytest.raises(ValueError, match="rollout_logp"):
        token_losses("bypass_token", lp, lmu[:, :-1], adv, mask, **hp)
    with pytest.raises(ValueError, match="mask"):
        token_losses("bypass_token", lp, lmu, adv, mask[:2], **hp)
    with pytest.raises(ValueError, match="advantages"):
        token_losses("bypass_token", lp, lmu, adv[:, :2], mask, **hp)
    with pytest.raises(ValueError, match="old_logp"):
        token_losses("ppo", lp, lmu, adv, mask, old_logp=lold[:, :3], **HP["ppo"])
    with pytest.raises(ValueError, match="logp"):
        token_losses("bypass_token", lp[0], lmu[0], adv[0], mask[0], **hp)
    with pytest.raises(ValueError, match="token_losses"):
        aggregate(lp[0], mask[0], "token-mean")
    with pytest.raises(ValueError, match="shape"):
        aggregate(lp, mask[:, :2], "token-mean")
    # [B] advantages are broadcast (documented convenience), [B, 1] too
    a1 = token_losses("bypass_token", lp, lmu, adv[:, 0], mask, **hp)
    assert torch.equal(a1, token_losses("bypass_token", lp, lmu, adv[:, :1], mask, **hp))


def test_bad_arguments_raise_clear_errors():
    lp, lmu, lold, adv, mask = _rand_inputs()
    with pytest.raises(ValueError, match="'grpo_x'"):
        token_losses("grpo_x", lp, lmu, adv, mask)
    with pytest.raises(TypeError, match="clip_eps"):
        token_losses("bypass_token", lp, lmu, adv, mask, eps_low=0.2, eps_high=0.2, clip_eps=0.2)
    with pytest.raises(TypeError, match="eps_high"):
        token_losses("bypass_token", lp, lmu, adv, mask, eps_low=0.2)
    with pytest.raises(TypeError, match="is_low"):  # TIS takes no lower bound
        token_losses("tis_token", lp, lmu, adv, mask, old_logp=lold, eps_low=0.2, eps_high=0.2, is_low=0.1, is_high=2.0)
    with pytest.raises(ValueError, match="dual_clip"):
        token_losses("bypass_token", lp, lmu, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip=0.5)
    with pytest.raises(ValueError, match="delta"):
        token_losses("drpo", lp, lmu, adv, mask, delta=0.0)
    with pytest.raises(ValueError, match="old_logp"):
        token_losses("mis_seq", lp, lmu, adv, mask, **HP["mis_seq"])
    with pytest.raises(ValueError, match="0 and 1"):
        token_losses("drpo", lp, lmu, adv, mask * 0.5, delta=1.0)
    with pytest.raises(ValueError, match="token-sum"):
        aggregate(lp, mask, "token-sum")
    with pytest.raises(ValueError, match="horizon"):
        aggregate(lp, mask, "seq-mean-token-sum-norm")


def test_low_precision_inputs_computed_in_fp32():
    lp, lmu, lold, adv, mask = _rand_inputs()
    out = token_losses("drpo", lp.to(torch.bfloat16), lmu.to(torch.bfloat16), adv, mask, delta=12.5)
    assert out.dtype == torch.float32


def test_mis_seq_geo_is_gspo_with_sequence_mask():
    """GSPO as the ALP reference runs it: PPO clip of (pi/pi_old)^(1/|y|) (straight-through), times
    the detached sequence weight prod pi_old/mu kept only inside [is_low, is_high]."""
    lp, lmu, lold, adv, mask = _rand_inputs()
    mask[0, 3:] = 0
    hp = dict(eps_low=3e-4, eps_high=4e-4, is_low=0.0, is_high=5.0, dual_clip=100.0)
    out = token_losses("mis_seq_geo", lp, lmu, adv, mask, old_logp=lold, **hp)
    m = mask > 0
    for i in range(lp.shape[0]):
        n = m[i].sum()
        rho = math.exp(((lp[i] - lold[i])[m[i]]).sum().item() / n.item())
        a = adv[i, 0].item()
        clip = min(max(rho, 1 - 3e-4), 1 + 4e-4)
        loss = max(-a * rho, -a * clip)
        if a < 0:
            loss = min(loss, -a * 100.0)
        w = math.exp(((lold[i] - lmu[i])[m[i]]).sum().item())
        w = w if w <= 5.0 else 0.0
        want = torch.where(m[i], torch.full_like(lp[i], w * loss), torch.zeros_like(lp[i]))
        assert torch.allclose(out[i], want, rtol=1e-10, atol=1e-12), i


def test_dppo_huge_log_ratio_stays_finite():
    """The DPPO weight's log-ratio is clamped at +-20: a 1000-nat ratio on a masked-out (invalid)
    token would otherwise give inf * 0 = NaN."""
    lp = torch.tensor([[-0.01, -0.5]], dtype=D, requires_grad=True)
    lmu = torch.tensor([[-1000.0, -0.6]], dtype=D)
    for obj in ("dppo_tv", "dppo_kl"):
        out = token_losses(obj, lp, lmu, torch.tensor([1.0], dtype=D), torch.ones(1, 2, dtype=D), delta=0.15)
        assert torch.isfinite(out).all(), obj
        out.sum().backward()
        assert torch.isfinite(lp.grad).all(), obj
