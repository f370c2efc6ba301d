"""Per-step RL metrics (ALGORITHMS.md section 6): ratio tails, training-inference mismatch,
staleness, objective internals, DRPO weights; one flat dict of tensors with namespaced names.

``compute_metrics(..., group=dp_group)`` must be called by every rank of ``group`` with the same
optional inputs and objective (the collectives depend only on those, never on the data). The
values it returns are already *global* over the group and identical on every rank: sums and
token/sequence-weighted means come from all-reduced sums, quantiles from the gathered values
(exact, see :mod:`.dist_stats`). ``group=None`` means one process. Pass the detached tensors of a
whole RL step (all mini-batch updates and micro-batches of this rank concatenated): the quantiles
are then exact over every token of the step, never an average of per-update quantiles.

Which distributions are compared (each namespace means one thing):

- ``mismatch/*``: ``pi_theta_old`` (unperturbed, at the start of the step: ``base_logp``) vs the
  rollout policy ``mu``: the training-inference mismatch alone. Logged only when ``base_logp`` is
  given (``logging.mismatch_metrics``).
- ``ratio/*``: the policy being trained (``logp``: under ALP the perturbed forward, after each
  mini-batch update's previous updates) vs ``mu``; ``ratio/loss_*`` is the ratio the loss itself
  clips (sequence ratios broadcast to their tokens, token-weighted, as the ALP reference's
  ``compute_policy_loss_perturbed`` logs it).
- ``staleness/*``: ``logp`` vs the recomputed ``pi_old`` (only when ``old_logp`` is given).

KL estimators (J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html),
for samples from the anchor ``q`` and ``log r = log p - log q``: ``k1 = -log r``,
``k2 = (log r)^2 / 2``, ``k3 = r - 1 - log r``. Every metric's cross-rank and cross-update
reduction rule is given by :func:`reduction_of` (the only place); docs/objectives.md lists them.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .dist_stats import all_reduce_, gather_values, sorted_quantiles, subsample
from .divergence import dppo_invalid, drpo_weight
from .hparams import check_hparams
from .objectives import _bool_mask, broadcast_advantages, effective_mask, is_weight_level, is_weight_mode
from .ratio import LOG_RATIO_CLAMP, importance_weight, loss_log_ratio
from .registry import objective as lookup

QUANTILES = ((0.001, "p0.1"), (0.01, "p1"), (0.05, "p5"), (0.25, "p25"), (0.5, "p50"),
             (0.75, "p75"), (0.95, "p95"), (0.99, "p99"), (0.999, "p99.9"))
_SUM_METRICS = ("train/tokens", "train/sequences", "train/dropped_tokens", "train/skipped_step")
_KL = ("k1", "k2", "k3")


def reduction_of(name: str) -> str:
    """How metric ``name`` is reduced across ranks and merged across the updates of one step.

    ``sum``: counts (tokens, sequences, dropped and non-finite tokens, skipped updates).
    ``min`` / ``max``: extremes. ``quantile``: exact quantile of the union of all values (cannot be
    merged from per-update values: computed once over the whole step). ``samples``: 1-D tensor of
    raw values for histograms (concatenated). ``mean``: token- or sequence-weighted mean over all
    ranks, or a function of global sums (fractions, KL estimates, chi-square, ESS, perplexities);
    per-update scalars (loss, gradient norm, learning rate) are averaged over the updates.
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
    for (_, label), val in zip(QUANTILES, qv, strict=True):
        out[f"{prefix}_{label}"] = val
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=sorted_vals.device)
    out[f"{prefix}_min"] = sorted_vals[0].double() if sorted_vals.numel() else nan
    out[f"{prefix}_max"] = sorted_vals[-1].double() if sorted_vals.numel() else nan


def _kl_sums(local: dict, prefix: str, log_r: torch.Tensor) -> None:
    """Local sums of the k1/k2/k3 estimators of ``log r`` (1-D, the counted tokens)."""
    local[f"{prefix}/k1"] = (-log_r).sum()
    local[f"{prefix}/k2"] = 0.5 * log_r.square().sum()
    local[f"{prefix}/k3"] = (torch.expm1(log_r) - log_r).sum()


def _check_inputs(objective, hparams, logp, advantages, old_logp) -> dict:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    hp = check_hparams(objective, dict(hparams or {})) if objective is not None else {}
    if objective is not None and advantages is None:
        raise ValueError(f"metrics of objective {objective!r} need advantages")
    if objective is not None and lookup(objective).needs_old_logp and old_logp is None:
        raise ValueError(f"metrics of objective {objective!r} need old_logp")
    return hp


def _counted_tokens(objective, m: torch.Tensor, inputs: Dict[str, Optional[torch.Tensor]],
                    local: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens the metrics count: ``m`` minus tokens with a non-finite input (whole sequences for
    sequence-level objectives); adds ``train/nonfinite_*`` and ``train/dropped_tokens`` to ``local``."""
    shape, f64 = tuple(m.shape), torch.float64
    bad = torch.zeros_like(m)
    for k, t in inputs.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{k} has shape {tuple(t.shape)}, expected {shape} (the shape of logp)")
        nonfinite = m & ~torch.isfinite(t.detach())
        local[f"train/nonfinite_{k}"] = nonfinite.sum().to(f64)
        bad |= nonfinite
    loss_valid = effective_mask(objective, m, inputs["logp"], inputs["rollout_logp"], inputs.get("advantages"),
                                inputs["old_logp"])
    local["train/dropped_tokens"] = (m & ~loss_valid).sum().to(f64)
    v = m & ~bad
    if objective is not None and lookup(objective).sequence_level:
        v &= ~bad.any(dim=-1, keepdim=True)
    return v


@torch.no_grad()
def compute_metrics(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: Optional[torch.Tensor] = None,
    base_logp: Optional[torch.Tensor] = None,
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

    ``base_logp``: unperturbed ``pi_theta_old`` log-probs at the start of the step, for
    ``mismatch/*`` (nothing is logged under that name without it). ``old_logp``: the recomputed
    ``pi_old`` the objective uses (adds ``staleness/*``). ``objective`` / ``hparams`` (as given to
    ``token_losses``) add the objective's internals (clip fractions, masked / vetoed fractions,
    DRPO weights, ``ratio/loss_*``) and need ``advantages``. Tokens with a non-finite input are
    excluded and counted (``train/nonfinite_*``); ``train/dropped_tokens`` counts the tokens the
    objective's loss dropped for that reason.
    """
    hp = _check_inputs(objective, hparams, logp, advantages, old_logp)
    shape = tuple(logp.shape)
    dev, f64 = logp.device, torch.float64
    inputs = {"logp": logp, "rollout_logp": rollout_logp, "old_logp": old_logp, "base_logp": base_logp}
    if advantages is not None:
        inputs["advantages"] = broadcast_advantages(advantages, shape)
    local: Dict[str, torch.Tensor] = {}
    v = _counted_tokens(objective, _bool_mask(mask, shape), inputs, local)

    def clean(t):
        return None if t is None else torch.where(v, t.detach().to(f64), torch.zeros((), dtype=f64, device=dev))

    lp, lmu, lold, lbase = clean(logp), clean(rollout_logp), clean(old_logp), clean(base_logp)
    adv = clean(inputs.get("advantages"))
    has = v.any(dim=-1)
    x = lp - lmu
    x_tok, x_seq = x[v], x.sum(dim=-1)[has]
    local.update({"train/tokens": v.sum().to(f64), "train/sequences": has.sum().to(f64),
                  "ratio": x_tok.exp().sum()})
    _kl_sums(local, "ratio", x_tok)
    if lold is not None:
        _kl_sums(local, "staleness", (lp - lold)[v])
    if entropy is not None:
        if tuple(entropy.shape) != shape:
            raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected {shape} (the shape of logp)")
        ent_ok = v & torch.isfinite(entropy.detach())
        local["entropy"] = torch.where(ent_ok, entropy.detach().to(f64), torch.zeros((), dtype=f64, device=dev)).sum()
    if adv is not None:
        local["adv"] = adv.sum()
        local["beyond"] = (dppo_invalid("tv", lp, lmu, adv, dppo_delta) & v).sum().to(f64)
    gathered = _objective_locals(objective, hp, lp, lmu, lold, adv, v, has, local)
    mism = _mismatch_locals(lbase, lmu, v, has, local, group) if lbase is not None else None

    names = list(local)
    sums = all_reduce_(torch.stack([local[k].to(f64) for k in names]), "sum", group)
    g = dict(zip(names, sums, strict=True))
    n_tok, n_seq = g["train/tokens"], g["train/sequences"]
    nan = float("nan")
    out: Dict[str, torch.Tensor] = {k: g[k] for k in names if k.startswith("train/")}
    out["train/response_length_mean"] = _div(n_tok, n_seq, nan)
    if entropy is not None:
        out["train/entropy"] = _div(g["entropy"], n_tok, nan)
    if adv is not None:
        out["train/advantage_mean"] = _div(g["adv"], n_tok, nan)
        out["drpo/beyond_dppo_frac"] = _div(g["beyond"], n_tok, 0.0)
    out["ratio/token_mean"] = _div(g["ratio"], n_tok, nan)
    for k in names:
        if k.startswith(("ratio/k", "staleness/k")):
            out[k] = _div(g[k], n_tok, nan)
    if mism is not None:
        _mismatch_out(out, g, mism, n_tok, n_seq)
    for key, num, den in _OBJECTIVE_FRACTIONS:
        if num in g:
            out[key] = _div(g[num], n_seq if den == "seq" else n_tok, 0.0 if key.endswith("_frac") else nan)

    _put_gathered(out, x_tok, x_seq, gathered, group, hist_samples, hist_seed)
    return out


def _put_gathered(out, x_tok, x_seq, gathered, group, hist_samples: int, hist_seed: int) -> None:
    """Exact quantiles and histogram samples of values gathered from every rank of ``group``."""
    tok_sorted = gather_values(x_tok, group).sort().values
    seq_sorted = gather_values(x_seq, group).sort().values
    _put_quantiles(out, "ratio/token", tok_sorted.exp())
    _put_quantiles(out, "ratio/seq", seq_sorted.exp())
    out["ratio/log_ratio_token_hist"] = subsample(tok_sorted, hist_samples, hist_seed)
    out["ratio/log_ratio_seq_hist"] = subsample(seq_sorted, hist_samples, hist_seed)
    for prefix, values in gathered.items():
        srt = gather_values(values, group).sort().values
        _put_quantiles(out, prefix, srt)
        if prefix == "ratio/loss":
            out["ratio/loss_log_ratio_hist"] = subsample(srt.log(), hist_samples, hist_seed)


def _mismatch_locals(lbase, lmu, v, has, local, group) -> torch.Tensor:
    """Local sums of the ``mismatch/*`` metrics (unperturbed pi_old vs mu); returns the global
    maxima (token log-weight, sequence log-weight, |pi_old - mu|) used as shifts and extremes."""
    f64 = torch.float64
    d = lbase - lmu
    d_tok, d_seq = d[v], d.sum(dim=-1)[has]
    absdiff = (lbase.exp() - lmu.exp()).abs()[v]
    # Global maxima first: the shifts that keep the ESS sums finite.
    neg_inf = torch.tensor(-math.inf, dtype=f64, device=d.device)
    mx = torch.stack([t.max() if t.numel() else neg_inf for t in (d_tok, d_seq, absdiff)])
    all_reduce_(mx, "max", group)
    shift_tok = torch.where(torch.isfinite(mx[0]), mx[0], torch.zeros_like(mx[0]))
    shift_seq = torch.where(torch.isfinite(mx[1]), mx[1], torch.zeros_like(mx[1]))
    _kl_sums(local, "mismatch", d_tok)
    local.update({
        "absdiff": absdiff.sum(),
        "w1": (d_tok - shift_tok).exp().sum(), "w2": (2 * (d_tok - shift_tok)).exp().sum(),
        "W1": (d_seq - shift_seq).exp().sum(), "W2": (2 * (d_seq - shift_seq)).exp().sum(),
        "src": lbase[v].sum(), "lmu": lmu[v].sum(),
    })
    return torch.stack([shift_tok, shift_seq, mx[2]])


def _mismatch_out(out, g, mism, n_tok, n_seq) -> None:
    nan = float("nan")
    shift_tok, shift_seq, absmax = mism
    for k in _KL:
        out[f"mismatch/{k}"] = _div(g[f"mismatch/{k}"], n_tok, nan)
    out["mismatch/abs_prob_diff_mean"] = _div(g["absdiff"], n_tok, nan)
    out["mismatch/abs_prob_diff_max"] = torch.where(torch.isfinite(absmax), absmax, torch.full_like(absmax, nan))
    # chi2 = E[w^2] - 1 and ESS = (sum w)^2 / (N sum w^2), from sums shifted by the global max log-weight.
    out["mismatch/chi2_token"] = (2 * shift_tok + _div(g["w2"], n_tok, nan).log()).exp() - 1
    out["mismatch/chi2_seq"] = (2 * shift_seq + _div(g["W2"], n_seq, nan).log()).exp() - 1
    out["mismatch/ess_token"] = _div(g["w1"].square() / g["w2"].clamp(min=1e-300), n_tok, nan)
    out["mismatch/ess_seq"] = _div(g["W1"].square() / g["W2"].clamp(min=1e-300), n_seq, nan)
    out["mismatch/ppl_train"] = _div(-g["src"], n_tok, nan).exp()
    out["mismatch/ppl_rollout"] = _div(-g["lmu"], n_tok, nan).exp()
    out["mismatch/ppl_ratio"] = _div(g["lmu"] - g["src"], n_tok, nan).exp()


# (metric name, key of its global numerator, denominator: tokens or sequences)
_OBJECTIVE_FRACTIONS = (
    ("ratio/clip_low_frac", "clip_low", "tok"), ("ratio/clip_high_frac", "clip_high", "tok"),
    ("ratio/clip_dual_frac", "clip_dual", "tok"), ("ratio/is_weight_mean", "is_w", "tok"),
    ("ratio/is_masked_frac", "is_masked", "tok"), ("ratio/is_truncated_frac", "is_trunc", "tok"),
    ("ratio/vetoed_seq_frac", "vetoed", "seq"), ("ratio/dppo_masked_frac", "dppo_masked", "tok"),
    ("drpo/w_mean", "drpo_w", "tok"), ("drpo/corrective_frac", "drpo_neg", "tok"),
)


def _objective_locals(objective, hp, lp, lmu, lold, adv, v, has, local) -> Dict[str, torch.Tensor]:
    """Add the objective's local numerators to ``local``; return ``{prefix: values}`` to gather for
    exact quantiles (``ratio/loss``: the ratio the loss clips, per counted token; ``drpo/w``)."""
    f64 = torch.float64
    if objective is None:
        return {}
    spec = lookup(objective)
    if spec.clips_ratio:
        rho = loss_log_ratio(objective, lp, lmu, lold, v).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        lo, hi = 1.0 - hp["eps_low"], 1.0 + hp["eps_high"]
        local["clip_low"] = (v & (adv < 0) & (rho < lo)).sum().to(f64)
        local["clip_high"] = (v & (adv > 0) & (rho > hi)).sum().to(f64)
        if hp["dual_clip"] is not None:
            capped = torch.maximum(rho, rho.clamp(lo, hi)) > hp["dual_clip"]
            local["clip_dual"] = (v & (adv < 0) & capped).sum().to(f64)
        if spec.family in ("mis", "tis"):
            mode = is_weight_mode(spec)
            w, info = importance_weight(is_weight_level(spec), mode, lold, lmu, v,
                                        is_low=hp.get("is_low", 0.0), is_high=hp["is_high"], veto=hp["veto"])
            local["is_w"] = w[v].sum()
            local["is_masked" if mode == "mask" else "is_trunc"] = info[
                "masked" if mode == "mask" else "truncated"].sum().to(f64)
            local["vetoed"] = (info["vetoed"].any(dim=-1) & has).sum().to(f64)
        return {"ratio/loss": rho[v]}
    if spec.family == "dppo":
        inv = dppo_invalid(spec.kind, lp, lmu, adv, hp["delta"]) & v
        local["dppo_masked"] = inv.sum().to(f64)
        return {}
    if spec.family == "drpo":
        w = drpo_weight(spec.kind, lp, lmu, adv, hp["delta"], hp.get("dppo_delta"))[v]
        local["drpo_w"] = w.sum()
        local["drpo_neg"] = (w < 0).sum().to(f64)
        return {"drpo/w": w}
    raise ValueError(f"unknown objective {objective!r}")
