"""The Python tool sandbox: time, memory, network and file-system limits; the caller is unharmed.

Each behaviour runs under both isolations: bubblewrap (the boundary; skipped with the reason where
it cannot run) and the unisolated fallback (allowed as root here only by its explicit flag).
Escapes by code that knows it is sandboxed: tests/unit/test_sandbox_escapes.py.
"""

import ctypes
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from rollout.config import SandboxConfig
from rollout.sandbox import Sandbox
from rollout.sandbox_bwrap import bwrap_unusable


@pytest.fixture(params=["bwrap", "none"])
def make_cfg(request):
    """SandboxConfig factory for one isolation."""
    if request.param == "bwrap" and bwrap_unusable("nobody"):
        pytest.skip(bwrap_unusable("nobody"))

    def make(**kw):
        return SandboxConfig(isolation=request.param, allow_unisolated_root=True, **kw)
    return make


def _can_unshare_net() -> bool:
    try:
        out = subprocess.run([sys.executable, "-c",
                              "import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare(0x40000000))"], timeout=20)
        return out.returncode == 0
    except Exception:
        return False


@pytest.fixture
def listener():
    """A TCP server of the test process on 127.0.0.1 that records connections."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                accepted.append(conn)
            except OSError:
                pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    t.join()
    for c in accepted:
        c.close()
    srv.close()


CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    print("CONNECTED")
except Exception as e:
    print("BLOCKED", type(e).__name__, e)
"""


def test_the_network_probe_connects_without_a_sandbox(listener):
    # Control: the same code outside the sandbox does reach the listener, so the checks below can fail.
    port, accepted = listener
    out = subprocess.run([sys.executable, "-c", CONNECT.format(port=port)], capture_output=True, text=True, timeout=30)
    assert "CONNECTED" in out.stdout


@pytest.mark.parametrize("mode", ["audit", "namespace", "auto"])
def test_network_connection_fails_unisolated(listener, mode):
    if mode == "namespace" and not _can_unshare_net():
        pytest.skip("no permission to create a network namespace (not root)")
    port, accepted = listener
    cfg = SandboxConfig(timeout_s=10, network=mode, isolation="none", allow_unisolated_root=True)
    res = Sandbox(cfg).run_sync(CONNECT.format(port=port))
    assert res.status == "ok", res
    assert "BLOCKED" in res.stdout and "CONNECTED" not in res.stdout
    # A sentinel connection after the sandbox ended: the listener accepts in arrival order, so once
    # it has accepted the sentinel, any connection the sandbox made would be there before it.
    sentinel = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        deadline = time.monotonic() + 30
        while not accepted:
            assert time.monotonic() < deadline, "the listener never accepted the sentinel"
            time.sleep(0.01)
        assert len(accepted) == 1 and accepted[0].getpeername() == sentinel.getsockname()
    finally:
        sentinel.close()
    if mode == "namespace":
        assert "unreachable" in res.stdout.lower() or "refused" in res.stdout.lower()
    else:
        assert "PermissionError" in res.stdout


def test_infinite_loop_times_out(make_cfg):
    t0 = time.monotonic()
    res = Sandbox(make_cfg(timeout_s=1.0)).run_sync("print('started', flush=True)\nwhile True:\n    pass\n")
    assert res.status == "timeout" and res.stdout.startswith("started")
    assert time.monotonic() - t0 < 8


def test_memory_bomb_is_stopped(make_cfg):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    res = Sandbox(make_cfg(timeout_s=20, memory_mb=256)).run_sync(code)
    assert res.status == "memory", res
    assert res.duration_s < 20


def test_writes_outside_the_private_directory_fail(tmp_path, make_cfg):
    target = tmp_path / "victim.txt"
    target.write_text("original")
    code = f"""
import os, shutil
for action in [
    lambda: open({str(tmp_path / 'new.txt')!r}, "w").write("x"),
    lambda: open({str(target)!r}, "a").write("x"),
    lambda: os.remove({str(target)!r}),
    lambda: os.rename({str(target)!r}, "stolen.txt"),
    lambda: os.open({str(tmp_path / 'fd.txt')!r}, os.O_WRONLY | os.O_CREAT),
    lambda: open("../escape.txt", "w").write("x"),
    lambda: os.symlink("/etc/passwd", {str(tmp_path / 'link')!r}),
    lambda: os.system("touch {tmp_path / 'sh.txt'}"),
    lambda: __import__("subprocess").run(["touch", {str(tmp_path / 'sub.txt')!r}]),
]:
    try:
        action()
        print("ALLOWED")
    except (PermissionError, OSError) as e:
        print("DENIED", e)
open("inside.txt", "w").write("mine")
os.makedirs("sub/dir")
print("inside ok", open("inside.txt").read(), os.path.isdir("sub/dir"))
"""
    res = Sandbox(make_cfg(timeout_s=20)).run_sync(code)
    assert res.status == "ok", res
    assert "ALLOWED" not in res.stdout and res.stdout.count("DENIED") == 9
    assert "inside ok mine True" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert target.read_text() == "original"


def test_output_is_capped_and_errors_are_reported(make_cfg):
    sb = Sandbox(make_cfg(timeout_s=10, max_output_chars=1000))
    res = sb.run_sync("print('x' * 100000)")
    assert res.status == "ok" and res.truncated and len(res.stdout) == 1000
    err = sb.run_sync("print('before')\n1/0")
    assert err.status == "error" and err.stdout == "before\n" and "ZeroDivisionError" in err.stderr
    assert "sandbox_child" not in err.stderr  # only the tool's own frames


def test_the_caller_is_unharmed(tmp_path, make_cfg, monkeypatch):
    import signal

    cwd, env_keys = os.getcwd(), set(os.environ)
    # The private directories THIS test's runs make (another xdist worker's sandbox runs make their
    # own under the same /tmp at the same time, so a listing of /tmp before and after cannot tell).
    made, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])
    signalled = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: signalled.append(a))
    try:
        sb = Sandbox(make_cfg(timeout_s=1, memory_mb=256))
        results = [sb.run_sync(code) for code in (
            "while True: pass", "x = bytearray(2 * 1024**3)",
            "import os, signal; os.kill(os.getppid(), signal.SIGUSR1)",
            "import os; os.chdir('/'); os.environ['PATH'] = ''")]
        # No wait needed for signalled: a signal delivered while run_sync ran has its Python
        # handler run at the next bytecode of this (main) thread, before the asserts below.
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert [r.status for r in results] == ["timeout", "memory", "error", "ok"]
    assert signalled == [] and "os.kill is not allowed" in results[2].stderr
    assert os.getcwd() == cwd and set(os.environ) == env_keys
    big = bytearray(512 * 1024 * 1024)  # our own memory limit is untouched
    assert len(big) == 512 * 1024 * 1024
    del big
    assert ctypes.sizeof(ctypes.c_int) == 4  # and so is ctypes, refused only in the child
    assert len(made) == 4 and all(os.path.basename(d).startswith("rollout-tool-") for d in made), made
    assert not [d for d in made if os.path.exists(d)]  # every private directory was removed


def test_concurrent_runs(make_cfg):
    import asyncio

    sb = Sandbox(make_cfg(timeout_s=10, max_concurrent=3))

    async def main():
        return await asyncio.gather(*(sb.run(f"print({i} * {i})") for i in range(6)))

    results = asyncio.run(main())
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]


def test_unisolated_fallback_refuses_root_unless_allowed(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the refusal is for root")
    with pytest.raises(RuntimeError, match="allow_unisolated_root"):
        Sandbox(SandboxConfig(isolation="none"))
    import rollout.sandbox_bwrap as bw

    monkeypatch.setattr(bw, "bwrap_unusable", lambda user: "bwrap is not installed (simulated)")
    with pytest.raises(RuntimeError, match="simulated"):
        Sandbox(SandboxConfig())  # auto without bwrap: refused too, naming why
    with pytest.raises(RuntimeError, match="isolation=bwrap: bwrap is not installed"):
        Sandbox(SandboxConfig(isolation="bwrap", allow_unisolated_root=True))
    assert Sandbox(SandboxConfig(allow_unisolated_root=True)).isolated is False


def test_an_interpreter_under_the_hosts_tmp_runs_in_bwrap(tmp_path):
    """A venv under /tmp (a checkout there) stays visible: the sandbox's private /tmp is mounted
    before the interpreter's prefix is bound, not over it."""
    if bwrap_unusable("nobody"):
        pytest.skip(bwrap_unusable("nobody"))
    assert str(tmp_path).startswith("/tmp/")
    venv = tmp_path / "venv"
    venv.symlink_to(sys.prefix)  # sys.prefix of a Python started from here is the /tmp path
    code = ("from rollout.config import SandboxConfig\nfrom rollout.sandbox import Sandbox\n"
            "r = Sandbox(SandboxConfig(isolation='bwrap')).run_sync('print(6 * 7)')\n"
            "print(r.status, r.stdout.strip(), r.stderr.strip()[-300:])\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=repo))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["ok", "42"], out.stdout
