"""Asynchronous rollout (rollout.max_staleness = 1) on a real CPU run with two local engines: one
engine is SIGKILLed while it holds a request of the run, and no sample is lost: the request is
re-issued on the other engine, every step trains all its groups, whole and within the staleness
bound, and the trained prompts are exactly those of the same run without the fault: step s's group
g is the prompt stream's (s x prompts_per_step + g)-th prompt, so the expected list is the stream's
(prompts.py), drawn here rather than by a second, uninterrupted run (~30 s).

The kill lands on requests in flight, never on a sleep: step s's groups are logged
(trained_groups.jsonl) right after the producer issued step s + 1's (targets start at
set_version, before take), and the engines hold each batch for rollout.local.batch_wait_ms = 1500
before decoding it, so the victim, killed as soon as step 1's groups appear, holds step 2's
requests; the run's log must show a request that failed on it being re-issued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_alp.config.loader import CONFIG_ROOT

from .prompts import stream_prompts

pytestmark = pytest.mark.slow

REPO = os.path.dirname(str(CONFIG_ROOT))
CONFIG = str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml")
STEPS, PROMPTS, N = 4, 4, 8  # N: the config's rollout.n_samples


def _cmd(assets, out):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
            "-m", "megatron_alp.train", "--config", CONFIG, f"model.hf_path={assets['hf']}",
            f"checkpoint.load={assets['mcore']}", f"rollout.data.path={assets['data']}", f"run.output_root={out}",
            "run.name=run", f"bus.dir={os.path.join(out, 'run', 'bus')}", f"run.steps={STEPS}",
            f"run.prompts_per_step={PROMPTS}", "run.micro_batch_size=8", "run.mini_batches_per_step=1",
            "parallel.tp=1", "rollout.num_engines=2", "rollout.max_staleness=1", "rollout.local.batch_wait_ms=1500",
            "logging.tensorboard=false",
            "checkpoint.save_interval=0"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _engines(root_pid):
    """{pid: port} of the local engines among ``root_pid``'s descendants."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, IndexError, ValueError):
            pass
    found, todo = {}, [root_pid]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    args = f.read().decode().split("\0")
            except OSError:
                continue
            if "rollout.engines.local" in args and "--port" in args:
                found[c] = int(args[args.index("--port") + 1])
    return found


def _poll(what, cond, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what} ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _logged_steps(run_dir) -> int:
    path = os.path.join(run_dir, "rollout", "trained_groups.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len({line.split(",", 1)[0] for line in f if line.endswith("\n")})  # '{"step": s'


def _trained(run_dir):
    """[(step, group_id, prompt_index)] of the run, after checking every group is whole, from one
    weight version, and within the staleness bound."""
    from megatron_alp.trainer.group_log import read_group_log

    log = read_group_log(os.path.join(run_dir, "rollout", "trained_groups.jsonl"))
    assert sorted(log) == list(range(STEPS))
    out = []
    for step, groups in log.items():
        assert sorted(g["group_id"] for g in groups) == list(range(PROMPTS)), (step, groups)
        for g in groups:
            versions = [int(v) for v in g["sample_versions"]]
            assert len(versions) == N and len(set(versions)) == 1, (step, g)
            assert 0 <= step - g["version"] <= 1, (step, g)
            out.append((step, g["group_id"], g["prompt_index"]))
    return sorted(out)


def test_engine_killed_mid_request_in_async_mode_loses_no_sample(assets, tmp_path):
    out = str(tmp_path / "fault")
    proc = subprocess.Popen(_cmd(assets, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        engines = _poll("two engines", lambda: (lambda e: e if len(e) == 2 else None)(_engines(proc.pid)), proc)
        victim, port = max(engines.items(), key=lambda kv: kv[1])
        _poll("step 1's groups", lambda: _logged_steps(os.path.join(out, "run")) >= 2, proc)
        os.kill(victim, signal.SIGKILL)
        log = proc.communicate(timeout=600)[0]
        (tmp_path / "fault.log").write_text(log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, log[-4000:]
    url = f"http://127.0.0.1:{port}"
    # The killed engine held requests: their connections broke (not "cannot connect": they were open),
    # and the fleet re-issued them elsewhere.
    broken = [ln for ln in log.splitlines()
              if f"engine {url}: POST /generate failed" in ln and "Cannot connect" not in ln]
    assert broken, log[-4000:]
    assert f"re-issuing a request that failed on {url}" in log, log[-4000:]
    cmd = _cmd(assets, out)
    assert _trained(os.path.join(out, "run")) == stream_prompts(CONFIG, cmd[cmd.index("--config") + 2:], STEPS, PROMPTS)
