"""tools/compare_runs.py on synthetic TensorBoard event files with known values."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cr():
    spec = importlib.util.spec_from_file_location("compare_runs", os.path.join(ROOT, "tools", "compare_runs.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare_runs"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def write_run(run_dir: str, series: dict) -> None:
    """``series``: tag -> list of (step, value); written as the trainer's monitor does."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
    for tag, points in series.items():
        for step, v in points:
            w.add_scalar(tag, v, step)
    w.add_histogram("ratio/log_ratio_token_hist", np.array([0.1, -0.2, 0.3]), 0)  # ignored by the tool
    w.close()


def steps(values):
    return list(enumerate(values))


A1 = {
    "rollout/reward_mean": steps([0.1, 0.2, 0.3, 0.4, 0.6, 0.8]),
    "ratio/token_p99.9": steps([1.5, 3.0, 2.0, 1.2, 1.1, 1.05]),
    "ratio/token_p0.1": steps([0.5, 0.3, 0.6, 0.8, 0.9, 0.95]),
    "ratio/token_max": steps([4.0, 40.0, 9.0, 2.0, 2.0, 1.5]),
    "ratio/seq_p99.9": steps([2.0, 5.0, 3.0, 2.0, 1.5, 1.2]),
    "mismatch/k3": steps([1e-4, 5e-3, 2e-4, 1e-4, 1e-4, 1e-5]),
    "ratio/clip_low_frac": steps([0.1, 0.3, 0.2, 0.0, 0.0, 0.0]),
    "ratio/clip_high_frac": steps([0.01] * 6),
    "ratio/clip_dual_frac": steps([0.0] * 5 + [0.06]),
    "perf/step_seconds": steps([2.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
}
A2 = {
    "rollout/reward_mean": steps([0.2, 0.2, 0.2, 0.2, 0.4, 0.4]),
    "ratio/token_p99.9": steps([1.4, 1.6, 1.8, 5.0, 1.2, 1.1]),
    "ratio/token_p0.1": steps([0.4, 0.5, 0.5, 0.2, 0.7, 0.9]),
    "ratio/token_max": steps([3.0, 3.0, 3.0, 100.0, 3.0, 3.0]),
    "mismatch/k3": steps([2e-4, 2e-4, 3e-4, 1e-2, 2e-4, 2e-4]),
    "ratio/clip_low_frac": steps([0.2] * 6),
    "ratio/clip_high_frac": steps([0.03] * 6),
    "ratio/clip_dual_frac": steps([0.0] * 6),
    "perf/step_seconds": steps([3.0] * 6),
}
# B: a divergence objective (no clip fractions, a masked fraction), one step logged twice (a resume).
B = {
    "rollout/reward_mean": [(0, 0.5), (1, 0.1), (1, 0.7), (2, 0.9)],
    "ratio/token_p99.9": steps([1.1, 1.3, 1.2]),
    "ratio/token_p0.1": steps([0.9, 0.8, 0.85]),
    "ratio/token_max": steps([1.5, 2.5, 2.0]),
    "mismatch/k3": steps([1e-5, 3e-5, 2e-5]),
    "ratio/dppo_masked_frac": steps([0.02, 0.04, 0.06]),
    "perf/step_seconds": steps([0.5, 0.5, 0.5]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_run(str(root / "alg_a_s1"), A1)
    write_run(str(root / "alg_a_s2"), A2)
    write_run(str(root / "alg_b"), B)
    return root


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_table_numbers_match_what_was_written(cr, runs, tmp_path):
    out = tmp_path / "out"
    rc = cr.main(["--run", f"A={runs}/alg_a_s*", "--run", f"B={runs}/alg_b", "--out", str(out),
                  "--prefix", "t_", "--final-window", "2"])
    assert rc == 0
    rows = read_csv(out / "t_summary.csv")
    by = {(r["kind"], r["label"], os.path.basename(os.path.dirname(r["run"])) if r["run"] else ""): r for r in rows}
    a1, a2 = by[("run", "A", "alg_a_s1")], by[("run", "A", "alg_a_s2")]
    ga, gb = by[("group", "A", "")], by[("group", "B", "")]
    def f(row, key):
        return float(row[key])

    # one run
    assert f(a1, "final reward") == pytest.approx(0.7)  # mean of the last 2 steps
    assert f(a1, "mean reward") == pytest.approx(2.4 / 6)
    assert f(a1, "ratio p99.9 peak") == pytest.approx(3.0)
    assert f(a1, "ratio max peak") == pytest.approx(40.0)
    assert f(a1, "ratio p0.1 low") == pytest.approx(0.3)
    assert f(a1, "seq ratio p99.9 peak") == pytest.approx(5.0)
    assert f(a1, "KL k3 peak") == pytest.approx(5e-3)
    assert f(a1, "KL k3 spikes") == 1 and f(a2, "KL k3 spikes") == 1  # steps above --kl-spike 3e-3
    assert f(a1, "ratio p99.9 mean") == pytest.approx(9.85 / 6)
    assert f(a1, "ratio p0.1 mean") == pytest.approx(4.05 / 6)
    assert f(a1, "KL k3 mean") == pytest.approx((1e-4 + 5e-3 + 2e-4 + 1e-4 + 1e-4 + 1e-5) / 6)
    assert f(a1, "clip low") == pytest.approx(0.1)
    assert f(a1, "clip dual") == pytest.approx(0.01)
    assert f(a1, "step s") == pytest.approx(7.0 / 6)
    assert int(a1["steps"]) == 6 and math.isnan(f(a1, "masked"))
    assert math.isnan(f(a2, "seq ratio p99.9 peak"))  # never logged
    # the group of two seeds: mean, min and max over the seeds
    assert int(ga["n"]) == 2
    assert f(ga, "final reward") == pytest.approx((0.7 + 0.4) / 2)
    assert f(ga, "ratio max peak") == pytest.approx(70.0)
    assert (f(ga, "ratio max peak min"), f(ga, "ratio max peak max")) == (pytest.approx(40.0), pytest.approx(100.0))
    assert f(ga, "KL k3 peak") == pytest.approx((5e-3 + 1e-2) / 2)
    assert f(ga, "seq ratio p99.9 peak") == pytest.approx(5.0)  # only the seed that logged it
    # a resumed step: the last value wins
    assert f(gb, "mean reward") == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert f(gb, "masked") == pytest.approx(0.04)
    assert math.isnan(f(gb, "clip low"))
    md = (out / "t_summary.md").read_text()
    assert "| A | 2 | 6 | 0.55 [0.4, 0.7] |" in md
    assert "| B | 1 | 3 | 0.8 |" in md
    for name in ("ratio_envelope", "kl_k3", "ratio_max", "reward"):
        png = out / f"t_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_seed_band_on_the_union_of_steps(cr):
    r1 = cr.Run("x", "r1", {"m": {0: 1.0, 1: 2.0, 2: 3.0}})
    r2 = cr.Run("x", "r2", {"m": {0: 3.0, 2: 5.0, 3: 7.0}})
    st, mean, lo, hi = cr.seed_band([r1, r2], "m")
    assert st.tolist() == [0, 1, 2, 3]
    assert mean.tolist() == [2.0, 2.0, 4.0, 7.0]
    assert lo.tolist() == [1.0, 2.0, 3.0, 7.0] and hi.tolist() == [3.0, 2.0, 5.0, 7.0]
    assert cr.seed_band([r1], "absent") is None


def test_bare_paths_and_missing_runs(cr, runs, tmp_path):
    groups = cr.load_runs([str(runs / "alg_b" / "tensorboard")])
    assert list(groups) == ["tensorboard"] and len(groups["tensorboard"]) == 1
    groups = cr.load_runs([f"all={runs}"])  # a root folder: every event directory under it is a seed
    assert len(groups["all"]) == 3
    with pytest.raises(SystemExit, match="no TensorBoard event files"):
        cr.load_runs([f"x={tmp_path}/nothing_here*"])


def test_eval_table_in_the_papers_shape(cr, tmp_path):
    # two seeds of ALP and one of MIS; avg@4 of two benchmarks at steps 0 and 10 (the last counts)
    for name, vals in (("alp_s1", (0.50, 0.30)), ("alp_s2", (0.40, 0.20)), ("mis_s1", (0.25, 0.10))):
        write_run(str(tmp_path / name), {"eval/math500/avg@4": [(0, 0.1), (10, vals[0])],
                                         "eval/aime2024/avg@4": [(0, 0.0), (10, vals[1])],
                                         "rollout/reward_mean": steps([0.1, 0.2])})
    out = tmp_path / "out"
    assert cr.main(["--run", f"ALP={tmp_path}/alp_s*", "--run", f"MIS={tmp_path}/mis_s1", "--out", str(out),
                    "--no-plots"]) == 0
    rows = {r["label"]: r for r in csv.DictReader(open(out / "eval.csv"))}
    assert float(rows["ALP"]["eval/math500/avg@4"]) == pytest.approx(45.0)  # mean of 50 and 40 percent
    assert float(rows["ALP"]["eval/aime2024/avg@4"]) == pytest.approx(25.0)
    assert float(rows["ALP"]["average"]) == pytest.approx(35.0)
    assert float(rows["MIS"]["average"]) == pytest.approx(17.5)
    md = open(out / "eval.md").read()
    assert "| ALP | 2 | 25.00 | 45.00 | 35.00 |" in md  # columns sorted: aime2024, math500
