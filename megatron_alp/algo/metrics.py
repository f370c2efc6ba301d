"""Per-step RL metrics (ALGORITHMS.md section 6): ratio tails, training-inference mismatch,
objective internals, DRPO weights; one flat dict of tensors with namespaced names.

``compute_metrics(..., group=dp_group)`` must be called by every rank of ``group`` with the same
optional inputs and objective (the collectives depend only on those, never on the data). The
values it returns are already *global* over the group and identical on every rank: sums and
token/sequence-weighted means come from all-reduced sums, quantiles from the gathered values
(exact, see :mod:`.dist_stats`). ``group=None`` means one process. Pass the detached tensors of a
whole step (all micro-batches of this rank concatenated); under tensor parallelism pass the
data-parallel group only (TP ranks hold the same log-probs).

Which ratio is measured: ``ratio/*`` is ``pi/mu`` (``logp`` against ``rollout_logp``: under ALP,
the perturbed policy); ``mismatch/*`` is ``pi_old/mu`` when ``old_logp`` is given, else ``pi/mu``
(equal to the training-inference mismatch before the first update). Every metric's cross-rank
reduction rule is given by :func:`reduction_of`; docs/objectives.md lists them all.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .dist_stats import all_reduce_, gather_values, sorted_quantiles, subsample
from .divergence import dppo_invalid, drpo_weight
from .hparams import check_hparams
from .objectives import _bool_mask, broadcast_advantages, effective_mask, is_weight_mode
from .ratio import LOG_RATIO_CLAMP, importance_weight, policy_log_ratio
from .registry import objective as lookup

QUANTILES = ((0.001, "p0.1"), (0.01, "p1"), (0.05, "p5"), (0.25, "p25"), (0.5, "p50"),
             (0.75, "p75"), (0.95, "p95"), (0.99, "p99"), (0.999, "p99.9"))
_SUM_METRICS = ("train/tokens", "train/sequences", "train/dropped_tokens")


def reduction_of(name: str) -> str:
    """How metric ``name`` is reduced across ranks (and how to combine it over several steps).

    ``sum``: counts. ``min`` / ``max``: extremes. ``quantile``: exact quantile of the union of all
    ranks' values. ``samples``: 1-D tensor of raw values (the union, deterministically subsampled)
    for histograms. ``mean``: token- or sequence-weighted mean over all ranks, or a function of
    global sums (fractions, k1, k3, chi-square, ESS, perplexities).
    """
    leaf = name.rsplit("/", 1)[-1]
    if name.endswith("_hist"):
        return "samples"
    if name in _SUM_METRICS or name.startswith("train/nonfinite_"):
        return "sum"
    if leaf.endswith("_min"):
        return "min"
    if leaf.endswith("_max"):
        return "max"
    if any(leaf.endswith("_" + q) for _, q in QUANTILES):
        return "quantile"
    return "mean"


def _div(num: torch.Tensor, den: torch.Tensor, empty: float) -> torch.Tensor:
    """num / den, or ``empty`` when den == 0 (NaN for undefined means, 0 for fractions)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, empty))


def _put_quantiles(out: dict, prefix: str, sorted_vals: torch.Tensor) -> None:
    qv = sorted_quantiles(sorted_vals, [q for q, _ in QUANTILES])
    for (_, label), val in zip(QUANTILES, qv):
        out[f"{prefix}_{label}"] = val
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=sorted_vals.device)
    out[f"{prefix}_min"] = sorted_vals[0].double() if sorted_vals.numel() else nan
    out[f"{prefix}_max"] = sorted_vals[-1].double() if sorted_vals.numel() else nan


@torch.no_grad()
def compute_metrics(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    objective: Optional[str] = None,
    hparams: Optional[dict] = None,
    dppo_delta: float = 0.15,
    group=None,
    hist_samples: int = 4096,
    hist_seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Flat dict of float64 tensors (0-d scalars; ``*_hist`` entries are 1-D samples).

    ``objective`` / ``hparams`` (as given to ``token_losses``) add the objective's internals (clip
    fractions, masked / vetoed fractions, DRPO weights) and need ``advantages``. Tokens with a
    non-finite input are excluded and counted (``train/nonfinite_*``); ``train/dropped_tokens``
    counts the tokens the objective's loss dropped for that reason.
    """
    shape = tuple(logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {shape}")
    hp = check_hparams(objective, dict(hparams or {})) if objective is not None else {}
    spec = lookup(objective) if objective is not None else None
    if objective is not None and advantages is None:
        raise ValueError(f"metrics of objective {objective!r} need advantages")
    if spec is not None and spec.needs_old_logp and old_logp is None:
        raise ValueError(f"metrics of objective {objective!r} need old_logp")
    dev, f64 = logp.device, torch.float64
    _, v, inputs, local = _valid_tokens(spec, objective, logp, rollout_logp, mask, old_logp, advantages)

    def clean(t):
        return torch.where(v, t.detach().to(f64), torch.zeros((), dtype=f64, device=dev))

    lp, lmu = clean(logp), clean(rollout_logp)
    lold = clean(old_logp) if old_logp is not None else None
    adv = clean(inputs["advantages"]) if advantages is not None else None
    has = v.any(dim=-1)
    x = lp - lmu
    x_tok, x_seq = x[v], x.sum(dim=-1)[has]
    src = lold if lold is not None else lp
    d = src - lmu
    d_tok, d_seq = d[v], d.sum(dim=-1)[has]
    absdiff = (src.exp() - lmu.exp()).abs()[v]

    # Phase 1: global maxima (also the shifts that keep the ESS sums finite).
    neg_inf = torch.tensor(-math.inf, dtype=f64, device=dev)
    mx = torch.stack([t.max() if t.numel() else neg_inf for t in (d_tok, d_seq, absdiff)])
    all_reduce_(mx, "max", group)
    shift_tok = torch.where(torch.isfinite(mx[0]), mx[0], torch.zeros_like(mx[0]))
    shift_seq = torch.where(torch.isfinite(mx[1]), mx[1], torch.zeros_like(mx[1]))

    # Phase 2: global sums.
    local.update({
        "train/tokens": v.sum().to(f64), "train/sequences": has.sum().to(f64),
        "k1": (-d_tok).sum(), "k3": (torch.expm1(d_tok) - d_tok).sum(), "absdiff": absdiff.sum(),
        "w1": (d_tok - shift_tok).exp().sum(), "w2": (2 * (d_tok - shift_tok)).exp().sum(),
        "W1": (d_seq - shift_seq).exp().sum(), "W2": (2 * (d_seq - shift_seq)).exp().sum(),
        "src": src[v].sum(), "lmu": lmu[v].sum(), "ratio": x_tok.exp().sum(),
    })
    if entropy is not None:
        if tuple(entropy.shape) != shape:
            raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected {shape} (the shape of logp)")
        ent_ok = v & torch.isfinite(entropy.detach())
        local["entropy"] = torch.where(ent_ok, entropy.detach().to(f64), torch.zeros((), dtype=f64, device=dev)).sum()
    if adv is not None:
        local["adv"] = adv.sum()
        beyond = dppo_invalid("tv", lp, lmu, adv, dppo_delta) & v
        local["beyond"] = beyond.sum().to(f64)
    extra_values = _objective_locals(spec, hp, lp, lmu, lold, adv, v, has, local)

    names = list(local)
    sums = all_reduce_(torch.stack([local[k].to(f64) for k in names]), "sum", group)
    g = dict(zip(names, sums))
    out = _global_metrics(g, mx, shift_tok, shift_seq)

    # Gathered values: exact quantiles and histogram samples.
    tok_sorted = gather_values(x_tok, group).sort().values
    seq_sorted = gather_values(x_seq, group).sort().values
    _put_quantiles(out, "ratio/token", tok_sorted.exp())
    _put_quantiles(out, "ratio/seq", seq_sorted.exp())
    out["ratio/log_ratio_token_hist"] = subsample(tok_sorted, hist_samples, hist_seed)
    out["ratio/log_ratio_seq_hist"] = subsample(seq_sorted, hist_samples, hist_seed)
    if extra_values is not None:
        _put_quantiles(out, "drpo/w", gather_values(extra_values, group).sort().values)
    return out


def _valid_tokens(spec, objective, logp, rollout_logp, mask, old_logp, advantages):
    """(mask, the tokens measured, the inputs by name, local counts of non-finite inputs and of the
    tokens the objective's loss dropped). A non-finite input excludes its token (its sequence, for
    sequence-level objectives)."""
    shape = tuple(logp.shape)
    f64 = torch.float64
    m = _bool_mask(mask, shape)
    inputs = {"logp": logp, "rollout_logp": rollout_logp, "old_logp": old_logp}
    if advantages is not None:
        inputs["advantages"] = broadcast_advantages(advantages, shape)
    local: Dict[str, torch.Tensor] = {}
    bad = torch.zeros_like(m)
    for k, t in inputs.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{k} has shape {tuple(t.shape)}, expected {shape} (the shape of logp)")
        nonfinite = m & ~torch.isfinite(t.detach())
        local[f"train/nonfinite_{k}"] = nonfinite.sum().to(f64)
        bad |= nonfinite
    loss_valid = effective_mask(objective, m, logp, rollout_logp, advantages, old_logp)
    local["train/dropped_tokens"] = (m & ~loss_valid).sum().to(f64)
    v = m & ~bad
    if spec is not None and spec.sequence_level:
        v &= ~bad.any(dim=-1, keepdim=True)
    return m, v, inputs, local


def _global_metrics(g: Dict[str, torch.Tensor], mx: torch.Tensor, shift_tok, shift_seq) -> Dict[str, torch.Tensor]:
    """The scalar metrics from the global sums ``g`` and maxima ``mx`` (the ESS/chi2 shifts)."""
    n_tok, n_seq = g["train/tokens"], g["train/sequences"]
    nan = float("nan")
    out: Dict[str, torch.Tensor] = {k: v for k, v in g.items() if k.startswith("train/")}
    out["train/response_length_mean"] = _div(n_tok, n_seq, nan)
    if "entropy" in g:
        out["train/entropy"] = _div(g["entropy"], n_tok, nan)
    if "adv" in g:
        out["train/advantage_mean"] = _div(g["adv"], n_tok, nan)
        out["drpo/beyond_dppo_frac"] = _div(g["beyond"], n_tok, 0.0)
    out["mismatch/k1"] = _div(g["k1"], n_tok, nan)
    out["mismatch/k3"] = _div(g["k3"], n_tok, nan)
    out["mismatch/abs_prob_diff_mean"] = _div(g["absdiff"], n_tok, nan)
    out["mismatch/abs_prob_diff_max"] = torch.where(torch.isfinite(mx[2]), mx[2], torch.full_like(mx[2], nan))
    # chi2 = E[w^2] - 1 and ESS = (sum w)^2 / (N sum w^2), from sums shifted by the global max log-weight.
    out["mismatch/chi2_token"] = (2 * shift_tok + _div(g["w2"], n_tok, nan).log()).exp() - 1
    out["mismatch/chi2_seq"] = (2 * shift_seq + _div(g["W2"], n_seq, nan).log()).exp() - 1
    out["mismatch/ess_token"] = _div(g["w1"].square() / g["w2"].clamp(min=1e-300), n_tok, nan)
    out["mismatch/ess_seq"] = _div(g["W1"].square() / g["W2"].clamp(min=1e-300), n_seq, nan)
    out["mismatch/ppl_train"] = _div(-g["src"], n_tok, nan).exp()
    out["mismatch/ppl_rollout"] = _div(-g["lmu"], n_tok, nan).exp()
    out["mismatch/ppl_ratio"] = _div(g["lmu"] - g["src"], n_tok, nan).exp()
    out["ratio/token_mean"] = _div(g["ratio"], n_tok, nan)
    for key, num, den in _OBJECTIVE_FRACTIONS:
        if num in g:
            out[key] = _div(g[num], n_seq if den == "seq" else n_tok, 0.0 if key.endswith("_frac") else nan)
    return out


# (metric name, key of its global numerator, denominator: tokens or sequences)
_OBJECTIVE_FRACTIONS = (
    ("ratio/clip_low_frac", "clip_low", "tok"), ("ratio/clip_high_frac", "clip_high", "tok"),
    ("ratio/clip_dual_frac", "clip_dual", "tok"), ("ratio/is_weight_mean", "is_w", "tok"),
    ("ratio/is_masked_frac", "is_masked", "tok"), ("ratio/is_truncated_frac", "is_trunc", "tok"),
    ("ratio/vetoed_seq_frac", "vetoed", "seq"), ("ratio/dppo_masked_frac", "dppo_masked", "tok"),
    ("drpo/w_mean", "drpo_w", "tok"), ("drpo/corrective_frac", "drpo_neg", "tok"),
)


def _objective_locals(spec, hp, lp, lmu, lold, adv, v, has, local) -> Optional[torch.Tensor]:
    """Add the objective's local numerators to ``local``; return the DRPO weights to gather (or None)."""
    f64 = torch.float64
    if spec is None:
        return None
    if spec.clips_ratio:
        log_rho = policy_log_ratio(spec.kind, lp, lmu, v) if spec.family == "bypass" else lp - lold
        rho = log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        lo, hi = 1.0 - hp["eps_low"], 1.0 + hp["eps_high"]
        local["clip_low"] = (v & (adv < 0) & (rho < lo)).sum().to(f64)
        local["clip_high"] = (v & (adv > 0) & (rho > hi)).sum().to(f64)
        if hp["dual_clip"] is not None:
            capped = torch.maximum(rho, rho.clamp(lo, hi)) > hp["dual_clip"]
            local["clip_dual"] = (v & (adv < 0) & capped).sum().to(f64)
        if spec.family in ("mis", "tis"):
            mode = is_weight_mode(spec)
            w, info = importance_weight(spec.kind, mode, lold, lmu, v,
                                        is_low=hp.get("is_low", 0.0), is_high=hp["is_high"], veto=hp["veto"])
            local["is_w"] = w[v].sum()
            local["is_masked" if mode == "mask" else "is_trunc"] = info[
                "masked" if mode == "mask" else "truncated"].sum().to(f64)
            local["vetoed"] = (info["vetoed"].any(dim=-1) & has).sum().to(f64)
        return None
    if spec.family == "dppo":
        inv = dppo_invalid(spec.kind, lp, lmu, adv, hp["delta"]) & v
        local["dppo_masked"] = inv.sum().to(f64)
        return None
    w = drpo_weight(spec.kind, lp, lmu, adv, hp["delta"], hp.get("dppo_delta"))[v]  # the drpo family
    local["drpo_w"] = w.sum()
    local["drpo_neg"] = (w < 0).sum().to(f64)
    return w
