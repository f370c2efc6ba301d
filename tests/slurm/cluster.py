"""A real one-node SLURM for the tests (PLATFORM.md, "SLURM (real, on one machine)").

Debian's ``slurm-wlm`` + ``munge`` (installed by .ci/run in CI, never by the tests; without them
the tests skip with the reason). Everything runs as root from one temporary folder: a munge key and ``munged`` on
its own socket, a ``slurm.conf`` with ``proctrack/linuxproc``, ``task/none``, ``select/cons_tres``,
``SlurmUser=root`` and free unprivileged ports, ``slurmctld`` and ``slurmd`` with state, spool,
logs and pid files inside the folder. ``stop()`` cancels the jobs we submitted (by id), then stops
the three daemons by their pid files. Nothing outside the folder is touched.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

TOOLS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE"}


def _which(tool: str) -> Optional[str]:
    return shutil.which(tool, path=SEARCH_PATH)


def unavailable_reason() -> Optional[str]:
    """Why the local SLURM cannot run here (None when it can). The tests install nothing: CI installs
    the Debian/Ubuntu packages slurm-wlm and munge in .ci/run; on a workstation, install those two
    packages yourself (as root) to run these tests."""
    missing = [t for t in TOOLS if not _which(t)]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}; the tests install nothing: "
                "install the packages slurm-wlm and munge as root, as .ci/run does in CI)")
    if os.geteuid() != 0:
        return "the local SLURM runs its daemons as root (SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JobResult:
    job_id: str
    state: str
    exit_code: int
    output: str
    seconds: float


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.jobs: List[str] = []
        self.node = ""
        self._started: List[str] = []

    # -- daemons ---------------------------------------------------------------------------------
    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "out"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.sock"
        self._run([_which("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                   f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                   f"--seed-file={r / 'munge' / 'munged.seed'}"])
        self._started.append(str(r / "munge" / "munged.pid"))
        hw = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        self.node = re.search(r"NodeName=(\S+)", hw).group(1)
        cpus = int(re.search(r"CPUs=(\d+)", hw).group(1))
        mem = int(int(re.search(r"RealMemory=(\d+)", hw).group(1)) * 0.9)
        # Job ids seed the launcher's default ports: another session's test cluster on this machine
        # starts elsewhere, so the two do not pick the same engine and rendezvous ports.
        first_job = random.randrange(1000, 1_000_000)
        self.conf.write_text(f"""\
ClusterName=alptest
FirstJobId={first_job}
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self._run([_which("slurmctld"), "-f", str(self.conf), "-i"])
        self._started.append(str(r / "slurmctld.pid"))
        self._run([_which("slurmd"), "-f", str(self.conf), "-N", self.node])
        self._started.append(str(r / "slurmd.pid"))
        self._wait_idle()

    def _run(self, cmd: Sequence[str]) -> None:
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}\n{self.logs()}")

    def _wait_idle(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self._out(["sinfo", "--noheader", "--format=%T"]).strip()
            if state.startswith("idle"):
                return
            if state.startswith(("down", "drain")):
                self._out(["scontrol", "update", f"nodename={self.node}", "state=resume"])
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node is not idle after {timeout_s} s (state {state!r})\n{self.logs()}")

    def stop(self) -> None:
        """Cancel our jobs (by id), then stop slurmd, slurmctld and munged by their pid files."""
        for job in self.jobs:
            subprocess.run([_which("scancel"), "--full", job], env=self.env(), capture_output=True)
        deadline = time.monotonic() + 30
        while self.jobs and time.monotonic() < deadline and self._out(["squeue", "--noheader"]).strip():
            time.sleep(0.5)
        for pid_file in reversed(self._started):
            _stop_pid_file(Path(pid_file))
        self._started.clear()

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                parts.append(f"--- {name}\n" + "".join(p.read_text(errors="replace").splitlines(True)[-20:]))
        return "\n".join(parts)

    # -- jobs ------------------------------------------------------------------------------------
    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)
        env.update(extra or {})
        return env

    def _out(self, cmd: Sequence[str]) -> str:
        return subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env(), capture_output=True, text=True).stdout

    def submit(self, script: str, args: Sequence[str] = (), *, cwd: str, env: Optional[Dict[str, str]] = None) -> str:
        out = self.root / "out" / "%j.out"
        res = subprocess.run([_which("sbatch"), "--parsable", f"--output={out}", script, *args], cwd=cwd,
                             env=self.env(env), capture_output=True, text=True, timeout=60)
        if res.returncode:
            raise RuntimeError(f"sbatch failed: {res.stderr}\n{self.logs()}")
        job = res.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job_info(self, job: str) -> Dict[str, str]:
        text = self._out(["scontrol", "show", "job", "--oneliner", job])
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job: str, timeout_s: float = 300) -> JobResult:
        t0 = time.monotonic()
        info: Dict[str, str] = {}
        while time.monotonic() - t0 < timeout_s:
            info = self.job_info(job)
            if info.get("JobState") in DONE_STATES:
                break
            time.sleep(1.0)
        else:
            subprocess.run([_which("scancel"), "--full", job], env=self.env(), capture_output=True)
            raise TimeoutError(f"job {job} still {info.get('JobState')} after {timeout_s} s:\n{self.output(job)}")
        code = int(info.get("ExitCode", "0:0").split(":")[0])
        return JobResult(job, info["JobState"], code, self.output(job), time.monotonic() - t0)

    def output(self, job: str) -> str:
        p = self.root / "out" / f"{job}.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def signal_batch(self, job: str, sig: str = "TERM") -> None:
        """What ``#SBATCH --signal=B:TERM@N`` does N seconds before the time limit."""
        subprocess.run([_which("scancel"), "--batch", f"--signal={sig}", job], env=self.env(), check=True)


def _stop_pid_file(pid_file: Path, grace_s: float = 15.0) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.2)
