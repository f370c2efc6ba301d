"""Run model-written Python in a confined subprocess (the tool of multi-turn TIR).

Each call gets a fresh private temporary directory (its working directory, removed afterwards)
and a child process (``rollout/sandbox_child.py`` under ``python -I``) in its own session with:

- **wall time**: the parent kills the child's whole process group after ``timeout_s``
  (RLIMIT_CPU is a second, CPU-time backstop);
- **memory**: RLIMIT_AS = ``memory_mb`` (an allocation beyond it raises MemoryError -> status
  ``memory``);
- **no network**: ``network="namespace"`` puts the child in a new network namespace
  (``unshare(CLONE_NEWNET)``, needs root: only a downed loopback exists, every connection fails);
  ``"audit"`` relies on a PEP 578 audit hook that refuses socket creation and connections;
  ``"auto"`` (default) uses the namespace when permitted and the hook always;
- **file system**: the audit hook refuses writes, deletes, renames, chmods and links outside the
  private directory; when we are root the child also drops to the user ``nobody``;
- **no escape hatches**: process creation (fork, exec, subprocess, os.system), ``ctypes`` and
  signals to other processes are refused by the same hook;
- **output**: stdout/stderr go to files outside the private directory (RLIMIT_FSIZE caps them)
  and at most ``max_output_chars`` of each is read back.

An audit hook is a guard against accidents and naive code, not a security boundary against a
determined attacker; run rollouts in a container or VM when the policy is untrusted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from .config import SandboxConfig

logger = logging.getLogger(__name__)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
MEMORY_EXIT, SETUP_EXIT = 3, 4


@dataclass
class ToolResult:
    """Outcome of one execution."""

    status: str
    """'ok', 'error' (exception / non-zero exit), 'timeout', 'memory' or 'setup' (sandbox failed)."""
    stdout: str
    stderr: str
    returncode: Optional[int]
    duration_s: float
    truncated: bool = False
    """True when stdout or stderr was longer than max_output_chars."""


def _others_can_read(path: str) -> bool:
    """Whether a user other than the owner can traverse to and read ``path``."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        st = os.stat(os.sep.join(parts[:i]) or os.sep)
        if not st.st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


@functools.lru_cache(maxsize=1)
def _nobody() -> Optional[tuple]:
    """(uid, gid) of ``nobody`` if the child could still import Python as that user."""
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    import sysconfig

    needed = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"),
              sysconfig.get_path("purelib"), os.path.dirname(CHILD)]
    if not all(_others_can_read(p) for p in needed if p and os.path.exists(p)):
        logger.warning("sandbox: the Python installation is not readable by 'nobody', so tool code runs "
                       "as root (the audit hook still confines writes to its directory)")
        return None
    return pw.pw_uid, pw.pw_gid


def _read(path: str, limit: int) -> tuple:
    with open(path, "rb") as f:
        data = f.read(limit * 4 + 4)
    text = data.decode("utf-8", errors="replace")
    return (text[:limit], True) if len(text) > limit else (text, False)


class Sandbox:
    """Executes code strings under the limits of a :class:`SandboxConfig`."""

    def __init__(self, config: Optional[SandboxConfig] = None):
        self.cfg = config or SandboxConfig()
        self._sem = asyncio.Semaphore(self.cfg.max_concurrent)
        self._ids = _nobody() if (self.cfg.drop_privileges and os.geteuid() == 0) else None

    async def run(self, code: str) -> ToolResult:
        async with self._sem:
            return await self._run(code)

    def run_sync(self, code: str) -> ToolResult:
        return asyncio.run(self._run(code))

    async def _run(self, code: str) -> ToolResult:
        cfg = self.cfg
        outer = tempfile.mkdtemp(prefix="rollout-tool-")
        work = os.path.join(outer, "work")
        os.mkdir(work, 0o700)
        try:
            code_file = os.path.join(outer, "code.py")
            with open(code_file, "w") as f:
                f.write(code)
            if self._ids is not None:
                os.chown(work, *self._ids)
                os.chmod(outer, 0o711)
                os.chmod(code_file, 0o644)
            child_cfg = {
                "dir": work, "code_file": code_file, "network": cfg.network,
                "memory_bytes": cfg.memory_mb * 1024 * 1024, "cpu_s": int(cfg.timeout_s) + 1,
                "fsize_bytes": max(1 << 20, 8 * cfg.max_output_chars),
                "uid": self._ids[0] if self._ids else None, "gid": self._ids[1] if self._ids else None,
            }
            out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
                   "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            start = time.monotonic()
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", CHILD, json.dumps(child_cfg), stdin=asyncio.subprocess.DEVNULL,
                    stdout=out, stderr=err, cwd=work, env=env, start_new_session=True)
            timed_out = False
            try:
                await asyncio.wait_for(proc.wait(), timeout=cfg.timeout_s)
            except asyncio.TimeoutError:
                timed_out = True
            finally:
                self._kill_group(proc.pid)
                if proc.returncode is None:
                    await proc.wait()
            duration = time.monotonic() - start
            stdout, t1 = _read(out_path, cfg.max_output_chars)
            stderr, t2 = _read(err_path, cfg.max_output_chars)
            rc = proc.returncode
            return ToolResult(self._status(rc, timed_out, stderr), stdout, stderr, rc, duration, t1 or t2)
        finally:
            shutil.rmtree(outer, ignore_errors=True)

    @staticmethod
    def _kill_group(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)  # the child's own session; nothing else is in it
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _status(rc: Optional[int], timed_out: bool, stderr: str) -> str:
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and not stderr:
            return "timeout"
        if rc == MEMORY_EXIT or "MemoryError" in stderr[-300:]:
            return "memory"
        if rc == SETUP_EXIT:
            return "setup"
        return "ok" if rc == 0 else "error"
