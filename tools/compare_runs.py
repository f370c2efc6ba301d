"""Compare RL runs from their TensorBoard event files: a summary table and the papers' plots.

    python tools/compare_runs.py --run "Seq-ALP=runs/seq_alp_s*" --run "Seq-Bypass=runs/seq_bypass_s*" \
        --out docs/results --prefix alp_

Each ``--run LABEL=PATH`` (PATH: a run directory, its ``tensorboard/`` folder, an event file, or a
glob of any of these) may match several runs: every directory holding ``events.out.tfevents*``
files is one run, and the runs of one label are its seeds (grouped: mean over seeds, min/max band).
A bare PATH is labelled with its own name.

Writes ``<prefix>summary.md`` and ``<prefix>summary.csv`` (one row per run and one per label),
``<prefix>eval.md`` / ``<prefix>eval.csv`` when the runs logged benchmark evaluations (eval.*: each
benchmark's avg@n at the last evaluated step and their average, the papers' table shape), and
the PNG plots ``<prefix>ratio_envelope.png`` (token ratio pi/mu, p0.1 to p99.9 shaded, per step),
``<prefix>kl_k3.png`` (mismatch/k3), ``<prefix>ratio_max.png`` and ``<prefix>reward.png``.

Columns (over the logged steps of a run; a label's value is the mean over its seeds):
final reward = mean of rollout/reward_mean over the last ``--final-window`` steps; mean reward =
over all steps; ratio p99.9 peak / ratio max peak = max over steps of ratio/token_p99.9 /
ratio/token_max; ratio p99.9 mean = its mean over steps; ratio p0.1 low / mean = min / mean over
steps of ratio/token_p0.1; seq ratio p99.9 peak = max over steps of ratio/seq_p99.9 (sequence ratio
prod_t pi/mu); KL k3 peak / mean = max / mean of mismatch/k3; KL k3 spikes = number of steps with
mismatch/k3 above ``--kl-spike`` (default 3e-3); clip low/high/dual and masked = mean over steps of
ratio/clip_*_frac and of ratio/dppo_masked_frac or ratio/is_masked_frac; step s = mean perf/step_seconds.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger("compare_runs")

Series = Dict[int, float]  # step -> value

# (column, metric tag(s), reduction over steps)
COLUMNS: List[Tuple[str, Tuple[str, ...], str]] = [
    ("final reward", ("rollout/reward_mean",), "final"),
    ("mean reward", ("rollout/reward_mean",), "mean"),
    ("ratio p99.9 peak", ("ratio/token_p99.9",), "max"),
    ("ratio p99.9 mean", ("ratio/token_p99.9",), "mean"),
    ("ratio max peak", ("ratio/token_max",), "max"),
    ("ratio p0.1 low", ("ratio/token_p0.1",), "min"),
    ("ratio p0.1 mean", ("ratio/token_p0.1",), "mean"),
    ("seq ratio p99.9 peak", ("ratio/seq_p99.9",), "max"),
    ("loss ratio p99.9 mean", ("ratio/loss_p99.9",), "mean"),
    ("loss ratio p0.1 mean", ("ratio/loss_p0.1",), "mean"),
    ("k3 pi vs mu first update mean", ("ratio/k3_first_update",), "mean"),
    ("k3 pi vs mu step mean", ("ratio/k3",), "mean"),
    ("KL k3 peak", ("mismatch/k3",), "max"),
    ("KL k3 mean", ("mismatch/k3",), "mean"),
    ("KL k3 spikes", ("mismatch/k3",), "spikes"),
    ("clip low", ("ratio/clip_low_frac",), "mean"),
    ("clip high", ("ratio/clip_high_frac",), "mean"),
    ("clip dual", ("ratio/clip_dual_frac",), "mean"),
    ("masked", ("ratio/dppo_masked_frac", "ratio/is_masked_frac"), "mean"),
    ("step s", ("perf/step_seconds",), "mean"),
]


@dataclass
class Run:
    label: str
    path: str
    scalars: Dict[str, Series] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return max((len(s) for s in self.scalars.values()), default=0)


def event_dirs(path: str) -> List[str]:
    """Every directory under ``path`` (or ``path``'s own directory for a file) that holds event files."""
    if os.path.isfile(path):
        return [os.path.dirname(os.path.abspath(path))]
    found = []
    for root, _dirs, files in os.walk(path):
        if any(f.startswith("events.out.tfevents") for f in files):
            found.append(root)
    return sorted(found)


def read_scalars(event_dir: str) -> Dict[str, Series]:
    """All scalar series of one event directory (the last value wins for a repeated step)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(event_dir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 1, ea.TENSORS: 1,
                                                         ea.IMAGES: 1, ea.AUDIO: 1, ea.COMPRESSED_HISTOGRAMS: 1})
    acc.Reload()
    out: Dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
    return out


def load_runs(specs: Sequence[str]) -> Dict[str, List[Run]]:
    """``LABEL=PATH_OR_GLOB`` specs -> runs grouped by label (insertion order kept)."""
    groups: Dict[str, List[Run]] = {}
    for spec in specs:
        label, _, pattern = spec.partition("=") if "=" in spec else ("", "", spec)
        paths = sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]
        dirs = [d for p in paths for d in event_dirs(p)]
        if not dirs:
            raise SystemExit(f"no TensorBoard event files under {pattern!r}")
        label = label or os.path.basename(os.path.normpath(pattern))
        for d in dirs:
            groups.setdefault(label, []).append(Run(label, d, read_scalars(d)))
    return groups


def _series(run: Run, tags: Tuple[str, ...]) -> Optional[Series]:
    for t in tags:
        if run.scalars.get(t):
            return run.scalars[t]
    return None


def reduce_series(s: Optional[Series], how: str, final_window: int, spike: float = 3e-3) -> float:
    if not s:
        return math.nan
    vals = np.array([s[k] for k in sorted(s)], dtype=np.float64)
    finite = vals[np.isfinite(vals)]
    if how == "spikes":
        return float((finite > spike).sum())
    if how == "final":
        tail = vals[-final_window:]
        tail = tail[np.isfinite(tail)]
        return float(tail.mean()) if tail.size else math.nan
    if not finite.size:
        return math.nan
    return float({"mean": np.mean, "max": np.max, "min": np.min}[how](finite))


def summarize(groups: Dict[str, List[Run]], final_window: int = 5, kl_spike: float = 3e-3) -> List[dict]:
    """Rows: one per run (kind 'run'), then one per label (kind 'group', mean over its runs)."""
    rows = []
    for label, runs in groups.items():
        per_run = []
        for r in runs:
            row = {"kind": "run", "label": label, "run": r.path, "n": 1, "steps": r.steps}
            for col, tags, how in COLUMNS:
                row[col] = reduce_series(_series(r, tags), how, final_window, kl_spike)
            per_run.append(row)
        rows.extend(per_run)
        g = {"kind": "group", "label": label, "run": "", "n": len(runs),
             "steps": min(r["steps"] for r in per_run)}
        for col, _tags, _how in COLUMNS:
            vals = np.array([r[col] for r in per_run], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            g[col] = float(vals.mean()) if vals.size else math.nan
            g[col + " min"] = float(vals.min()) if vals.size else math.nan
            g[col + " max"] = float(vals.max()) if vals.size else math.nan
        rows.append(g)
    return rows


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.4g}"


def write_csv(rows: List[dict], path: str) -> None:
    keys = ["kind", "label", "run", "n", "steps"] + [c for c, _, _ in COLUMNS]
    extra = [f"{c} {b}" for c, _, _ in COLUMNS for b in ("min", "max")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def markdown_table(rows: List[dict]) -> str:
    """Per-label table: ``mean`` or, with several seeds, ``mean [min, max]``."""
    cols = [c for c, _, _ in COLUMNS]
    lines = ["| run | seeds | steps | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for g in (r for r in rows if r["kind"] == "group"):
        cells = []
        for c in cols:
            cell = _fmt(g[c])
            if g["n"] > 1 and math.isfinite(g[c]):
                cell += f" [{_fmt(g[c + ' min'])}, {_fmt(g[c + ' max'])}]"
            cells.append(cell)
        lines.append(f"| {g['label']} | {g['n']} | {g['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Benchmark evaluation (eval/<benchmark>/avg@n, written by eval.interval / eval.final)


def eval_tags(groups: Dict[str, List[Run]]) -> List[str]:
    """The ``eval/<benchmark>/avg@n`` tags present in any run, sorted by benchmark."""
    return sorted({t for runs in groups.values() for r in runs for t in r.scalars
                   if t.startswith("eval/") and "/avg@" in t})


def eval_rows(groups: Dict[str, List[Run]]) -> List[dict]:
    """One row per label: each benchmark's avg@n at the run's last evaluated step (mean over seeds),
    and their average over benchmarks, in percent: the shape of the papers' tables."""
    tags = eval_tags(groups)
    rows = []
    for label, runs in groups.items():
        row = {"label": label, "n": len(runs)}
        for tag in tags:
            finals = [r.scalars[tag][max(r.scalars[tag])] for r in runs if r.scalars.get(tag)]
            row[tag] = 100 * float(np.mean(finals)) if finals else math.nan
            row[tag + " step"] = min((max(r.scalars[tag]) for r in runs if r.scalars.get(tag)), default=-1)
        vals = [row[t] for t in tags if math.isfinite(row[t])]
        row["average"] = float(np.mean(vals)) if len(vals) == len(tags) and vals else math.nan
        rows.append(row)
    return rows


def eval_markdown(rows: List[dict], tags: List[str]) -> str:
    names = [t.split("/")[1] + " " + t.split("/")[2] for t in tags]
    lines = ["| run | seeds | " + " | ".join(names) + " | average |", "|---" * (len(tags) + 3) + "|"]
    for r in rows:
        cells = [f"{r[t]:.2f}" if math.isfinite(r[t]) else "-" for t in tags]
        avg = f"{r['average']:.2f}" if math.isfinite(r["average"]) else "-"
        lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def write_eval(groups: Dict[str, List[Run]], out: str, prefix: str = "") -> Optional[str]:
    """``<prefix>eval.md`` / ``<prefix>eval.csv`` when the runs logged benchmark evaluations."""
    tags = eval_tags(groups)
    if not tags:
        return None
    rows = eval_rows(groups)
    table = eval_markdown(rows, tags)
    with open(os.path.join(out, f"{prefix}eval.md"), "w") as f:
        f.write("Benchmark accuracy (avg@n, percent) at each run's last evaluation; mean over seeds.\n\n" + table)
    with open(os.path.join(out, f"{prefix}eval.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["label", "n", *tags, "average"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return table


# ---------------------------------------------------------------------------------------------
# Plots


def seed_band(runs: List[Run], tag: str, smooth: int = 1) -> Optional[Tuple[np.ndarray, ...]]:
    """(steps, mean, min, max) over the runs' values of ``tag`` on the union of their steps."""
    series = [r.scalars[tag] for r in runs if r.scalars.get(tag)]
    if not series:
        return None
    steps = np.array(sorted(set().union(*[s.keys() for s in series])))
    mat = np.full((len(series), len(steps)), np.nan)
    for i, s in enumerate(series):
        for j, st in enumerate(steps):
            mat[i, j] = s.get(int(st), np.nan)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        mat = np.stack([_moving_average(row, kernel) for row in mat])
    with warnings.catch_warnings():  # all-NaN columns (a step only some seeds logged) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(mat, 0), np.nanmin(mat, 0), np.nanmax(mat, 0)


def _moving_average(row: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    filled = np.where(np.isfinite(row), row, np.nanmean(row) if np.isfinite(row).any() else 0.0)
    pad = len(kernel) // 2
    padded = np.pad(filled, (pad, len(kernel) - 1 - pad), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _figure(n_panels: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n_panels, 4)
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 if cols == 1 else 3.0 * cols, 3.6 * rows), dpi=90,
                             sharey=True, squeeze=False)
    return plt, fig, list(axes.flat)


def _finish(plt, fig, axes, path: str, title: str, ylabel: str, log: bool) -> str:
    for ax in axes:
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from PIL import Image  # a matplotlib dependency

    # 128-colour palette: a third of the bytes of the RGBA file, same look (line plots, flat shading)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path


def _colors():
    import matplotlib.pyplot as plt

    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_lines(groups: Dict[str, List[Run]], tag: str, path: str, title: str, log: bool,
               smooth: int = 1) -> Optional[str]:
    """One line per label (mean over its seeds) with the seeds' min-max band."""
    bands = {label: seed_band(runs, tag, smooth) for label, runs in groups.items()}
    if all(b is None for b in bands.values()):
        return None
    plt, fig, (ax,) = _figure()
    colors = _colors()
    for i, (label, band) in enumerate(bands.items()):
        if band is None:
            continue
        steps, mean, lo, hi = band
        n = len(groups[label])
        color = colors[i % len(colors)]
        if n > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.plot(steps, mean, color=color, linewidth=1.3,
                label=label + (f" ({n} seeds: mean, min-max)" if n > 1 else ""))
    return _finish(plt, fig, [ax], path, title, tag, log)


def plot_envelope(groups: Dict[str, List[Run]], path: str, smooth: int = 1) -> Optional[str]:
    """The papers' ratio envelope: token ratio p0.1 to p99.9 per step (mean over seeds), shaded, one
    panel per label on a shared axis; the dotted line is the largest seed's p99.9."""
    data = {}
    for label, runs in groups.items():
        lo, hi = seed_band(runs, "ratio/token_p0.1", smooth), seed_band(runs, "ratio/token_p99.9", smooth)
        if lo is not None and hi is not None:
            data[label] = (lo, hi, len(runs))
    if not data:
        return None
    plt, fig, axes = _figure(len(data))
    colors = _colors()
    # strict=False: the grid may have more axes than panels (its last row is filled up)
    for i, (ax, (label, (lo, hi, n))) in enumerate(zip(axes, data.items(), strict=False)):
        color = colors[i % len(colors)]
        ax.fill_between(hi[0], lo[1], hi[1], color=color, alpha=0.3, linewidth=0)
        ax.plot(hi[0], hi[1], color=color, linewidth=1.0)
        ax.plot(lo[0], lo[1], color=color, linewidth=1.0)
        if n > 1:
            ax.plot(hi[0], hi[3], color=color, linewidth=0.8, linestyle=":")
            ax.plot(lo[0], lo[2], color=color, linewidth=0.8, linestyle=":")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_title(label + (f" ({n} seeds)" if n > 1 else ""), fontsize=9)
    for ax in axes[len(data):]:
        ax.set_visible(False)
    return _finish(plt, fig, axes[:len(data)], path,
                   "token ratio pi/mu per step: p0.1 to p99.9 (seed mean; dotted: seed extremes)", "ratio", True)


def plot_all(groups: Dict[str, List[Run]], out: str, prefix: str = "", smooth: int = 1) -> List[str]:
    def p(name: str) -> str:
        return os.path.join(out, f"{prefix}{name}.png")

    made = [
        plot_envelope(groups, p("ratio_envelope"), smooth),
        plot_lines(groups, "mismatch/k3", p("kl_k3"), "training-inference mismatch KL (k3, pi_old vs mu) per step",
                   True, smooth),
        plot_lines(groups, "ratio/token_max", p("ratio_max"), "largest token ratio pi/mu per step", True, smooth),
        plot_lines(groups, "rollout/reward_mean", p("reward"), "mean reward per rollout", False, smooth),
    ]
    return [m for m in made if m]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="run paths or globs (label = the path's name)")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=PATH_OR_GLOB",
                    help="a labelled run or group of seeds (repeatable)")
    ap.add_argument("--out", required=True, help="directory for the table and plots")
    ap.add_argument("--prefix", default="", help="prefix of the output file names")
    ap.add_argument("--final-window", type=int, default=5, help="steps averaged for 'final reward'")
    ap.add_argument("--kl-spike", type=float, default=3e-3, help="mismatch/k3 above this counts as a spike")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window of the plots (steps)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its directory watcher chats at INFO
    specs = list(args.run) + list(args.paths)
    if not specs:
        ap.error("give at least one run (--run LABEL=PATH or a PATH)")
    groups = load_runs(specs)
    os.makedirs(args.out, exist_ok=True)
    rows = summarize(groups, args.final_window, args.kl_spike)
    write_csv(rows, os.path.join(args.out, f"{args.prefix}summary.csv"))
    table = markdown_table(rows)
    with open(os.path.join(args.out, f"{args.prefix}summary.md"), "w") as f:
        f.write(table)
    print(table)
    evals = write_eval(groups, args.out, args.prefix)
    if evals:
        print(evals)
    if not args.no_plots:
        for path in plot_all(groups, args.out, args.prefix, args.smooth):
            logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
