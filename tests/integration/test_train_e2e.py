"""End-to-end RL runs on CPU: the trainer (torchrun for 2 processes) + local rollout engine + disk bus + TensorBoard.

Each run is 1-3 steps of the tiny copy task. Checked per run: rewards and metrics reach
TensorBoard, the bus version advanced to the number of steps, sigma moved when learnable. Plus:
a run stopped after 1 step and resumed reproduces the uninterrupted run's 2 later steps.
Single-process runs start ``python -m megatron_alp.train`` directly (as a SLURM or a user's
one-process run does): torchrun's agent would add a Python+torch start-up to each of them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_alp.config.loader import CONFIG_ROOT

REPO = os.path.dirname(str(CONFIG_ROOT))
CONFIG = str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml")
pytestmark = pytest.mark.slow  # torchrun trainer runs (make test still runs them)


PROMPTS_PER_STEP = 8


def _overrides(assets, out, name, *overrides, steps=3):
    """The config overrides (after ``--config CONFIG``) of a :func:`_train` run."""
    return [f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}",
            f"rollout.data.path={assets['data']}", f"run.output_root={out}", f"run.name={name}",
            f"bus.dir={os.path.join(out, name, 'bus')}", f"run.steps={steps}",
            f"run.prompts_per_step={PROMPTS_PER_STEP}", "run.micro_batch_size=4", "run.mini_batches_per_step=2",
            "run.max_tokens_per_micro_batch=0", *overrides]


def _train(assets, out, name, nproc, *overrides, steps=3):
    head = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*head, "-m", "megatron_alp.train", "--config", CONFIG,
           *_overrides(assets, out, name, *overrides, steps=steps)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return os.path.join(out, name)


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scal = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    return scal, set(acc.Tags()["histograms"])


def _common_checks(run_dir, steps, mismatch=True):
    from megatron_alp.trainer.tb_layout import missing_series, read_layout

    scal, hists = _scalars(run_dir)
    for key in ("rollout/reward_mean", "train/loss", "ratio/token_p99.9", "ratio/token_p0.1", "ratio/k3",
                "train/entropy", "perf/step_seconds", "bus/publish_s", "train/grad_norm",
                *(("mismatch/k3",) if mismatch else ())):
        assert key in scal and len(scal[key]) == steps, key
    assert mismatch == any(k.startswith("mismatch/") for k in scal)  # logging.mismatch_metrics
    # The custom-scalars layout is in the event files and every series it names was logged.
    layout = read_layout(os.path.join(run_dir, "tensorboard"))
    assert layout is not None and [c.title for c in layout.category][:2] == ["ratio tails", "KL and mismatch"]
    charts = [ch.title for c in layout.category for ch in c.chart]
    assert "1 token ratio pi/mu: p0.1 / p50 / p99.9" in charts and "1 token ratio pi/mu: min / p50 / max" in charts
    assert missing_series(layout, scal) == []
    assert "ratio/log_ratio_token_hist" in hists
    assert scal["train/bus_version"][-1] == steps
    versions = sorted(os.listdir(os.path.join(run_dir, "bus")))
    assert versions[-1] == f"v{steps:08d}"
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    return scal, hists


def test_token_alp_tp2(assets, tmp_path):
    # also: benchmark evaluation between steps (eval.at_start from the demo config, every 2 steps, final)
    run = _train(assets, str(tmp_path), "alp_tp2", 2, "parallel.tp=2",
                 f"eval.datasets=[copy_heldout={assets['heldout']}]", "eval.interval=2", "eval.max_problems=16")
    scal, hists = _common_checks(run, 3)
    assert "alp/sigma_hist" in hists
    from megatron_alp.trainer.tb_layout import read_layout

    layout = {ch.title for c in read_layout(os.path.join(run, "tensorboard")).category for ch in c.chart}
    assert {"2 ALP sigma per layer", "4 k3: mismatch (step start) vs first update vs whole step"} <= layout
    assert abs(scal["alp/sigma_mean"][-1] - 0.02) > 1e-4, "sigma did not move"
    assert all(0 < r <= 1 for r in scal["rollout/reward_mean"])
    steps = _steps(run, "eval/copy_heldout/avg@4")
    assert steps == [0, 2, 3], steps  # the start, eval.interval, the final evaluation
    for avg, p4 in zip(scal["eval/copy_heldout/avg@4"], scal["eval/copy_heldout/pass@4"], strict=True):
        assert 0 <= avg <= p4 <= 1
    for s in steps:
        assert os.path.isfile(os.path.join(run, "eval", f"step_{s:06d}", "results.csv"))


def _steps(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_drpo_pp2_alp_off(assets, tmp_path):
    # Also the KL penalty against the frozen reference model and the entropy bonus (no preset uses
    # them: here they run through the loop, the reference's forward split over two stages).
    run = _train(assets, str(tmp_path), "drpo_pp2", 2, "parallel.tp=1", "parallel.pp=2", "alp.enabled=false",
                 "algorithm.objective=drpo", "algorithm.delta=12.5", "logging.mismatch_metrics=false",
                 "algorithm.kl_coef=0.05", "algorithm.entropy_coef=0.001", steps=2)
    scal, _ = _common_checks(run, 2, mismatch=False)
    assert "drpo/w_mean" in scal and "alp/sigma_mean" not in scal


def test_mis_dp2(assets, tmp_path):
    run = _train(assets, str(tmp_path), "mis_dp2", 2, "parallel.tp=1", "alp.enabled=false",
                 "algorithm.objective=mis_token", "algorithm.is_high=2.0", "algorithm.dual_clip=3.0",
                 "algorithm.recompute_old_logp=true", steps=2)
    scal, _ = _common_checks(run, 2)
    assert "ratio/is_masked_frac" in scal
    # pi_old was recomputed: the mismatch metrics compare it with the FP8 rollout.
    assert scal["mismatch/k3"][0] > 0


def test_packed_alp_dp2(assets, tmp_path):
    """Packing with DP=2 (rows balanced by tokens) and ALP on, through the whole loop."""
    run = _train(assets, str(tmp_path), "packed_dp2", 2, "parallel.tp=1", "run.max_tokens_per_micro_batch=48",
                 steps=2)
    scal, hists = _common_checks(run, 2)
    assert "alp/sigma_hist" in hists and all(0 < r <= 1 for r in scal["rollout/reward_mean"])


def _timing(key: str) -> bool:
    """Wall-clock measurements: the only scalars a resumed run may not reproduce."""
    return key.startswith("perf/") or key.endswith(("_s", "_per_s", "GBps"))


def _assert_same_scalars(full, part, resumed_at: int):
    """Every logged scalar of the resumed run's later steps (staleness, versions included) equals
    the uninterrupted run's; only wall-clock timings may differ."""
    a, _ = _scalars(full)
    b, _ = _scalars(part)
    compared = sorted(k for k in a if not _timing(k))
    assert sorted(k for k in b if not _timing(k)) == compared
    assert {"rollout/staleness_max", "rollout/staleness_mean", "train/bus_version", "alp/sigma_mean"} <= set(compared)
    for key in compared:
        assert a[key][resumed_at:] == pytest.approx(b[key][-(len(a[key]) - resumed_at):], rel=1e-6, abs=1e-9), key
