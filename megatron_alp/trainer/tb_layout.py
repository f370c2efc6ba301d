"""The TensorBoard custom-scalars layout written with every run (the ``custom_scalars`` plugin):
the ratio tails, the KL estimators, the mismatch and ALP's sigma per layer on the first screen.

One margin chart per ratio for the body (``p0.1`` / ``p50`` / ``p99.9``) and one for the extremes
(``min`` / ``p50`` / ``max``); the KL estimators ``k1`` / ``k2`` / ``k3`` of each comparison
together; the mismatch at the start of the step against the trained policy's divergence on the first
update and over the whole step; sigma per layer; the reward. The layout names only series the run
logs: it is built from the first step's metric names (:func:`layout_for`).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List

# (label, metric prefix): the ratios whose tails are charted, in this order.
# TensorBoard orders the charts of a category by title: the numbers keep this order.
RATIOS = (("1 token ratio pi/mu", "ratio/token"), ("2 sequence ratio pi/mu", "ratio/seq"),
          ("3 ratio the loss clips", "ratio/loss"), ("4 DRPO weight", "drpo/w"))
KL_GROUPS = (("1 KL mismatch: pi_old vs mu (step start)", "mismatch"), ("2 KL ratio: pi vs mu (whole step)", "ratio"),
             ("3 KL staleness: pi vs pi_old", "staleness"))


def _exact(name: str) -> str:
    """Multiline charts take regular expressions: match exactly this tag."""
    return "^" + re.escape(name) + "$"


def layout_for(names: Iterable[str]) -> Dict[str, Dict[str, list]]:
    """``{category: {chart: ["Margin" | "Multiline", tags]}}`` for ``SummaryWriter.add_custom_scalars``."""
    have = set(names)
    tails: Dict[str, list] = {}
    for label, p in RATIOS:
        if {f"{p}_p0.1", f"{p}_p50", f"{p}_p99.9"} <= have:
            tails[f"{label}: p0.1 / p50 / p99.9"] = ["Margin", [f"{p}_p50", f"{p}_p0.1", f"{p}_p99.9"]]
        if {f"{p}_min", f"{p}_p50", f"{p}_max"} <= have:
            tails[f"{label}: min / p50 / max"] = ["Margin", [f"{p}_p50", f"{p}_min", f"{p}_max"]]
    kl: Dict[str, list] = {}
    for label, p in KL_GROUPS:
        tags = [f"{p}/{k}" for k in ("k1", "k2", "k3") if f"{p}/{k}" in have]
        if tags:
            kl[f"{label}: k1 k2 k3"] = ["Multiline", [_exact(t) for t in tags]]
    first = [t for t in ("mismatch/k3", "ratio/k3_first_update", "ratio/k3") if t in have]
    if first:
        kl["4 k3: mismatch (step start) vs first update vs whole step"] = ["Multiline", [_exact(t) for t in first]]
    rest: Dict[str, list] = {}
    if any(n.startswith("alp/sigma/") for n in have):
        rest["2 ALP sigma per layer"] = ["Multiline", ["^alp/sigma/"]]
    rewards = [t for t in ("rollout/reward_mean", "rollout/pass_rate") if t in have]
    if rewards:
        rest["1 reward"] = ["Multiline", [_exact(t) for t in rewards]]
    out = {"ratio tails": tails, "KL and mismatch": kl, "sigma and reward": rest}
    return {k: v for k, v in out.items() if v}


def layout_tags(layout: Dict[str, Dict[str, list]]) -> List[str]:
    """Every tag or pattern the layout names (for tests and checks)."""
    return [t for charts in layout.values() for _kind, tags in charts.values() for t in tags]


def read_layout(event_dir: str):
    """The custom-scalars ``Layout`` proto stored in a run's event files (None if there is none)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = ea.EventAccumulator(event_dir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    if "custom_scalars__config__" not in acc.Tags().get("tensors", []):
        return None
    raw = acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    return layout_pb2.Layout.FromString(raw)


def missing_series(layout, scalar_tags: Iterable[str]) -> List[str]:
    """The tags (margin charts) and patterns (multiline charts) of ``layout`` that match no logged scalar."""
    tags = list(scalar_tags)
    missing = []
    for cat in layout.category:
        for chart in cat.chart:
            if chart.HasField("margin"):
                for s in chart.margin.series:
                    missing += [t for t in (s.value, s.lower, s.upper) if t not in tags]
            else:
                missing += [p for p in chart.multiline.tag if not any(re.match(p, t) for t in tags)]
    return missing
