"""Step metrics merging and the TensorBoard monitor."""

from __future__ import annotations

import pytest

from megatron_alp.trainer.monitor import TensorBoardMonitor, terminal_line
from megatron_alp.trainer.step_metrics import merge_updates


def test_merge_updates_rules():
    """One rule per metric (reduction_of): counts summed, extremes, samples concatenated, means."""
    ups = [
        {"train/grad_norm": 1.0, "train/loss": 1.0, "train/nonfinite_grad": 0.0, "train/skipped_step": 1.0,
         "train/tokens": 10.0, "ratio/log_ratio_token_hist": [0.1, 0.2], "x/y_max": 2.0, "x/y_min": 0.5},
        {"train/grad_norm": 3.0, "train/loss": 3.0, "train/nonfinite_grad": 1.0, "train/skipped_step": 1.0,
         "train/tokens": 30.0, "ratio/log_ratio_token_hist": [0.3], "x/y_max": 3.0, "x/y_min": 0.7},
    ]
    m = merge_updates(ups)
    assert m["train/loss"] == 2.0 and m["train/grad_norm"] == 2.0
    assert m["train/tokens"] == 40.0 and m["train/nonfinite_grad"] == 1.0 and m["train/skipped_step"] == 2.0
    assert m["ratio/log_ratio_token_hist"] == [0.1, 0.2, 0.3]
    assert m["x/y_max"] == 3.0 and m["x/y_min"] == 0.5


def test_merge_refuses_per_update_quantiles():
    with pytest.raises(ValueError, match="quantile"):
        merge_updates([{"ratio/token_p99.9": 1.0}, {"ratio/token_p99.9": 2.0}])


def test_merge_ignores_non_finite_in_means():
    m = merge_updates([{"train/x": float("nan")}, {"train/x": 4.0}])
    assert m["train/x"] == 4.0


def test_tensorboard_monitor_writes_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = TensorBoardMonitor(str(tmp_path), histograms=True)
    for step in range(3):
        mon.log({"rollout/reward_mean": 0.1 * step, "ratio/log_ratio_hist": [0.0, 0.1 * step, -0.2],
                 "alp/sigma_hist": [0.02, 0.03]}, step)
    mon.text("config", "model: tiny")
    mon.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "rollout/reward_mean" in tags["scalars"]
    assert [e.value for e in acc.Scalars("rollout/reward_mean")] == [0.0, 0.1, 0.2] or \
        [round(e.value, 6) for e in acc.Scalars("rollout/reward_mean")] == [0.0, 0.1, 0.2]
    assert {"ratio/log_ratio_hist", "alp/sigma_hist"} <= set(tags["histograms"])


def test_terminal_line_has_the_key_numbers():
    line = terminal_line({"rollout/reward_mean": 0.5, "mismatch/k3": 1e-3, "ratio/token_p99.9": 1.7,
                          "perf/step_seconds": 2.0}, 12)
    assert "step    12" in line and "reward 0.500" in line and "kl_k3 1.00e-03" in line and "ratio_p99.9 1.700" in line


def test_custom_scalars_layout_is_written_and_names_only_logged_series(tmp_path):
    """The event files hold the custom-scalars layout; every tag and pattern it names was logged."""
    import torch

    from megatron_alp.algo.metrics import compute_metrics
    from megatron_alp.trainer.tb_layout import missing_series, read_layout

    g = torch.Generator().manual_seed(0)
    lmu = -torch.rand(4, 6, generator=g, dtype=torch.float64) - 0.5
    lp = lmu + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    out = compute_metrics(lp, lmu, torch.ones(4, 6), old_logp=lmu, base_logp=lmu,
                          advantages=torch.randn(4, generator=g),
                          objective="bypass_seq", hparams=dict(eps_low=0.5, eps_high=3.0, dual_clip=10.0))
    metrics = {k: (v.tolist() if v.dim() else float(v)) for k, v in out.items()}
    metrics.update({"ratio/k3_first_update": 0.1, "rollout/reward_mean": 0.5, "alp/sigma/decoder.layers.0": 0.02,
                    "alp/sigma/decoder.layers.1": 0.03})
    mon = TensorBoardMonitor(str(tmp_path), histograms=False)
    mon.log({"eval/copy/score": 0.5}, 0, terminal=False)  # an eval at the start comes first
    for step in range(2):
        mon.log(metrics, step)
    mon.close()
    layout = read_layout(str(tmp_path))
    assert [c.title for c in layout.category] == ["ratio tails", "KL and mismatch", "sigma and reward"]
    charts = {ch.title: ch for c in layout.category for ch in c.chart}
    env = charts["1 token ratio pi/mu: p0.1 / p50 / p99.9"].margin.series[0]
    assert (env.value, env.lower, env.upper) == ("ratio/token_p50", "ratio/token_p0.1", "ratio/token_p99.9")
    ext = charts["3 ratio the loss clips: min / p50 / max"].margin.series[0]
    assert (ext.lower, ext.upper) == ("ratio/loss_min", "ratio/loss_max")
    assert len(charts["1 KL mismatch: pi_old vs mu (step start): k1 k2 k3"].multiline.tag) == 3
    assert list(charts["4 k3: mismatch (step start) vs first update vs whole step"].multiline.tag) == [
        r"^mismatch/k3$", r"^ratio/k3_first_update$", r"^ratio/k3$"]
    assert "2 ALP sigma per layer" in charts and "1 reward" in charts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert missing_series(layout, acc.Tags()["scalars"]) == []
    assert missing_series(layout, [t for t in acc.Tags()["scalars"] if t != "ratio/seq_max"]) == ["ratio/seq_max"]


def test_raw_samples_keep_every_histogram_value_per_step(tmp_path):
    """logging.raw_samples: each step's histogram values, unbucketed and finite, one JSON line per step."""
    import json

    import torch

    path = tmp_path / "hist_samples.jsonl"
    mon = TensorBoardMonitor(str(tmp_path / "tb"), histograms=True, samples_path=str(path))
    mon.log({"rollout/reward_mean": 0.5, "ratio/log_ratio_token_hist": [0.125, -0.5, float("nan"), 3.0],
             "rollout/staleness_hist": torch.tensor([0.0, 2.0])}, 0)
    mon.log({"rollout/reward_mean": 0.7}, 1)  # no histogram: no line
    mon.log({"ratio/log_ratio_token_hist": [1.0]}, 2)
    mon.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [{"step": 0, "ratio/log_ratio_token_hist": [0.125, -0.5, 3.0],
                      "rollout/staleness_hist": [0.0, 2.0]},
                     {"step": 2, "ratio/log_ratio_token_hist": [1.0]}]
    mon = TensorBoardMonitor(str(tmp_path / "tb2"), histograms=True)  # off by default: no file
    mon.log({"ratio/log_ratio_token_hist": [1.0]}, 0)
    mon.close()
    assert not (tmp_path / "tb2" / "hist_samples.jsonl").exists() and len(lines) == 2
