"""The job survives what a one-node gloo test does not see (issue 21), on a real one-node SLURM:

- a step-wide SIGTERM (what preemption with GraceTime sends: slurmctld's ``_preempt_signal`` is
  ``job_signal(job, SIGTERM, 0, ...)``, every process of every step but not the batch shell; the same
  as ``scancel --signal=TERM <job>``): torchrun does not kill its workers, the engines keep serving,
  the trainer checkpoints, its step exits 143, and with ALP_REQUEUE=1 (``#SBATCH --requeue``) the job
  requeues itself and its second run resumes from the checkpoint and finishes;
- one of two engines killed mid-run with ``bus.on_engine_failure = drop``: the job finishes on the other;
- FP8 rollout with launcher-started engines: they start on bus version 0, written in block FP8 by a
  step before them, and the trainer commits that version (the first rollout is on version 0);
- a rollout longer than the trainer's process-group timeout (a short ``parallel.pg_timeout_minutes``
  here; the old fixed default was 10 min): the batch is handed over on its own long-timeout group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cluster import _which
from .test_sbatch import REPO, RUN, SCRIPT, _bus_versions, _env, _latest_step, _run_args, _scalars

# A job, a requeue (SLURM holds a requeued job ~2 min) and a resumed job: beyond the suite's 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.scale, pytest.mark.timeout(1800)]


def _wait_for_version(out: Path, version: int, slurm, job: str, timeout_s: float = 900) -> None:
    """Until the bus holds ``version`` or a later one (GC removes old versions within seconds)."""
    deadline = time.monotonic() + timeout_s
    while max(_bus_versions(out) or [-1]) < version:
        assert time.monotonic() < deadline and slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.output(job)
        time.sleep(0.5)


def test_job_wide_sigterm_checkpoints_requeues_and_resumes(slurm, job_root):
    out = job_root / "job_wide_term"
    steps = 12
    env = {**_env(job_root), "ALP_REQUEUE": "1"}
    job = slurm.submit(SCRIPT, _run_args(out, f"run.steps={steps}", "checkpoint.save_interval=0"), cwd=REPO, env=env)
    _wait_for_version(out, 2, slurm, job)
    # What preemption does: every process of every step gets SIGTERM (the batch shell does not).
    subprocess.run([_which("scancel"), "--signal=TERM", job], env=slurm.env(), check=True)
    deadline = time.monotonic() + 600
    while int(slurm.job_info(job).get("Restarts", "0")) < 1:
        assert time.monotonic() < deadline, slurm.output(job)
        time.sleep(1.0)
    res = slurm.wait(job, timeout_s=900)
    text = res.output
    assert (res.state, res.exit_code) == ("COMPLETED", 0), text
    assert re.search(r"the trainer stopped after SIGTERM \(torchrun exit [01]\)", text)  # not killed by torchrun
    assert "trainer stopped after SIGTERM (exit 143)" in text
    assert "SIGTERM: the servers keep serving" in text
    # The signal lands between steps (checkpoint of that step) or during a rollout (abandoned: the
    # checkpoint is of the step before it).
    stop = re.search(r"stopped by signal \d+ (after|before) step (\d+)", text)
    assert stop and "requeue of job" in text, text[-4000:]
    first_stop = int(stop.group(2)) - (1 if stop.group(1) == "before" else 0)
    assert 2 <= first_stop < steps
    assert f"engines start on bus version {first_stop}" in text and "resumed from" in text
    assert _latest_step(out) == steps and max(_bus_versions(out)) == steps


def test_one_of_two_engines_killed_the_job_finishes(slurm, job_root):
    out = job_root / "engine_dropped"
    steps = 8  # each rollout waits 4 s first: the engine is killed well before the last step
    job = slurm.submit(SCRIPT, _run_args(out, f"run.steps={steps}", "rollout.num_engines=2",
                                         "bus.on_engine_failure=drop", "rollout.local.batch_wait_ms=4000"),
                       cwd=REPO, env=_env(job_root))
    _wait_for_version(out, 1, slurm, job)
    pid, url = re.search(r"local-engine-1 started \(pid (\d+)\) for (\S+);", slurm.output(job)).groups()
    pid = int(pid)
    os.kill(pid, signal.SIGKILL)  # one engine server of this job, by the pid its agent reported
    killed_after = max(_bus_versions(out))
    res = slurm.wait(job, timeout_s=400)
    assert killed_after < steps, "the job ended before the engine was killed"
    assert (res.state, res.exit_code) == ("COMPLETED", 0), res.output
    assert f"local-engine-1 (pid {pid}" in res.output and "1 of 2 server(s) still serving" in res.output
    assert re.search(rf"rollout engine {re.escape(url)} (leaves|is dropped from) the fleet", res.output)
    assert res.output.count("1 of 2 server(s) still serving") == 1  # reported once
    assert max(_bus_versions(out)) == steps


def test_rollout_longer_than_the_pg_timeout(slurm, job_root):
    out = job_root / "long_rollout"
    # Every rollout waits 40 s before its first batch; the trainer's collectives time out after 20 s.
    args = _run_args(out, "run.steps=1", "parallel.pg_timeout_minutes=0.34", "rollout.local.batch_wait_ms=40000")
    res = slurm.wait(slurm.submit(SCRIPT, args, cwd=REPO, env=_env(job_root)), timeout_s=400)
    assert (res.state, res.exit_code) == ("COMPLETED", 0), res.output
    assert max(_bus_versions(out)) == 1


def test_fp8_rollout_engines_start_on_version_0(slurm, job_root):
    out = job_root / "fp8_rollout"
    res = slurm.wait(slurm.submit(SCRIPT, _run_args(out, "run.steps=2", "rollout.precision=fp8"), cwd=REPO,
                                  env=_env(job_root)), timeout_s=400)
    assert (res.state, res.exit_code) == ("COMPLETED", 0), res.output
    v0 = out / "bus" / "v00000000"
    assert f"engines start on bus version 0 ({v0})" in res.output  # written by the v0 step before them
    assert "version 0 found published before the engines started (fp8" in res.output  # the trainer commits it
    manifest = json.loads((v0 / "bus-manifest.json").read_text())
    assert manifest["precision"] == "fp8" and manifest["quantization"]["weight_block_size"] == [128, 128]
    engine_log = next((out / RUN / f"slurm-{res.job_id}").glob("engine-*.log")).read_text()
    assert f"--model {v0} " in engine_log
    assert _scalars(out, "rollout/staleness_mean")[0] == 0.0  # the first rollout ran on version 0
    assert max(_bus_versions(out)) == 2
