"""What one srun task runs on its node, from the job's plan file (written by the supervisor).

    python -m megatron_alp.launch.node engines PLAN.json   # this node's rollout servers
    python -m megatron_alp.launch.node trainer PLAN.json   # torchrun with this node's rank

``engines`` starts the servers listed for this node (``SLURMD_NODENAME``) as children in their
own sessions (rollout/engines/processes.py), then waits. A server that exits on its own ends the
agent with code 1 after printing the tail of its log (srun --kill-on-bad-exit then ends the step and
the supervisor the job); SIGTERM stops every server by its process group and exits 0.

``trainer`` runs ``python -m torch.distributed.run`` (static rendezvous on the first trainer node,
node rank = this node's index among the trainer nodes) and exits with its code. Preemption reaches it
as SIGUSR2 (the supervisor: ``scancel --signal=USR2`` on the step): torchrun and its workers inherit
SIGUSR2 ignored, and this agent sends SIGTERM to the workers only (torchrun's children, by pid).
They checkpoint at the next step boundary and exit 0, and torchrun with them. SIGTERM to torchrun
itself would make it kill the workers 30 s later (torch < 2.12 ignores
TORCH_ELASTIC_SHUTDOWN_TIMEOUT), too soon for a step of a large model to finish.
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


def run_engines(spec: dict) -> int:
    from rollout.engines.processes import ServerProcess, log_tail

    node = this_node()
    entries = spec["engines"].get(node)
    if entries is None:
        logger.error("node %s is not a rollout node of this job (%s)", node, ", ".join(spec["engines"]))
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # the launcher chains its stop-all in front of this
    gpus = gpu_env(spec.get("engine_gpus"))
    servers: List[ServerProcess] = [
        ServerProcess(e["cmd"], e["url"], e["log"], env={**(e.get("env") or {}), **gpus}, name=e["name"],
                      api_key=e.get("api_key"))
        for e in entries]
    code = 0
    try:
        for s in servers:
            s.start()
        logger.info("%s: %d server(s) started: %s", node, len(servers), ", ".join(s.url for s in servers))
        while not stop.wait(1.0):
            dead = [s for s in servers if s.proc is not None and s.proc.poll() is not None]
            if dead and not stop.wait(2.0):  # a step-wide SIGTERM also reaches the servers: not a failure
                s = dead[0]
                logger.error("%s (pid %d, %s) exited with code %s; last lines of %s:\n%s", s.name, s.pid, s.url,
                             s.proc.returncode, s.log_path, log_tail(s.log_path, 30))
                code = 1
                break
    finally:
        for s in servers:
            s.stop(grace_s=10.0)
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
    argv = trainer_argv(spec, this_node())
    logger.info("%s: %s", this_node(), " ".join(argv[1:]))
    preempt = threading.Event()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited by torchrun and its workers
    proc = subprocess.Popen(argv, env={**os.environ, **gpu_env(spec["trainer"].get("gpus"))})
    signal.signal(signal.SIGUSR2, lambda *_: preempt.set())
    signal.signal(signal.SIGTERM, lambda *_: None)  # SLURM's own TERM reaches torchrun directly
    while proc.poll() is None:
        if preempt.wait(1.0):
            preempt.clear()
            workers = children(proc.pid)
            logger.warning("%s: preemption: SIGTERM to the trainer processes %s (they checkpoint and exit)",
                           this_node(), workers)
            if not workers:  # not started yet, or /proc hides them: torchrun gives them 30 s at least
                logger.warning("%s: no trainer processes found: SIGTERM to torchrun (pid %d)", this_node(), proc.pid)
                workers = [proc.pid]
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    rc = proc.returncode
    return 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it


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
