"""Metrics of ALGORITHMS.md section 6 on one process, against independent computations."""

import math

import pytest
import torch

from megatron_alp.algo.dist_stats import sorted_quantiles, subsample
from megatron_alp.algo.metrics import QUANTILES, compute_metrics, reduction_of
from megatron_alp.algo.objectives import OBJECTIVES
from tests.unit._objective_cases import HP

D = torch.float64
QS = [q for q, _ in QUANTILES]


def _batch(b=6, tt=9, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    lmu = torch.log(torch.rand(b, tt, generator=g, dtype=D) * 0.9 + 0.05)
    lp = (lmu + spread * torch.randn(b, tt, generator=g, dtype=D)).clamp(max=-1e-3)
    lold = (lmu + 0.5 * spread * torch.randn(b, tt, generator=g, dtype=D)).clamp(max=-1e-3)
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, tt).contiguous()
    lengths = torch.randint(1, tt + 1, (b,), generator=g)
    mask = (torch.arange(tt).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    return lp, lmu, lold, adv, mask


def _close(a, b, tol=1e-10):
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)


def test_ratio_quantiles_are_torch_quantiles_of_the_masked_values():
    lp, lmu, _, _, mask = _batch()
    out = compute_metrics(lp, lmu, mask)
    m = mask > 0
    tok = (lp - lmu)[m].exp()
    seq = ((lp - lmu) * mask).sum(-1).exp()
    for vals, prefix in ((tok, "ratio/token"), (seq, "ratio/seq")):
        ref = torch.quantile(vals, torch.tensor(QS, dtype=D))
        for (_, label), want in zip(QUANTILES, ref, strict=True):
            assert _close(out[f"{prefix}_{label}"], want), (prefix, label)
        assert _close(out[f"{prefix}_min"], vals.min()) and _close(out[f"{prefix}_max"], vals.max())
    assert _close(out["ratio/token_mean"], tok.mean())
    assert torch.equal(out["ratio/log_ratio_token_hist"].sort().values, (lp - lmu)[m].sort().values)
    assert out["train/tokens"].item() == m.sum().item()
    assert out["train/response_length_mean"].item() == pytest.approx(m.sum().item() / mask.shape[0])


def test_mismatch_metrics_formulas():
    """mismatch/* compares base_logp (unperturbed pi_old) with mu, whatever logp and old_logp are."""
    lp, lmu, lold, _, mask = _batch(seed=1)
    base = (lmu + 0.3 * torch.randn(lmu.shape, generator=torch.Generator().manual_seed(9), dtype=D)).clamp(max=-1e-3)
    out = compute_metrics(lp, lmu, mask, old_logp=lold, base_logp=base)
    src = base
    m = mask > 0
    d = (src - lmu)[m]
    w = d.exp()
    n = d.numel()
    assert _close(out["mismatch/k1"], (-d).mean())
    assert _close(out["mismatch/k2"], (0.5 * d**2).mean())
    assert _close(out["mismatch/k3"], (w - d - 1).mean())
    assert _close(out["mismatch/chi2_token"], (w**2).mean() - 1)
    assert _close(out["mismatch/ess_token"], w.sum() ** 2 / (w**2).sum() / n)
    ws = ((src - lmu) * mask).sum(-1).exp()
    assert _close(out["mismatch/chi2_seq"], (ws**2).mean() - 1)
    assert _close(out["mismatch/ess_seq"], ws.sum() ** 2 / (ws**2).sum() / ws.numel())
    diff = (src.exp() - lmu.exp()).abs()[m]
    assert _close(out["mismatch/abs_prob_diff_mean"], diff.mean())
    assert _close(out["mismatch/abs_prob_diff_max"], diff.max())
    assert _close(out["mismatch/ppl_train"], math.exp(-src[m].mean()))
    assert _close(out["mismatch/ppl_rollout"], math.exp(-lmu[m].mean()))
    assert _close(out["mismatch/ppl_ratio"], out["mismatch/ppl_train"] / out["mismatch/ppl_rollout"])
    # ratio/k*: the trained policy vs mu; staleness/k*: the trained policy vs the recomputed pi_old.
    for prefix, anchor in (("ratio", lmu), ("staleness", lold)):
        x = (lp - anchor)[m]
        assert _close(out[f"{prefix}/k1"], (-x).mean())
        assert _close(out[f"{prefix}/k2"], (0.5 * x**2).mean())
        assert _close(out[f"{prefix}/k3"], (x.exp() - x - 1).mean())


def test_no_mismatch_metrics_without_base_logp():
    lp, lmu, lold, _, mask = _batch(seed=1)
    out = compute_metrics(lp, lmu, mask, old_logp=lold)
    assert not [k for k in out if k.startswith("mismatch/")]
    assert "staleness/k3" in out and "ratio/k3" in out
    assert "staleness/k3" not in compute_metrics(lp, lmu, mask)


@pytest.mark.parametrize("objective", ["bypass_seq", "bypass_geo", "mis_seq_geo", "ppo"])
def test_loss_ratio_quantiles_are_token_weighted(objective):
    """ratio/loss_*: the ratio the clip sees, a sequence's ratio counted once per token."""
    lp, lmu, lold, adv, mask = _batch(seed=6)
    out = compute_metrics(lp, lmu, mask, old_logp=lold, advantages=adv, objective=objective, hparams=HP[objective])
    m = mask > 0
    anchor = lold if objective in ("mis_seq_geo", "ppo") else lmu
    d = (lp - anchor) * mask
    n = mask.sum(-1, keepdim=True)
    per_tok = {"bypass_seq": d.sum(-1, keepdim=True).expand_as(d),
               "bypass_geo": (d.sum(-1, keepdim=True) / n).expand_as(d),
               "mis_seq_geo": (d.sum(-1, keepdim=True) / n).expand_as(d), "ppo": d}[objective]
    vals = per_tok[m].clamp(-20, 20).exp()
    ref = torch.quantile(vals, torch.tensor(QS, dtype=D))
    for (_, label), want in zip(QUANTILES, ref, strict=True):
        assert _close(out[f"ratio/loss_{label}"], want), label
    assert _close(out["ratio/loss_max"], vals.max())


def test_clip_fractions_by_hand():
    ratio = [2.0, 5.0, 0.25, 20.0, 0.25, 3.0]
    lmu = torch.full((1, 6), math.log(0.02), dtype=D)
    lp = torch.tensor([[math.log(0.02 * r) for r in ratio]], dtype=D)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 1.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=D)
    out = compute_metrics(lp, lmu, mask, advantages=adv, objective="bypass_token",
                          hparams=dict(eps_low=0.5, eps_high=3.0, dual_clip=10.0))
    # low: A<0 & rho<0.5 -> token 2; high: A>0 & rho>4 -> token 1; dual: A<0 & rho>10 -> token 3
    assert out["ratio/clip_low_frac"].item() == pytest.approx(1 / 5)
    assert out["ratio/clip_high_frac"].item() == pytest.approx(1 / 5)
    assert out["ratio/clip_dual_frac"].item() == pytest.approx(1 / 5)


def test_mis_masked_and_vetoed_fractions():
    lold = torch.log(torch.full((2, 3), 0.1, dtype=D))
    # w = pi_old/mu: row 0: 0.5, 4, 2; row 1: 1, 1e-5 (vetoed), 1
    lmu = torch.log(torch.tensor([[0.2, 0.025, 0.05], [0.1, 1e4, 0.1]], dtype=D))
    adv = torch.ones(2, 3, dtype=D)
    mask = torch.ones(2, 3, dtype=D)
    hp = dict(eps_low=0.2, eps_high=0.28, is_low=0.0, is_high=3.0, veto=1e-4)
    out = compute_metrics(lold, lmu, mask, old_logp=lold, advantages=adv, objective="mis_token", hparams=hp)
    assert out["ratio/is_masked_frac"].item() == pytest.approx(1 / 6)  # only 4 is outside [0, 3]
    assert out["ratio/vetoed_seq_frac"].item() == pytest.approx(1 / 2)
    assert out["ratio/is_weight_mean"].item() == pytest.approx((0.5 + 2.0) / 6)
    hp_t = dict(eps_low=0.2, eps_high=0.28, is_high=3.0)
    out = compute_metrics(lold, lmu, mask, old_logp=lold, advantages=adv, objective="tis_token", hparams=hp_t)
    assert out["ratio/is_truncated_frac"].item() == pytest.approx(1 / 6)
    assert out["ratio/is_weight_mean"].item() == pytest.approx((0.5 + 3.0 + 2.0 + 1.0 + 1e-5 + 1.0) / 6)


def test_drpo_weights_and_dppo_boundary():
    lp, lmu, _, adv, mask = _batch(seed=2, spread=0.9)
    delta = 0.5
    out = compute_metrics(lp, lmu, mask, advantages=adv, objective="drpo", hparams=dict(delta=delta))
    m = mask > 0
    pi, mu = lp.exp(), lmu.exp()
    r = pi / mu
    w = (1 - torch.sign(adv * (r - 1)) * (pi - mu).abs() / delta)[m]
    ref = torch.quantile(w, torch.tensor(QS, dtype=D))
    for (_, label), want in zip(QUANTILES, ref, strict=True):
        assert _close(out[f"drpo/w_{label}"], want)
    assert _close(out["drpo/w_min"], w.min()) and _close(out["drpo/w_max"], w.max())
    assert _close(out["drpo/w_mean"], w.mean())
    assert _close(out["drpo/corrective_frac"], (w < 0).double().mean())
    diff = pi - mu
    beyond = ((adv > 0) & (diff > 0.15)) | ((adv < 0) & (diff < -0.15))
    assert 0 < beyond[m].double().mean() < 1
    assert _close(out["drpo/beyond_dppo_frac"], beyond[m].double().mean())
    out_tv = compute_metrics(lp, lmu, mask, advantages=adv, objective="dppo_tv", hparams=dict(delta=0.15))
    assert _close(out_tv["ratio/dppo_masked_frac"], beyond[m].double().mean())


def test_nonfinite_inputs_are_counted_and_excluded():
    lp, lmu, lold, adv, mask = _batch(seed=3)
    mask[:, :3] = 1
    lp, lmu = lp.clone(), lmu.clone()
    lp[0, 1] = float("nan")
    lmu[2, 2] = float("-inf")
    lmu[1, -1] = float("nan")
    mask[1, -1] = 0  # not counted: outside the mask
    out = compute_metrics(lp, lmu, mask, advantages=adv, objective="bypass_seq", hparams=HP["bypass_seq"])
    assert out["train/nonfinite_logp"].item() == 1
    assert out["train/nonfinite_rollout_logp"].item() == 1
    assert out["train/dropped_tokens"].item() == mask[0].sum().item() + mask[2].sum().item()
    assert all(torch.isfinite(v).all() for k, v in out.items() if not k.startswith("drpo/w"))
    keep = mask.clone()
    keep[[0, 2]] = 0
    ref = compute_metrics(lp.nan_to_num(0.0), lmu.nan_to_num(0.0, neginf=0.0), keep)
    assert _close(out["ratio/token_p50"], ref["ratio/token_p50"])
    assert _close(out["ratio/k3"], ref["ratio/k3"])
    tok = compute_metrics(lp, lmu, mask, advantages=adv, objective="bypass_token", hparams=HP["bypass_token"])
    assert tok["train/dropped_tokens"].item() == 2


def test_entropy_and_advantage_means():
    lp, lmu, _, adv, mask = _batch(seed=4)
    ent = torch.rand(lp.shape, dtype=D)
    out = compute_metrics(lp, lmu, mask, advantages=adv, entropy=ent)
    m = mask > 0
    assert _close(out["train/entropy"], ent[m].mean())
    assert _close(out["train/advantage_mean"], adv[m].mean())


def test_huge_sequence_ratios_keep_ess_finite():
    lmu = torch.full((3, 400), math.log(0.01), dtype=D)
    lp = torch.log(torch.full((3, 400), 0.99, dtype=D))  # sequence log-ratio ~ 1837
    lp[1] = lmu[1]
    out = compute_metrics(lmu, lmu, torch.ones(3, 400, dtype=D), base_logp=lp)
    # two equal dominant weights W and one of 1: (2W)^2 / (2 W^2) / 3 = 2/3, without overflow
    assert out["mismatch/ess_seq"].item() == pytest.approx(2 / 3)
    assert out["mismatch/chi2_seq"].item() == math.inf
    assert out["mismatch/ess_token"].item() == pytest.approx(
        (2 * 99 + 1) ** 2 / (2 * 99**2 + 1) / 3, rel=1e-9)


def test_every_metric_has_a_reduction_rule():
    lp, lmu, lold, adv, mask = _batch(seed=5)
    seen = set()
    for obj in OBJECTIVES:
        out = compute_metrics(lp, lmu, mask, old_logp=lold, base_logp=lold, advantages=adv, entropy=lp.exp(),
                              objective=obj, hparams=HP[obj])
        seen |= set(out)
    rules = {k: reduction_of(k) for k in seen}
    assert set(rules.values()) <= {"sum", "min", "max", "quantile", "samples", "mean"}
    assert all(k.split("/")[0] in ("ratio", "mismatch", "staleness", "drpo", "train") for k in seen)
    assert rules["ratio/token_p99.9"] == "quantile" and rules["drpo/w_p0.1"] == "quantile"
    assert rules["ratio/seq_min"] == "min" and rules["mismatch/abs_prob_diff_max"] == "max"
    assert rules["train/tokens"] == "sum" and rules["train/nonfinite_logp"] == "sum"
    assert rules["ratio/log_ratio_token_hist"] == "samples" and rules["mismatch/k3"] == "mean"
    for k in ("ratio/clip_low_frac", "ratio/clip_high_frac", "ratio/clip_dual_frac", "ratio/is_masked_frac",
              "ratio/vetoed_seq_frac", "ratio/is_truncated_frac", "ratio/dppo_masked_frac", "drpo/w_p50",
              "drpo/beyond_dppo_frac", "mismatch/chi2_seq", "mismatch/ess_token", "train/entropy"):
        assert k in seen, k


def test_metric_argument_errors():
    lp, lmu, lold, adv, mask = _batch()
    with pytest.raises(ValueError, match="advantages"):
        compute_metrics(lp, lmu, mask, objective="drpo", hparams=dict(delta=1.0))
    with pytest.raises(ValueError, match="old_logp"):
        compute_metrics(lp, lmu, mask, advantages=adv, objective="ppo", hparams=HP["ppo"])
    with pytest.raises(ValueError, match="rollout_logp"):
        compute_metrics(lp, lmu[:, 1:], mask)
    with pytest.raises(ValueError, match="entropy"):
        compute_metrics(lp, lmu, mask, entropy=lp[:1])


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_sorted_quantiles_match_torch(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=D).round(decimals=1)  # duplicates too
    qs = QS + [0.0, 1.0, 0.33]
    assert torch.allclose(sorted_quantiles(x.sort().values, qs), torch.quantile(x, torch.tensor(qs, dtype=D)),
                          rtol=0, atol=1e-12)


def test_sorted_quantiles_edge_cases():
    assert torch.isnan(sorted_quantiles(torch.empty(0, dtype=D), [0.5])).all()
    inf = torch.tensor([1.0, math.inf, math.inf], dtype=D)
    assert sorted_quantiles(inf, [0.999]).item() == math.inf


def test_histogram_subsample_is_deterministic_subset():
    x = torch.arange(100, dtype=D)
    a, b = subsample(x, 10, seed=3), subsample(x, 10, seed=3)
    assert a.numel() == 10 and torch.equal(a, b) and set(a.tolist()) <= set(x.tolist())
    assert torch.equal(subsample(x, 1000), x)
