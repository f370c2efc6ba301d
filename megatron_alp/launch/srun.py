"""The SLURM commands the supervisor runs: srun steps, and signals to them by step id.

Every component is one srun *step* of the job, named ``alp-<component>``, with one task per node.
Steps are signalled with ``scancel --signal=SIG <job>.<step>``, which delivers the signal to the
step's processes and nothing else (SIGTERM to the ``srun`` client instead would make srun force the
step down with SIGKILL a few seconds later: no time to checkpoint). Steps are found by the name we
gave them inside our own job, never by searching processes.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from typing import List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)


def hostnames(nodelist: str) -> List[str]:
    """Expand a SLURM node list (``gpu[01-03,07]``) with ``scontrol show hostnames``."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()


def srun_command(name: str, nodes: Sequence[str], cmd: Sequence[str], *, gres: Optional[str] = None,
                 extra: str = "", kill_on_bad_exit: bool = True) -> List[str]:
    """``srun`` of ``cmd`` with one task on each of ``nodes``.

    --overlap          steps may share a node's CPUs, memory and GPUs (the router beside the engines;
                       one-node jobs, where node.py gives each side its own GPUs);
    --kill-on-bad-exit a task failing on one node ends the whole step at once (fail fast); off for
                       the engines with bus.on_engine_failure = drop (one node's engines failing must
                       not take the other nodes' down; the step ends when every node's agent has);
    --cpu-bind=none    the single task per node (torchrun, the engine agent) is not pinned to one
                       core: its children (one trainer process per GPU, the servers) need them all;
    --label            output lines carry the task (node) number;
    --gres             ``none`` for the CPU-only router (every other step gets the job's GPUs);
    extra              ALP_SRUN_ARGS, e.g. container options (pyxis: --container-image=...).
    """
    cmd_line = ["srun", "--overlap", f"--kill-on-bad-exit={int(kill_on_bad_exit)}", "--cpu-bind=none", "--label",
                f"--job-name=alp-{name}", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}",
                "--ntasks-per-node=1", f"--nodelist={','.join(nodes)}"]
    if gres:
        cmd_line.append(f"--gres={gres}")
    cmd_line += shlex.split(extra)
    return cmd_line + list(cmd)


ROLES = ("trainer", "engine")


def step_launcher(role: str, environ=os.environ) -> Tuple[str, List[str]]:
    """(extra srun options, command prefix) of a ``role`` step (``trainer`` or ``engine``; the router
    counts as an engine step): the job-wide ``ALP_SRUN_ARGS`` / ``ALP_STEP_PREFIX``, then the role's
    own ``ALP_TRAINER_SRUN_ARGS`` / ``ALP_TRAINER_PREFIX`` or ``ALP_ENGINE_SRUN_ARGS`` /
    ``ALP_ENGINE_PREFIX``. pyxis takes ``--container-image=...`` as srun options (one image for the
    trainer, SGLang's for the engines); apptainer is a prefix (``apptainer exec --nv IMAGE.sif``)."""
    if role not in ROLES:
        raise ValueError(f"step role must be one of {ROLES}, got {role!r}")
    up = role.upper()
    extra = " ".join(x for x in (environ.get("ALP_SRUN_ARGS", ""), environ.get(f"ALP_{up}_SRUN_ARGS", "")) if x)
    prefix = shlex.split(environ.get("ALP_STEP_PREFIX", "")) + shlex.split(environ.get(f"ALP_{up}_PREFIX", ""))
    return extra, prefix


def find_step(job_id: str, name: str, timeout_s: float = 20.0) -> Optional[str]:
    """``<job>.<step>`` of our step named ``alp-<name>`` (None if it never registered)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["squeue", "--steps", f"--jobs={job_id}", "--noheader", "--format=%i|%j"],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines():
            step, _, step_name = line.strip().partition("|")
            if step_name == f"alp-{name}":
                return step
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def signal_step(step: str, sig: str = "TERM") -> bool:
    """Deliver ``sig`` to every process of ``step``; False if scancel failed."""
    res = subprocess.run(["scancel", f"--signal={sig}", step], capture_output=True, text=True)
    if res.returncode:
        logger.warning("scancel --signal=%s %s failed: %s", sig, step, res.stderr.strip())
    return res.returncode == 0


def cancel_step(step: str) -> None:
    """End ``step`` (SLURM sends SIGTERM, then SIGKILL after KillWait)."""
    subprocess.run(["scancel", step], capture_output=True, text=True)
