"""Start server processes, wait for /health, stop them by pid (on exit and on signals).

Each server runs in its own session (``start_new_session``), so stopping it signals its whole
process group (SGLang spawns scheduler and detokenizer children) and nothing else. Every started
server is registered; an ``atexit`` hook and SIGTERM/SIGINT handlers (chained to the previous
handlers) stop what is still running. A program that orders its own shutdown (the trainer:
checkpoint first, then engines) calls :func:`leave_signals_to_caller`, after which the signal
handlers only chain. Each server also gets ``PR_SET_PDEATHSIG`` = SIGKILL, so a SIGKILLed parent
(no atexit, no handler) leaves no server behind; note the kernel sends it when the *thread* that
started the server exits, so start servers from a long-lived thread (the main one). Nothing here
searches processes by name.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Callable, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

_REGISTRY: Dict[int, "ServerProcess"] = {}
_LOCK = threading.Lock()
_HOOKS_INSTALLED = False
_SIGNALS_STOP_SERVERS = True
PR_SET_PDEATHSIG = 1


def leave_signals_to_caller() -> None:
    """SIGTERM/SIGINT no longer stop the servers here: the caller stops them (``stop_all`` or
    each ``stop()``) when it is ready; ``atexit`` still stops what is left."""
    global _SIGNALS_STOP_SERVERS
    _SIGNALS_STOP_SERVERS = False


def set_parent_death_signal(sig: int = signal.SIGKILL, expected_parent: Optional[int] = None) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` for this process: the kernel sends ``sig`` when our parent
    dies. If the parent already died (we were re-parented away from ``expected_parent``), send it
    now. Linux only; returns False where unavailable."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True


class LaunchError(RuntimeError):
    """A server did not become healthy; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redact(cmd: Sequence[str]) -> List[str]:
    """The command with the value of ``--api-key`` hidden (for logs)."""
    out = list(cmd)
    for i, tok in enumerate(out[:-1]):
        if tok == "--api-key":
            out[i + 1] = "***"
    return out


def log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError as e:
        return f"<no log: {e}>"


class ServerProcess:
    """One launched server: ``cmd`` writes to ``log_path`` and serves ``url``."""

    def __init__(self, cmd: Sequence[str], url: str, log_path: str, *, env: Optional[Dict[str, str]] = None,
                 name: str = "server", health_path: str = "/health", api_key: Optional[str] = None):
        self.cmd = list(cmd)
        self.url = url.rstrip("/")
        self.log_path = log_path
        self.env = env
        self.name = name
        self.health_path = health_path
        self.api_key = api_key
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self) -> "ServerProcess":
        _install_hooks()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        env = dict(os.environ)
        env.update(self.env or {})
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(redact(self.cmd))}\n".encode())
            log.flush()
            parent = os.getpid()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL, parent))
        with _LOCK:
            _REGISTRY[self.proc.pid] = self
        logger.info("%s started (pid %d) for %s; log: %s", self.name, self.proc.pid, self.url, self.log_path)
        return self

    def healthy(self, timeout_s: float = 2.0) -> bool:
        req = urllib.request.Request(self.url + self.health_path)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.25) -> "ServerProcess":
        """Poll /health until 200; fail early if the process exits, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self._forget()
                raise LaunchError(f"{self.name} (pid {self.proc.pid}) exited with code {code} before "
                                  f"{self.url} became healthy; last lines of {self.log_path}:\n"
                                  f"{log_tail(self.log_path)}")
            if self.healthy():
                logger.info("%s at %s is healthy", self.name, self.url)
                return self
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.stop()
                raise LaunchError(f"{self.name} at {self.url} not healthy after {timeout_s:.0f} s; "
                                  f"last lines of {self.log_path}:\n{tail}")
            time.sleep(poll_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self._forget()
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # its own session: pgid == pid
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        logger.info("%s (pid %d) stopped", self.name, proc.pid)
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server's process group at once (fault injection in tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._forget()

    def _forget(self) -> None:
        if self.proc is not None:
            with _LOCK:
                _REGISTRY.pop(self.proc.pid, None)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every server this process launched and has not stopped yet."""
    with _LOCK:
        servers = list(_REGISTRY.values())
    for s in servers:
        try:
            s.stop(grace_s=5.0)
        except Exception as e:  # keep stopping the others
            logger.error("stopping %s failed: %s", s.name, e)


def _install_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            if _SIGNALS_STOP_SERVERS:
                stop_all()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


def start_all(servers: List[ServerProcess], timeout_s: float) -> List[ServerProcess]:
    """Start all servers, then wait for each (they boot in parallel); stop all on any failure."""
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy(timeout_s)
    except BaseException:
        for s in servers:
            s.stop(grace_s=5.0)
        raise
    return servers


# What a server's log says when its port was taken (EADDRINUSE): aiohttp (the local engine),
# uvicorn (SGLang) and http.server all print it.
PORT_TAKEN = "address already in use"


def start_on_free_ports(make_servers: Callable[[], List[ServerProcess]], timeout_s: float,
                        tries: int = 3) -> List[ServerProcess]:
    """:func:`start_all` for servers on ports chosen with :func:`free_port`. A port is free when it
    is chosen, but another process (a second job on the node, a parallel test) can bind it before
    the server does; when a server exits because its port was taken, ``make_servers()`` is called
    again (new ports) and the servers start again, at most ``tries`` times in all."""
    for attempt in range(1, tries + 1):
        servers = make_servers()
        try:
            return start_all(servers, timeout_s)
        except LaunchError as e:
            if attempt == tries or PORT_TAKEN not in str(e).lower():
                raise
            logger.warning("a server's port was taken between choosing and binding it (attempt %d of %d): "
                           "starting again on new ports", attempt, tries)
    raise AssertionError("unreachable")
