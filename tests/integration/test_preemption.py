"""Preemption and faults on a real CPU run (trainer + local engine): nothing trained is lost.

- SIGTERM during a rollout: the step is abandoned, the completed steps are checkpointed, then the
  engines stop, then the trainer exits 143; the same command resumes from that checkpoint.
- an engine SIGKILLed mid-run with no replacement (2 workers under torchrun): checkpoint, then
  one line naming the engine.
- kill -9 of torchrun: no worker and no engine is left behind.

The runs use a reward (tests/integration/fault_rewards.py) that marks when step 2's rollout is in
progress, so each fault lands there; the test acts on the marker, never on a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_alp.config.loader import CONFIG_ROOT

pytestmark = pytest.mark.slow

REPO = os.path.dirname(str(CONFIG_ROOT))
CONFIG = str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml")
SAMPLES_PER_STEP = 4 * 8


def _cmd(assets, out, nproc, reward, steps):
    head = [sys.executable, "-m", "megatron_alp.train"] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "megatron_alp.train"]
    return head + ["--config", CONFIG, f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}",
                   f"rollout.data.path={assets['data']}", f"run.output_root={out}", "run.name=run",
                   f"bus.dir={os.path.join(out, 'run', 'bus')}", f"run.steps={steps}", "run.prompts_per_step=4",
                   "run.micro_batch_size=8", "run.mini_batches_per_step=1", "run.max_tokens_per_micro_batch=0",
                   "parallel.tp=1",
                   "logging.tensorboard=false", f"rollout.reward=tests.integration.fault_rewards:{reward}"]


def _start(assets, out, marker, nproc=0, steps=3):
    env = dict(os.environ, OMP_NUM_THREADS="1", ALP_FAULT_MARKER=str(marker),
               ALP_FAULT_AFTER=str(SAMPLES_PER_STEP + 1), PYTHONPATH=REPO)
    return subprocess.Popen(_cmd(assets, out, nproc, "slow", steps), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"run ended before the fault point ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, "the run never reached step 2's rollout"
        time.sleep(0.1)


def _children():
    table = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    table.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(pid))
            except (OSError, IndexError, ValueError):
                pass
    return table


def _descendants(pid):
    table, out, todo = _children(), [], [pid]
    while todo:
        for c in table.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _assert_all_gone(pids, timeout=60):
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    assert alive == [], [(_cmdline(p), p) for p in alive]


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _latest(out):
    root = os.path.join(out, "run", "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        return f.read().strip()


def test_sigterm_mid_rollout_checkpoints_stops_engines_exits_143_and_resumes(assets, tmp_path):
    out, marker = str(tmp_path), tmp_path / "in_step2"
    proc = _start(assets, out, marker)
    _wait_for(marker, proc)
    engines = [p for p in _descendants(proc.pid) if "rollout.engines.local" in _cmdline(p)]
    assert len(engines) == 1
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, log[-4000:]
    # The signal lands while step 2's rewards are scored (in worker processes): either the rollout is
    # abandoned (checkpoint of step 1, "before step 2") or it had already returned and step 2 finishes
    # (checkpoint of step 2, "after step 2"). Never a lost or half-done step.
    latest = _latest(out)
    done = {"step_00000001": 1, "step_00000002": 2}.get(latest)
    assert done is not None, latest
    saved, stopped = log.find("checkpoint saved"), log.find("local-engine-0 (pid")
    assert 0 <= saved < stopped, log[-4000:]  # checkpoint first, then the engine
    assert f"stopped by signal 15 {'before' if done == 1 else 'after'} step 2" in log and "Traceback" not in log
    _assert_all_gone(engines)
    # The same command resumes from the checkpoint and finishes.
    again = subprocess.run(_cmd(assets, out, 0, "slow", 3), cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1", ALP_FAULT_MARKER=str(tmp_path / "m2"),
                                    ALP_FAULT_AFTER="100000", PYTHONPATH=REPO))
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"{latest} (step {done})" in again.stderr and _latest(out) == "step_00000003"


def test_engine_killed_mid_run_checkpoints_and_names_it(assets, tmp_path):
    # Two workers under torchrun: rank 1 waits for the batch while rank 0 finds the fleet empty.
    out, marker = str(tmp_path), tmp_path / "in_step2"
    proc = _start(assets, out, marker, nproc=2)
    _wait_for(marker, proc)
    tree = _descendants(proc.pid)
    engine = [p for p in tree if "rollout.engines.local" in _cmdline(p)][0]
    os.kill(engine, signal.SIGKILL)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, log[-4000:]
    # The engine dies during step 2: while that step still generates (its rollout is abandoned:
    # checkpoint of step 1), or after its generation, when the trained step's commit finds no
    # engine (checkpoint of step 2). Either way: the last completed step, named in one line.
    latest = _latest(out)
    assert latest in ("step_00000001", "step_00000002"), latest
    lines = [ln for ln in log.splitlines() if "rollout engines lost" in ln]
    assert len(lines) == 1 and "http://127.0.0.1:" in lines[0] and latest in lines[0], log[-4000:]
    # No traceback through our code (torchrun may print its own ChildFailedError summary).
    assert [ln for ln in log.splitlines() if ln.strip().startswith('File "') and "megatron_alp" in ln] == []
    _assert_all_gone(tree)


def test_kill9_of_torchrun_leaves_nothing_behind(assets, tmp_path):
    out, marker = str(tmp_path), tmp_path / "in_step2"
    proc = _start(assets, out, marker, nproc=1)
    _wait_for(marker, proc)
    tree = _descendants(proc.pid)
    assert any("rollout.engines.local" in _cmdline(p) for p in tree) and len(tree) >= 2
    proc.kill()
    proc.communicate(timeout=60)
    _assert_all_gone(tree)
