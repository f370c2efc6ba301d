"""Run model-written Python in an isolated subprocess (the tool of multi-turn TIR).

Each call gets a fresh private work directory and a child process (``rollout/sandbox_child.py``
under ``python -I``). Isolation (``rollout.sandbox.isolation``; threat model in docs/rollout.md):

- ``bwrap`` (the boundary; :mod:`rollout.sandbox_bwrap`): bubblewrap's user/PID/mount/network/IPC
  namespaces, no capabilities, ``no_new_privs``, a seccomp filter, a read-only view of only the
  shared libraries and the Python runtime, a size-capped private tmpfs work dir, no network at all,
  an unprivileged user on the host too (root drops to ``rollout.sandbox.user`` first,
  :mod:`rollout.sandbox_launch`), and the whole process tree killed with its PID namespace;
- ``none`` (the fallback where bubblewrap cannot run): a subprocess in its own session with the
  same resource limits and an audit hook. That is not a boundary, so it refuses to run as root
  unless ``allow_unisolated_root``; ``auto`` picks bwrap when it works here.

In both: wall time (the tree is killed after ``timeout_s``; RLIMIT_CPU backstop), memory
(RLIMIT_AS = ``memory_mb``; status ``memory``), processes (RLIMIT_NPROC = ``max_processes``), output
to files outside the sandbox (RLIMIT_FSIZE caps them; ``max_output_chars`` read back), and the PEP
578 audit hook as a friendly early error for naive code (never relied on).
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

from . import sandbox_bwrap as bw
from .config import SandboxConfig

logger = logging.getLogger(__name__)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launch.py")
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


def _child_env() -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": bw.INSIDE_WORK, "TMPDIR": bw.INSIDE_WORK, "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _choose_isolation(cfg: SandboxConfig) -> bool:
    """True for bubblewrap isolation; the fallback only where allowed (never silently as root)."""
    if cfg.isolation == "none":
        reason = "rollout.sandbox.isolation=none"
    else:
        reason = bw.bwrap_unusable(cfg.user)
        if reason is None:
            return True
        if cfg.isolation == "bwrap":
            raise RuntimeError(f"rollout.sandbox.isolation=bwrap: {reason}")
    if os.geteuid() == 0 and not cfg.allow_unisolated_root:
        raise RuntimeError(f"rollout.sandbox: refusing to run model-written code as root without OS isolation "
                           f"({reason}); install bubblewrap, or set rollout.sandbox.allow_unisolated_root=true")
    logger.warning("sandbox: running tool code WITHOUT OS isolation (%s); the audit hook is not a boundary", reason)
    return False


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
        self.isolated = _choose_isolation(self.cfg)
        self._ids = None
        if self.isolated and os.geteuid() == 0:
            pw = pwd.getpwnam(self.cfg.user)
            self._ids = (pw.pw_uid, pw.pw_gid)
        elif not self.isolated and self.cfg.drop_privileges and os.geteuid() == 0:
            self._ids = _nobody()

    async def run(self, code: str) -> ToolResult:
        async with self._sem:
            return await self._run(code)

    def run_sync(self, code: str) -> ToolResult:
        return asyncio.run(self._run(code))

    async def _run(self, code: str) -> ToolResult:
        if self.isolated:
            return await self._run_isolated(code)
        return await self._run_unisolated(code)

    async def _run_isolated(self, code: str) -> ToolResult:
        cfg = self.cfg
        outer = tempfile.mkdtemp(prefix="rollout-tool-")
        seccomp = None
        try:
            os.chmod(outer, 0o711)
            run_dir = os.path.join(outer, "run")
            os.mkdir(run_dir, 0o755)
            for name, text in (("code.py", code), ("child.py", open(CHILD).read())):
                with open(os.path.join(run_dir, name), "w") as f:
                    f.write(text)
                os.chmod(os.path.join(run_dir, name), 0o644)
            child_cfg = {"dir": bw.INSIDE_WORK, "code_file": bw.INSIDE_RUN + "/code.py", "network": "isolated",
                         "memory_bytes": cfg.memory_mb * 1024 * 1024, "cpu_s": int(cfg.timeout_s) + 1,
                         "fsize_bytes": max(1 << 20, 8 * cfg.max_output_chars), "uid": None,
                         "max_processes": cfg.max_processes}
            child = [sys.executable, "-I", bw.INSIDE_RUN + "/child.py", json.dumps(child_cfg)]
            seccomp = bw.seccomp_fd()
            sources = None
            if self._ids is not None:
                sources, pairs = bw.staging(run_dir, os.path.join(outer, "ro"))
            argv = bw.bwrap_command(run_dir, child, cfg.disk_mb, seccomp, sources, _child_env())
            if self._ids is not None:
                spec = {"binds": pairs, "uid": self._ids[0], "gid": self._ids[1], "argv": argv}
                argv = [sys.executable, "-I", "-S", LAUNCH, json.dumps(spec)]
            return await self._execute(argv, outer, outer, {"PATH": "/usr/bin:/bin"},
                                       [seccomp] if seccomp is not None else [])
        finally:
            if seccomp is not None:
                os.close(seccomp)
            shutil.rmtree(outer, ignore_errors=True)

    async def _execute(self, argv, outer: str, cwd: str, env: dict, pass_fds) -> ToolResult:
        """Run ``argv`` in its own session, stdout/stderr to files in ``outer``; kill its tree at the end."""
        cfg = self.cfg
        out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, env=env,
                start_new_session=True, pass_fds=pass_fds)
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

    async def _run_unisolated(self, code: str) -> ToolResult:
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
                "max_processes": cfg.max_processes,
            }
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
                   "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            return await self._execute([sys.executable, "-I", CHILD, json.dumps(child_cfg)], outer, work, env, [])
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
        if rc == SETUP_EXIT or stderr.startswith(("bwrap:", "sandbox:")):
            return "setup"
        return "ok" if rc == 0 else "error"
