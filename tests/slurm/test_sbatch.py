"""`sbatch slurm/train_tiny_cpu.sh` on a real one-node SLURM (conftest.py / cluster.py).

The job goes through the same launcher as the GPU scripts: the supervisor checks the config,
starts the local rollout engine as an srun step, waits for /health, starts torchrun as a second
srun step attached to the engine's URL with the job's API key, and stops everything by step id.
Checked: SIGTERM to the batch shell (what ``#SBATCH --signal=B:TERM@60`` sends) checkpoints and
the next job resumes on the same weights and runs to completion (exit code, TensorBoard event
files, bus versions: one pair of jobs serves both tests); a failing engine (at start or mid-run)
and a bad override end the job fast with the reason in its output. The jobs train on the session's
tiny assets (tests/conftest.py), handed to the script as its ALP_TINY_ASSETS folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from megatron_alp.config.loader import CONFIG_ROOT

REPO = str(CONFIG_ROOT.parent)
SCRIPT = "slurm/train_tiny_cpu.sh"
RUN = "tiny_cpu_slurm"
pytestmark = pytest.mark.slow


def _env(job_root: Path) -> dict:
    """test_scale.py's jobs (make test-slurm): the first job makes its own assets, without warm start."""
    return {"ALP_TINY_ASSETS": str(job_root / "assets"), "ALP_TINY_WARM_STEPS": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def job_env(slurm, tiny_assets) -> dict:
    """The script's environment: the session's tiny assets as its asset folder (marked done, so no
    job makes its own). Requested after ``slurm``: without SLURM the tests skip before building them."""
    folder = Path(tiny_assets["mcore"]).parent
    assert {Path(tiny_assets[k]).parent for k in ("hf", "data")} == {folder}
    assert Path(tiny_assets["hf"]).name == "hf_warm" and Path(tiny_assets["data"]).name == "copy_train.jsonl"
    (folder / "mcore" / ".done").touch()  # the script's "assets are complete" marker
    return {"ALP_TINY_ASSETS": str(folder), "OMP_NUM_THREADS": "1"}


def _run_args(out: Path, *extra: str) -> list:
    return [f"run.output_root={out}", f"bus.dir={out / 'bus'}", *extra]


def _bus_versions(out: Path) -> list:
    return sorted(int(p.name[1:]) for p in (out / "bus").glob("v[0-9]*"))


def _latest_step(out: Path) -> int:
    ckpt = out / RUN / "checkpoints"
    with open(ckpt / (ckpt / "latest").read_text().strip() / "meta.json") as f:
        return int(json.load(f)["step"])


def _scalars(out: Path, tag: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / RUN / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def preempted_then_resumed(slurm, job_root, job_env):
    """A job SIGTERMed after its second step, then the same script resumed to two more steps."""
    out = job_root / "preempted"
    job = slurm.submit(SCRIPT, _run_args(out, "run.steps=100000", "checkpoint.save_interval=0"), cwd=REPO,
                       env=job_env)
    deadline = time.monotonic() + 240
    while max(_bus_versions(out) or [-1]) < 2:  # GC removes old versions within seconds
        assert time.monotonic() < deadline and slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.output(job)
        time.sleep(0.5)
    slurm.signal_batch(job, "TERM")
    first = slurm.wait(job, timeout_s=120)
    assert first.exit_code == 143, first.output
    step = _latest_step(out)
    second = slurm.wait(slurm.submit(SCRIPT, _run_args(out, f"run.steps={step + 2}"), cwd=REPO, env=job_env))
    return out, first, step, second


def test_tiny_job_trains_end_to_end(preempted_then_resumed):
    out, first, step, job = preempted_then_resumed  # the resumed job runs to its last step
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job.output
    assert list((out / RUN / "tensorboard").glob("events.out.tfevents.*")), job.output
    assert max(_bus_versions(out)) == step + 2 > 0
    assert "engines healthy" in job.output and "trainer finished (exit 0)" in job.output
    # The engine was attached through the job file (mode 0600); its key never reached the output.
    keys = []
    for j in (first, job):
        job_yaml = out / RUN / f"slurm-{j.job_id}" / "job.yaml"
        assert oct(job_yaml.stat().st_mode & 0o777) == "0o600"
        text = job_yaml.read_text()
        keys.append(text.split("api_key:", 1)[1].split()[0])
        assert "urls:" in text and len(keys[-1]) > 20 and keys[-1] not in j.output
    assert keys[0] != keys[1]  # a key per job


def test_sigterm_checkpoints_and_the_next_job_resumes(preempted_then_resumed):
    out, first, step, second = preempted_then_resumed
    assert first.exit_code == 143, first.output
    assert "forwarding SIGTERM to the trainer" in first.output
    assert "preemption: SIGTERM to the trainer processes" in first.output
    assert re.search(r"stopped by signal \d+ (after|before) step", first.output)  # between steps or mid-rollout
    assert "trainer stopped after SIGTERM (exit 143)" in first.output  # torchrun was spared the signal
    assert re.search(r"the trainer stopped after SIGTERM \(torchrun exit [01]\)", first.output)
    assert step >= 2

    assert (second.state, second.exit_code) == ("COMPLETED", 0), second.output
    assert f"engines start on bus version {step}" in second.output
    assert "resumed from" in second.output
    assert max(_bus_versions(out)) == step + 2
    # The engine started on the resumed weights: the first resumed rollout is on-policy.
    assert _scalars(out, "rollout/staleness_mean")[step] == 0.0


def test_failing_engine_ends_the_job_fast(slurm, job_root, job_env, tmp_path):
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")  # passes the path check, fails in the engine at load
    out = job_root / "bad_engine"
    t0 = time.monotonic()
    job = slurm.wait(slurm.submit(SCRIPT, _run_args(out, f"rollout.model_path={bad}"), cwd=REPO,
                                  env=job_env), timeout_s=180)
    assert (job.state, job.exit_code) == ("FAILED", 1), job.output
    assert "JOB FAILED: the engines step exited with code 1 before becoming healthy" in job.output
    assert "Unrecognized model" in job.output  # the engine's own error, from its log tail
    assert "starting trainer" not in job.output
    assert time.monotonic() - t0 < 120


def test_bad_override_is_refused_before_any_step(slurm, job_root, job_env):
    out = job_root / "bad_override"
    job = slurm.wait(slurm.submit(SCRIPT, _run_args(out, "algorithm.objective=nope"), cwd=REPO,
                                  env=job_env), timeout_s=120)
    assert (job.state, job.exit_code) == ("FAILED", 2), job.output
    assert "JOB REFUSED before starting anything: algorithm.objective" in job.output
    assert "starting engines" not in job.output and not os.path.exists(out / RUN)


def test_engine_dying_mid_run_stops_the_trainer(slurm, job_root, job_env):
    out = job_root / "engine_dies"
    job = slurm.submit(SCRIPT, _run_args(out, "run.steps=100000"), cwd=REPO, env=job_env)
    deadline = time.monotonic() + 240
    while max(_bus_versions(out) or [-1]) < 1:
        assert time.monotonic() < deadline and slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.output(job)
        time.sleep(0.5)
    pid = int(re.search(r"local-engine-0 started \(pid (\d+)\)", slurm.output(job)).group(1))
    os.kill(pid, signal.SIGKILL)  # the engine server of this job, by the pid its agent reported
    t0 = time.monotonic()
    res = slurm.wait(job, timeout_s=180)
    assert (res.state, res.exit_code) == ("FAILED", 1), res.output
    assert f"local-engine-0 (pid {pid}" in res.output and "JOB FAILED" in res.output
    assert re.search(r"JOB FAILED: the (engines step|trainer) exited with code", res.output)
    assert "stopping the trainer" in res.output or "stopping the engines" in res.output
    assert time.monotonic() - t0 < 90
