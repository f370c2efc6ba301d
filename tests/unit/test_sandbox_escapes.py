"""Escapes by code that knows it is sandboxed (issue 16, section 1), each asserted to fail under
bubblewrap isolation. Every escape first disarms the audit hook (it is not the boundary), so what
stops it is the OS isolation. Skipped with the reason where bwrap cannot run here (.ci/run installs it).
"""

import os
import signal
import socket
import threading
import uuid

import pytest

from rollout.config import SandboxConfig
from rollout.sandbox import Sandbox
from rollout.sandbox_bwrap import bwrap_unusable

REASON = bwrap_unusable("nobody")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no OS isolation here: {REASON}")

# Disarms the audit hook completely, as code that knows the sandbox would: empties its deny sets and
# rewrites the hook closure's cells (sockets allowed, every path "inside").
DISARM = """import sys, os, gc
_m = sys.modules['__main__']
_m.DENIED.clear()
_m.PATH_EVENTS.clear()
for _f in gc.get_objects():
    if callable(_f) and getattr(_f, '__name__', '') == 'hook' and getattr(_f, '__closure__', None):
        for _name, _cell in zip(_f.__code__.co_freevars, _f.__closure__):
            if _name == 'block_sockets':
                _cell.cell_contents = False
            if _name == 'inside':
                _cell.cell_contents = lambda p: True
"""


def run(code: str, **kw):
    return Sandbox(SandboxConfig(isolation="bwrap", timeout_s=kw.pop("timeout_s", 20), **kw)).run_sync(DISARM + code)


def test_disarming_the_hook_works_so_the_os_is_what_stops_the_rest():
    # Control: after DISARM the hook refuses nothing (fork, sockets, writes outside the work dir all
    # pass it), so every refusal in the tests below comes from the OS isolation.
    res = run("pid = os.fork()\nif pid == 0:\n    os._exit(7)\n"
              "print('child rc', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
              "import socket\nsocket.socket().close()\nprint('socket made')\n"
              "open('/tmp/outside-work-dir', 'w').write('x')\nprint('tmp written')\n")
    assert res.status == "ok" and "child rc 7" in res.stdout, res
    assert "socket made" in res.stdout and "tmp written" in res.stdout, res


def test_os_system_and_subprocess_cannot_touch_the_host(tmp_path):
    target = tmp_path / "pwned"
    inner = f"open({str(target)!r}, 'w')"
    res = run(f"print('system', os.system('touch {target}'))\n"
              f"import subprocess\n"
              f"r = subprocess.run([sys.executable, '-c', {inner!r}], capture_output=True, text=True)\n"
              f"print('sub', r.returncode, r.stderr[-120:])")
    assert res.status == "ok", res
    assert "system 0" not in res.stdout and "sub 1" in res.stdout  # no shell inside; python cannot reach the path
    assert not target.exists()


def test_posixsubprocess_fork_exec_cannot_touch_the_host(tmp_path):
    target = tmp_path / "pwned"
    code = f"""
import _posixsubprocess, subprocess
exe = sys.executable.encode()
args = [exe, b'-c', {f"open({str(target)!r}, 'w').write('x')".encode()!r}]
r, w = os.pipe()
pid = _posixsubprocess.fork_exec(args, [exe], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w,
                                 True, False, 0, None, None, None, -1, None, False)
print('rc', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    res = run(code)
    assert res.status == "ok", res
    assert "rc 1" in res.stdout and not target.exists()


def test_dir_fd_writes_and_deletes_outside_fail(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    code = f"""
root = os.open('/', os.O_RDONLY)
for name, action in [
    ('write', lambda: os.open({str(tmp_path / 'new.txt')[1:]!r}, os.O_WRONLY | os.O_CREAT, dir_fd=root)),
    ('remove', lambda: os.remove({str(victim)[1:]!r}, dir_fd=root)),
    ('etc', lambda: os.open('etc/evil', os.O_WRONLY | os.O_CREAT, dir_fd=root)),
]:
    try:
        action()
        print('ALLOWED', name)
    except OSError as e:
        print('DENIED', name, e.errno)
"""
    res = run(code)
    assert res.status == "ok", res
    assert res.stdout.count("DENIED") == 3 and "ALLOWED" not in res.stdout
    assert victim.read_text() == "original" and not (tmp_path / "new.txt").exists()
    assert not os.path.exists("/etc/evil")


def test_host_secrets_are_not_readable(monkeypatch):
    monkeypatch.setenv("ALP_TEST_SECRET", "s3cr3t-value")
    code = """
for path in ['/etc/shadow', '/etc/passwd', '/root/.bash_history', '/proc/1/environ', '/proc/self/environ']:
    try:
        data = open(path, 'rb').read()
        print('READ', path, data[:200])
    except OSError as e:
        print('DENIED', path, e.errno)
print('ENV', dict(os.environ))
"""
    res = run(code)
    assert res.status == "ok", res
    assert "s3cr3t-value" not in res.stdout and "ALP_TEST_SECRET" not in res.stdout
    for path in ("/etc/shadow", "/etc/passwd", "/root/.bash_history"):
        assert f"DENIED {path}" in res.stdout
    assert "READ /etc" not in res.stdout and "READ /root" not in res.stdout


def _processes_with(token: str):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_setsid_child_does_not_outlive_the_sandbox():
    import time

    token = f"alp-orphan-{uuid.uuid4().hex}"
    code = f"""
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {token!r}])
    os._exit(0)
os.waitpid(pid, 0)
import time
def alive():
    for p in os.listdir('/proc'):
        try:
            if p.isdigit() and {token!r}.encode() in open(f'/proc/{{p}}/cmdline', 'rb').read():
                return True
        except OSError:
            pass
    return False
deadline = time.monotonic() + 10  # until the grandchild has exec'd (polled, inside the 20 s limit)
while not alive() and time.monotonic() < deadline:
    time.sleep(0.02)
print('grandchild alive:', alive())
"""
    res = run(code)
    assert res.status == "ok" and "grandchild alive: True" in res.stdout, res  # it really was started
    deadline = time.monotonic() + 10
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(token) == []


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    t.join()
    srv.close()


def test_setns_into_the_parents_network_namespace_fails(listener):
    port, accepted = listener
    code = f"""
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
for path in ['/proc/{os.getpid()}/ns/net', '/proc/1/ns/net', '/proc/self/ns/net']:
    try:
        fd = os.open(path, os.O_RDONLY)
        print('setns', path, libc.setns(fd, 0x40000000), ctypes.get_errno())
    except OSError as e:
        print('open failed', path, e.errno)
print('unshare', libc.unshare(0x40000000 | 0x10000000), ctypes.get_errno())
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=2)
    print('CONNECTED')
except OSError as e:
    print('BLOCKED', e)
"""
    res = run(code)
    assert res.status == "ok", res
    assert "CONNECTED" not in res.stdout and "BLOCKED" in res.stdout
    assert "setns /proc/self/ns/net -1 1" in res.stdout  # refused (EPERM) even for its own namespace
    assert f"open failed /proc/{os.getpid()}/ns/net" in res.stdout  # our PID is not even visible
    assert "unshare -1 1" in res.stdout
    assert accepted == []


def test_fork_bomb_is_capped_by_the_process_limit():
    code = """
import time
n = 0
try:
    for _ in range(1000):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print('stopped after', n, 'errno', e.errno)
"""
    res = run(code, max_processes=16, timeout_s=20)
    assert res.status == "ok", res
    n = int(res.stdout.split("stopped after")[1].split()[0])
    assert 0 < n < 16


def test_signals_to_host_processes_and_ptrace_fail():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    try:
        code = f"""
import ctypes, signal
try:
    os.kill({os.getpid()}, signal.SIGUSR1)
    print('SENT')
except OSError as e:
    print('kill failed', e.errno)
libc = ctypes.CDLL(None, use_errno=True)
print('ptrace', libc.ptrace(16, 1, 0, 0), ctypes.get_errno())
"""
        res = run(code)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert res.status == "ok", res
    assert "SENT" not in res.stdout and got == []
    assert "ptrace -1 1" in res.stdout


def test_the_runtime_is_read_only():
    import json as _json

    res = run("import json\nfor p in [json.__file__, sys.executable]:\n"
              "    try:\n        open(p, 'a').write('#')\n        print('WROTE', p)\n"
              "    except OSError as e:\n        print('DENIED', e.errno)\n")
    assert res.status == "ok", res
    assert "WROTE" not in res.stdout and res.stdout.count("DENIED") == 2
    with open(_json.__file__) as f:
        assert not f.read().endswith("#")


def test_work_dir_is_size_capped():
    res = run("try:\n    for i in range(64):\n        open(f'f{i}', 'wb').write(b'x' * (512 << 10))\n"
              "    print('WROTE')\n"
              "except OSError as e:\n    print('DENIED', e.errno)\n", disk_mb=4)
    assert res.status == "ok", res
    assert "DENIED 28" in res.stdout  # ENOSPC

