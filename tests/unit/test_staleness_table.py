"""tools/staleness_table.py: pooled quantiles follow the monitor's rule (torch.quantile, linear), and
a cell pools every token of every step of every seed."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

import staleness_table as st  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_quantiles_match_torch_and_the_monitor(n):
    from megatron_alp.algo.dist_stats import sorted_quantiles

    vals = np.sort(np.random.default_rng(n).normal(size=n))
    qs = [0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0]
    ref = torch.quantile(torch.tensor(vals), torch.tensor(qs, dtype=torch.float64)).tolist()
    ours = st.quantiles(vals, qs)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert ours == pytest.approx(sorted_quantiles(torch.tensor(vals), qs).tolist(), rel=1e-12, abs=1e-12)


def _run(tmp_path, name, logr_by_step, stale, reward):
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    with open(d / "hist_samples.jsonl", "w") as f:
        for s, vals in enumerate(logr_by_step):
            f.write(json.dumps({"step": s, "ratio/log_ratio_token_hist": vals,
                                "rollout/staleness_hist": stale[s]}) + "\n")
    scal = {"rollout/reward_mean": dict(enumerate(reward)),
            "train/tokens": {s: len(v) for s, v in enumerate(logr_by_step)},
            "mismatch/k3": dict.fromkeys(range(len(reward)), 0.01), "ratio/k3": dict.fromkeys(range(len(reward)), 0.02)}
    return {"scalars": scal, "samples": st.read_samples(str(d / "hist_samples.jsonl"), None), "steps": len(reward)}


def test_cell_pools_tokens_of_all_steps_and_seeds(tmp_path):
    a = _run(tmp_path, "x_k2_s1", [[0.0, 0.5], [-1.0]], [[0, 1], [2]], [0.1, 0.2, 0.3])
    b = _run(tmp_path, "x_k2_s2", [[2.0, 0.25, -0.25]], [[1, 1, 1]], [0.5, 0.5, 0.6])
    row = st.cell([a, b], final_window=2)
    pooled = np.sort(np.array([0.0, 0.5, -1.0, 2.0, 0.25, -0.25]))
    assert row["tokens"] == 6 and row["exact"]
    assert row["p99"] == pytest.approx(math.exp(st.quantiles(pooled, [0.99])[0]))
    assert row["max"] == pytest.approx(math.exp(2.0)) and row["min"] == pytest.approx(math.exp(-1.0))
    assert row["tail_frac"] == pytest.approx(2 / 6)  # |log r| > ln 2: -1.0 and 2.0
    assert row["reward"] == pytest.approx(np.mean([0.25, 0.55]))
    assert row["reward_std"] == pytest.approx(np.std([0.25, 0.55], ddof=1))
    assert (row["stale_mean"], row["stale_max"]) == (pytest.approx(6 / 6), 2.0)
    a["scalars"]["train/tokens"][0] = 5  # the step had more tokens than its line: subsampled, marked
    assert not st.cell([a], final_window=2)["exact"]
