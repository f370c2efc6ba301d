"""Fault handling without a full run: reward failures, the rollout's abort paths, and the engines'
lifetime (signals left to the trainer, PR_SET_PDEATHSIG). End to end: tests/integration/test_preemption.py."""

import asyncio
import math
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rollout.config import RolloutConfig
from rollout.data import Prompt
from rollout.engines.protocol import GenerateOutput
from rollout.generate import RewardError, RolloutGenerator, reward_failures
from rollout.tiny_model import build_char_tokenizer


class EchoEngine:
    async def generate(self, input_ids, params, *, rid=None, return_logprob=True):
        await asyncio.sleep(0)
        return GenerateOutput("echo", [5, 6], [-0.1, -0.2], "length", {"type": "length"}, "v1")


def _flaky(calls):
    def reward(prompt, response, label, metadata):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        if len(calls) == 3:
            return math.nan
        if len(calls) == 4:
            return "not a number"
        return 1.0
    return reward


def _generate(**cfg):
    tok = build_char_tokenizer("full")
    gen = RolloutGenerator(EchoEngine(), tok, RolloutConfig(n_samples=5, max_new_tokens=2, **cfg), reward_fn=_flaky([]))
    return asyncio.run(gen.generate([Prompt(tok.encode("ab", add_special_tokens=False), "ab", "x")]))


def test_reward_that_raises_or_returns_nan_scores_the_sample_failed():
    samples = _generate(reward_failed_value=-1.0)
    assert [s.reward for s in samples] == [1.0, -1.0, -1.0, -1.0, 1.0]
    errors = [s.metadata.get("reward_error", "") for s in samples]
    assert "KeyError" in errors[1] and "returned nan" in errors[2] and "ValueError" in errors[3]
    assert reward_failures(samples) == 3  # the trainer's rollout/reward_failures


def test_reward_failure_can_stop_the_run():
    with pytest.raises(RewardError, match="KeyError: 'boom'"):
        _generate(reward_on_error="stop")
    with pytest.raises(ValueError, match="rollout.reward_failed_value"):
        RolloutConfig(reward_failed_value=math.inf).validate()


class FakeStream:
    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class FakeDriver:
    def __init__(self, behaviour):
        self.stream, self.behaviour = FakeStream(), behaviour

    def rollout(self, step, version):
        self.stream.pos += 4  # the prompts of this step were taken
        return self.behaviour()

    def state_dict(self):  # RolloutDriver's resume seam
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state["stream"])


@pytest.fixture
def stop_flag():
    from megatron_alp.trainer.setup import StopFlag

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield StopFlag()
    for s, h in saved.items():
        signal.signal(s, h)


def test_rollout_or_abort(stop_flag):
    from megatron_alp.trainer.preempt import Abort, RolloutFailure, TrainingStopped, rollout_or_abort
    from rollout.fleet import FleetExhausted

    ok = FakeDriver(lambda: ("batch", {}))
    assert rollout_or_abort(ok, stop_flag, False, 3, 3) == ("batch", {}) and ok.stream.pos == 4

    def engine_down():
        raise FleetExhausted("no live rollout engine left out of 1: http://127.0.0.1:9: connection refused")
    lost = FakeDriver(engine_down)
    abort = rollout_or_abort(lost, stop_flag, False, 3, 3)
    assert isinstance(abort, Abort) and abort.kind == "engine" and lost.stream.pos == 0  # rewound
    err = abort.error(3, "/ckpt/step_00000003")
    assert isinstance(err, RolloutFailure) and "http://127.0.0.1:9" in str(err) and "/ckpt/step_00000003" in str(err)

    def signalled():  # SIGTERM arrives during the rollout: abandoned at once
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("not interrupted")
    t0 = time.monotonic()
    term = FakeDriver(signalled)
    abort = rollout_or_abort(term, stop_flag, False, 3, 3)
    assert abort.kind == "signal" and abort.signum == signal.SIGTERM and term.stream.pos == 0
    assert time.monotonic() - t0 < 20
    stopped = abort.error(3, "/ckpt/x")
    assert isinstance(stopped, TrainingStopped) and stopped.signum == 15
    # Requested on another rank (stopping=True) or earlier: no rollout at all.
    fresh = FakeDriver(lambda: ("batch", {}))
    assert rollout_or_abort(fresh, stop_flag, True, 4, 4).kind == "signal" and fresh.stream.pos == 0


PARENT = textwrap.dedent("""
    import os, signal, sys, time
    from rollout.engines.processes import ServerProcess, leave_signals_to_caller
    if sys.argv[1] == "defer":
        leave_signals_to_caller()
    servers = []
    def handler(signum, frame):
        print("server alive at our handler:", servers[0].proc.poll() is None, flush=True)
        for s in servers:
            s.stop(grace_s=1)
        sys.exit(0)
    signal.signal(signal.SIGTERM, handler)  # the first start chains its handler in front of ours
    for name in ("fake", "fake2"):
        servers.append(ServerProcess([sys.executable, "-c", "import time; time.sleep(120)"], "http://127.0.0.1:9",
                                     sys.argv[2], name=name).start())
    print("pids", *[s.pid for s in servers], flush=True)
    time.sleep(120)
""")


def _parent(mode, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", PARENT, mode, str(tmp_path / "log")], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    line = proc.stdout.readline().decode()
    assert line.startswith("pids"), line
    return proc, [int(p) for p in line.split()[1:]]


def _proc_state(pid):
    """The kernel's view of a process (run state, pending/blocked/ignored/caught signal masks,
    where it sleeps): what a hung parent is doing, for the failure message."""
    try:
        with open(f"/proc/{pid}/status") as f:
            keep = ("State", "Threads", "SigQ", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
            lines = [line.strip() for line in f if line.split(":")[0] in keep]
        with open(f"/proc/{pid}/wchan") as f:
            lines.append(f"wchan: {f.read()}")
    except OSError as e:
        return f"pid {pid}: {e}"
    return f"pid {pid}: " + "; ".join(lines)


def _exit_output(proc, pids, timeout=60):
    """Wait for ``proc`` to exit, then return what it printed. Waits on the process, not on EOF of
    its stdout (a process forked elsewhere meanwhile could hold the pipe's write end); a parent that
    does not exit fails with its signal state and its children's."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        state = "\n".join(_proc_state(p) for p in [proc.pid, *pids])
        proc.kill()
        proc.wait()
        pytest.fail(f"the parent did not exit within {timeout} s of SIGTERM:\n{state}")
    out = b""
    while select.select([proc.stdout], [], [], 1.0)[0]:  # exited: what it wrote is in the pipe
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        out += chunk
    proc.stdout.close()
    return out.decode()


def _gone(pid, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode,alive", [("default", False), ("defer", True)])
def test_signal_stops_servers_only_when_not_left_to_the_caller(tmp_path, mode, alive):
    proc, pids = _parent(mode, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out = _exit_output(proc, pids)
    assert f"server alive at our handler: {alive}" in out
    assert all(_gone(p) for p in pids)


def test_servers_die_with_a_sigkilled_parent(tmp_path):
    proc, pids = _parent("defer", tmp_path)
    proc.kill()  # no atexit, no handler
    proc.wait(timeout=30)
    assert all(_gone(p) for p in pids)
