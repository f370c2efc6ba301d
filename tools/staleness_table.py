"""The table of the asynchronous-rollout study (tools/staleness_study.py, docs/results.md).

    python tools/staleness_table.py --out /tmp/async_study [--steps 30] [--final-window 6]

One row per (objective, max_staleness), over the complete runs (seeds) found under ``<out>/runs``:

- reward: ``rollout/reward_mean`` averaged over a run's last ``--final-window`` steps; mean +- sample
  standard deviation (ddof 1) over the seeds.
- ratio pi/mu, pooled: exact quantiles (linear interpolation, as the monitor's
  ``megatron_alp.algo.dist_stats.sorted_quantiles``) of the token ratio ``exp(log pi - log mu)`` over
  every trained token of every step of every seed: the values of ``ratio/log_ratio_token_hist``
  from ``hist_samples.jsonl`` (``logging.raw_samples``). pi is the policy being trained at each
  mini-batch update (ALP: the perturbed forward), mu the rollout log-prob of the version that
  generated the token (ALGORITHMS.md section 6; megatron_alp/algo/metrics.py ``ratio/*``). The
  table checks that each step's line holds all its tokens (``train/tokens``): the monitor
  subsamples above 4096 tokens, and the quantiles would then be estimates (a ``~`` marks them).
  ``|log r|>ln2`` is the fraction of those tokens whose ratio lies outside [1/2, 2].
- staleness: ``rollout/staleness_hist`` pooled over steps and seeds (each trained sample's step minus
  the oldest weight version that produced it): mean and max.
- KL k3: ``mismatch/k3`` (the unperturbed pi_old at the start of the step vs mu: mismatch plus the
  staleness of the batch) and ``ratio/k3`` (pi vs mu over the step's updates), per-token k3 estimates
  (Schulman, http://joschu.net/blog/kl-approx.html), averaged over steps and seeds.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NAME = re.compile(r"^(?P<obj>.+)_k(?P<k>\d+)_s(?P<seed>\d+)$")
QS = ((0.001, "p0.1"), (0.01, "p1"), (0.99, "p99"), (0.999, "p99.9"))


def quantiles(sorted_vals: np.ndarray, qs) -> List[float]:
    """Linear-interpolation quantiles of an ascending array (torch.quantile's and the monitor's rule)."""
    n = sorted_vals.size
    if n == 0:
        return [math.nan for _ in qs]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        a, b = sorted_vals[lo], sorted_vals[hi]
        out.append(float(a if a == b else a + (b - a) * (pos - lo)))
    return out


def read_samples(path: str, steps: Optional[int]) -> Dict[int, dict]:
    """{step: line} of a run's hist_samples.jsonl (the last line wins for a repeated step)."""
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if steps is None or row["step"] < steps:
                out[row["step"]] = row
    return out


def load_run(run_dir: str, steps: Optional[int]) -> Optional[dict]:
    from compare_runs import event_dirs, read_scalars

    dirs = event_dirs(os.path.join(run_dir, "tensorboard"))
    samples_path = os.path.join(run_dir, "hist_samples.jsonl")
    if not dirs or not os.path.exists(samples_path):
        return None
    scalars = read_scalars(dirs[-1])
    first = min(scalars.get("rollout/reward_mean", {0: 0}))  # the step numbering's origin
    keep = None if steps is None else range(first, first + steps)
    scalars = {t: {s: v for s, v in ser.items() if keep is None or s in keep} for t, ser in scalars.items()}
    lines = read_samples(samples_path, None if steps is None else first + steps)
    return {"scalars": scalars, "samples": lines, "steps": len(scalars.get("rollout/reward_mean", {}))}


def _series(run: dict, tag: str) -> np.ndarray:
    s = run["scalars"].get(tag, {})
    return np.array([s[k] for k in sorted(s)], dtype=np.float64)


def cell(runs: List[dict], final_window: int) -> dict:
    finals = np.array([np.nanmean(_series(r, "rollout/reward_mean")[-final_window:]) for r in runs])
    logr, stale, subsampled = [], [], False
    for r in runs:
        tokens = r["scalars"].get("train/tokens", {})
        for step, line in r["samples"].items():
            vals = line.get("ratio/log_ratio_token_hist", [])
            logr.extend(vals)
            stale.extend(line.get("rollout/staleness_hist", []))
            if step in tokens and len(vals) != int(round(tokens[step])):
                subsampled = True
    logr_arr = np.sort(np.asarray(logr, dtype=np.float64))
    ratio_q = [math.exp(v) for v in quantiles(logr_arr, [q for q, _ in QS])]
    row = {"seeds": len(runs), "steps": min(r["steps"] for r in runs), "reward": float(finals.mean()),
           "reward_std": float(finals.std(ddof=1)) if len(finals) > 1 else math.nan, "tokens": logr_arr.size,
           "exact": not subsampled, "max": math.exp(logr_arr[-1]) if logr_arr.size else math.nan,
           "min": math.exp(logr_arr[0]) if logr_arr.size else math.nan,
           "tail_frac": float((np.abs(logr_arr) > math.log(2)).mean()) if logr_arr.size else math.nan,
           "stale_mean": float(np.mean(stale)) if stale else math.nan,
           "stale_max": float(np.max(stale)) if stale else math.nan}
    row.update({label: v for (_, label), v in zip(QS, ratio_q, strict=True)})
    for tag in ("mismatch/k3", "ratio/k3"):
        vals = np.concatenate([_series(r, tag) for r in runs]) if runs else np.array([])
        row[tag] = float(np.nanmean(vals)) if vals.size else math.nan
    return row


def table(rows: Dict[tuple, dict]) -> str:
    head = ("| objective | max_staleness | seeds x steps | reward (last 6, mean ± std) | ratio p0.1 | p1 | p99 | "
            "p99.9 | min | max | \\|log r\\|>ln2 | tokens | staleness mean / max | mismatch k3 | ratio k3 |")
    lines = [head, "|" + "---|" * 15]
    for (obj, k), r in rows.items():
        mark = "" if r["exact"] else "~"
        q = " | ".join(f"{mark}{r[lab]:.4f}" for _, lab in QS)
        lines.append(f"| {obj} | {k} | {r['seeds']} x {r['steps']} | {r['reward']:.3f} ± {r['reward_std']:.3f} | {q} | "
                     f"{r['min']:.4f} | {r['max']:.3f} | {r['tail_frac']:.2e} | {r['tokens']} | "
                     f"{r['stale_mean']:.2f} / {r['stale_max']:.0f} | {r['mismatch/k3']:.2e} | {r['ratio/k3']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/async_study", help="the study's directory (tools/staleness_study.py)")
    ap.add_argument("--steps", type=int, default=30, help="use each run's first N steps; runs with fewer are left "
                    "out (the study's default: 30)")
    ap.add_argument("--final-window", type=int, default=6)
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    cells: Dict[tuple, List[dict]] = {}
    for run_dir in sorted(glob.glob(os.path.join(args.out, "runs", "*"))):
        m = NAME.match(os.path.basename(run_dir))
        run = load_run(run_dir, args.steps) if m else None
        if run is None or run["steps"] < args.steps:
            print(f"skipped (missing or incomplete): {run_dir}", file=sys.stderr)
            continue
        cells.setdefault((m["obj"], int(m["k"])), []).append(run)
    if not cells:
        raise SystemExit(f"no complete runs under {args.out}/runs")
    order = {"token_alp": 0, "token_mis": 1, "bypass": 2}
    rows = {key: cell(runs, args.final_window)
            for key, runs in sorted(cells.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9), kv[0][0]))}
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
