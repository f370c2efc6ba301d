"""What one srun task runs on its node, from the job's plan file (written by the supervisor).

    python -m megatron_alp.launch.node engines PLAN.json   # this node's rollout servers
    python -m megatron_alp.launch.node trainer PLAN.json   # torchrun with this node's rank

``engines`` starts the servers listed for this node (``SLURMD_NODENAME``) as children in their
own sessions (rollout/engines/processes.py), each with SIGTERM ignored, then waits. SIGTERM does not
stop them (a job-wide TERM: the trainer may still need them to finish its step); SIGINT (the
supervisor, once the trainer is done) does. A server that exits on its own is reported with the
tail of its log; with ``bus.on_engine_failure = drop`` the others keep serving (the trainer's fleet
drops the dead one) and the agent exits 1 only when none is left; with ``stop`` it exits 1 at once.

``trainer`` runs ``python -m torch.distributed.run`` (static rendezvous on the first trainer node,
node rank = this node's index among the trainer nodes) and exits with its code. torchrun runs with
SIGTERM ignored and told not to handle it, so a job-wide SIGTERM (preemption with GraceTime,
``scancel`` of the job, a node drain) reaches the trainer processes only: they checkpoint at the next
step boundary and exit 0, and torchrun with them (torchrun's own handler would kill them after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT). The planned stop (``#SBATCH --signal=B:TERM``) reaches the batch
shell only; the supervisor forwards it as SIGUSR2 to this agent, which sends SIGTERM to the trainer
processes by pid.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Dict, List, Optional

logger = logging.getLogger("megatron_alp.launch.node")
TERM_EXIT = 143
"""Exit code of the trainer step after a SIGTERM stop (the supervisor's too): 128 + SIGTERM."""


def this_node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def gpu_env(gpu_slice: Optional[List[int]]) -> Dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for a [first, count] share of this step's GPUs (a one-node job)."""
    if not gpu_slice:
        return {}
    first, count = gpu_slice
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(first + count)]
    if len(devices) < first + count:
        raise SystemExit(f"this step sees GPUs {devices}, fewer than the {first + count} the plan splits")
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices[first:first + count])}


def shielded(cmd: List[str]) -> List[str]:
    """The server command run with SIGTERM ignored for good (:mod:`.shield`): ``python -m X ...``
    through the shield module, anything else with bash's ``trap "" TERM`` (SIG_IGN survives exec;
    enough for servers that do not install their own SIGTERM handler). A job-wide SIGTERM then leaves
    the servers serving while the trainer finishes its step and checkpoints; the agent stops them with
    SIGINT, then SIGTERM/SIGKILL (processes.py)."""
    if len(cmd) > 2 and cmd[1] == "-m":
        return [cmd[0], "-m", "megatron_alp.launch.shield", *cmd[1:]]
    return ["bash", "-c", 'trap "" TERM; exec "$@"', "alp-engine", *cmd]


def _stop_servers(servers, grace_s: float = 10.0) -> None:
    import time

    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGINT)  # their own sessions: pgid == pid
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(s.proc and s.proc.poll() is None for s in servers):
        time.sleep(0.2)
    for s in servers:
        s.stop(grace_s=5.0)  # SIGTERM (ignored by shielded servers), then SIGKILL


class _EngineWatch:
    """The agent's view of its servers: report each death once, decide when the agent ends."""

    def __init__(self, servers, on_failure: str):
        self.servers, self.on_failure, self.reported = servers, on_failure, set()

    def new_deaths(self) -> bool:
        return any(s.proc is not None and s.proc.poll() is not None and s.pid not in self.reported
                   for s in self.servers)

    def check(self, terminating: bool) -> Optional[int]:
        """None while the agent should keep running; else its exit code."""
        from rollout.engines.processes import log_tail

        dead = [s for s in self.servers if s.proc is not None and s.proc.poll() is not None]
        new = [s for s in dead if s.pid not in self.reported]
        for s in new:
            self.reported.add(s.pid)
            how = "after SIGTERM" if terminating else "on its own"
            logger.error("%s (pid %d, %s) exited %s with code %s; last lines of %s:\n%s", s.name, s.pid, s.url,
                         how, s.proc.returncode, s.log_path, log_tail(s.log_path, 30))
        if len(dead) == len(self.servers):
            return 0 if terminating else 1
        if dead and not terminating and self.on_failure == "stop":
            return 1  # bus.on_engine_failure = stop: one dead server ends the step (and the job)
        if new and not terminating:
            logger.warning("%s: %d of %d server(s) still serving (bus.on_engine_failure = drop: the trainer's "
                           "fleet drops the dead one)", this_node(), len(self.servers) - len(dead), len(self.servers))
        return None


def run_engines(spec: dict) -> int:
    """This node's servers until the supervisor stops them (SIGINT) or they are all gone.

    SIGTERM (a job-wide TERM reaches every process of the step) does not stop the servers: the trainer
    may still need them to finish its step; the supervisor stops this step once the trainer is done.
    With ``bus.on_engine_failure = drop`` a dead server is reported and the others keep serving;
    with ``stop`` (or when every server of the node is dead) the agent exits 1.
    """
    from rollout.engines.processes import ServerProcess

    node = this_node()
    entries = spec["engines"].get(node)
    if entries is None:
        logger.error("node %s is not a rollout node of this job (%s)", node, ", ".join(spec["engines"]))
        return 2
    stop, term = threading.Event(), threading.Event()
    gpus = gpu_env(spec.get("engine_gpus"))
    servers: List[ServerProcess] = [
        ServerProcess(shielded(list(e["cmd"])), e["url"], e["log"], env={**(e.get("env") or {}), **gpus},
                      name=e["name"], api_key=e.get("api_key"))
        for e in entries]
    watch = _EngineWatch(servers, spec.get("on_engine_failure", "stop"))
    code = 0
    try:
        for s in servers:
            s.start()
        # After start(): these replace the stop-all handlers processes.py chained in.
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: (term.set(), logger.warning(
            "%s: SIGTERM: the servers keep serving until the supervisor stops them", node)))
        logger.info("%s: %d server(s) started: %s", node, len(servers), ", ".join(s.url for s in servers))
        while not stop.wait(1.0):
            if watch.new_deaths() and not term.is_set():
                stop.wait(2.0)  # a step-wide SIGTERM reaches the servers and this agent together
            done = watch.check(term.is_set())
            if done is not None:
                code = done
                break
    finally:
        _stop_servers(servers)
    return code


def trainer_argv(spec: dict, node: str) -> List[str]:
    t = spec["trainer"]
    if node not in t["nodes"]:
        raise SystemExit(f"node {node} is not a trainer node of this job ({', '.join(t['nodes'])})")
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={len(t['nodes'])}", f"--nproc-per-node={t['procs_per_node']}",
            f"--node-rank={t['nodes'].index(node)}", f"--master-addr={t['master_addr']}",
            f"--master-port={t['master_port']}", "--max-restarts=0",
            "-m", "megatron_alp.train", *t["args"]]


def children(pid: int) -> List[int]:
    """Direct children of ``pid``: /proc/PID/task/*/children, or (kernels without it) the processes
    whose parent id is ``pid``."""
    out: List[int] = []
    files = glob.glob(f"/proc/{pid}/task/*/children")
    for task in files:
        try:
            with open(task) as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    if not files:
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                out.append(int(stat.split("/")[2]))
    return sorted(set(out))


def run_trainer(spec: dict) -> int:
    """torchrun with SIGTERM ignored (it and its workers inherit SIG_IGN; the workers' StopFlag installs
    its own handler): a job-wide SIGTERM reaches the workers directly and they checkpoint, while
    torchrun, which would otherwise turn SIGTERM into "kill the workers after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT", is told not to handle it (TORCHELASTIC_SIGNALS_TO_HANDLE, read by
    torch.distributed.elastic.multiprocessing.api.PContext.start in torch >= 2.4). SIGUSR2 (the
    supervisor's planned stop) is turned into SIGTERM to the workers by pid."""
    argv = trainer_argv(spec, this_node())
    logger.info("%s: %s", this_node(), " ".join(argv[1:]))
    preempt, stopped = threading.Event(), threading.Event()
    # torchrun's --signals-to-handle (PET_SIGNALS_TO_HANDLE; it sets TORCHELASTIC_SIGNALS_TO_HANDLE for
    # PContext, which older versions read directly) without SIGTERM.
    keep = "SIGINT,SIGHUP,SIGQUIT"
    env = {**os.environ, **gpu_env(spec["trainer"].get("gpus")), "PET_SIGNALS_TO_HANDLE": keep,
           "TORCHELASTIC_SIGNALS_TO_HANDLE": keep}
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited by torchrun and its workers
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    proc = subprocess.Popen(argv, env=env)
    signal.signal(signal.SIGUSR2, lambda *_: preempt.set())
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())  # the workers got it too (step-wide)
    while proc.poll() is None:
        if preempt.wait(1.0):
            preempt.clear()
            stopped.set()
            workers = children(proc.pid)
            logger.warning("%s: preemption: SIGTERM to the trainer processes %s (they checkpoint and exit)",
                           this_node(), workers)
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    rc = proc.returncode
    rc = 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it
    if stopped.is_set():
        logger.warning("%s: the trainer stopped after SIGTERM (torchrun exit %d): step exit 143", this_node(), rc)
        return TERM_EXIT  # tells the supervisor (which may not have seen the signal) to requeue
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["engines", "trainer"])
    p.add_argument("plan", help="the job's plan.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with open(a.plan) as f:
        spec = json.load(f)
    return run_engines(spec) if a.role == "engines" else run_trainer(spec)


if __name__ == "__main__":
    raise SystemExit(main())
