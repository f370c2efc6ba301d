"""SGLang command lines, and the launcher (health wait, log tail, stop by pid) with fake servers."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rollout.config import RolloutConfig, SGLangConfig
from rollout.engines.processes import LaunchError, ServerProcess, free_port
from rollout.engines.sglang import router_command, sglang_server_command
from rollout.engines.start import local_engine_command, start_engines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A stand-in server: `fake.py MODE --port N ...` (other flags ignored, so it can pose as
# `python -m sglang.launch_server` through rollout.sglang.python).
FAKE = textwrap.dedent('''
    import http.server, sys, time
    args = sys.argv[1:]
    mode = args[0] if args[0] in ("ok", "never", "crash") else "ok"
    port = int(args[args.index("--port") + 1])
    print("fake server starting with", " ".join(args), flush=True)
    for i in range(50):
        print(f"log line {i}", flush=True)
    print("FINAL-MARKER-LINE", flush=True)
    if mode == "crash":
        sys.exit(3)
    if mode == "never":
        time.sleep(3600)
    time.sleep(0.3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    return str(path)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); its state says it is dead
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def test_sglang_command_has_every_configured_flag():
    cfg = RolloutConfig(engine="sglang", precision="fp8", kv_cache_dtype="fp8_e4m3", api_key="secret",
                        seed=7, weight_version="3",
                        sglang=SGLangConfig(python="/py", tp_size=2, dp_size=2, mem_fraction_static=0.8,
                                            deterministic=True, load_format="dummy", enable_memory_saver=True,
                                            extra_args=["--chunked-prefill-size", "4096"]))
    cmd = sglang_server_command(cfg, "/models/qwen", 30005, index=1)
    assert cmd[:3] == ["/py", "-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::1], cmd[4::1], strict=False))  # pairwise: each item with the next
    assert flags["--model-path"] == "/models/qwen" and flags["--port"] == "30005"
    assert flags["--host"] == "127.0.0.1"
    assert flags["--tp-size"] == "2" and flags["--dp-size"] == "2" and flags["--base-gpu-id"] == "4"
    assert flags["--dtype"] == "bfloat16" and flags["--quantization"] == "fp8"
    assert flags["--kv-cache-dtype"] == "fp8_e4m3" and flags["--mem-fraction-static"] == "0.8"
    assert flags["--random-seed"] == "8" and flags["--api-key"] == "secret" and flags["--weight-version"] == "3"
    assert flags["--load-format"] == "dummy"
    assert "--enable-deterministic-inference" in cmd and "--enable-memory-saver" in cmd
    assert cmd[-2:] == ["--chunked-prefill-size", "4096"]


def test_sglang_command_minimal():
    cmd = sglang_server_command(RolloutConfig(engine="sglang", precision="fp32"), "/m", 1)
    assert "--quantization" not in cmd and "--kv-cache-dtype" not in cmd and "--api-key" not in cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--enable-deterministic-inference" not in cmd and "--mem-fraction-static" not in cmd
    router = router_command(RolloutConfig(engine="sglang"), ["http://a:1", "http://b:2"], port=9)
    assert router[1:3] == ["-m", "sglang_router.launch_router"]
    assert router[router.index("--worker-urls") + 1:] == ["http://a:1", "http://b:2"]
    assert router[router.index("--policy") + 1] == "cache_aware"  # multi-turn prefixes stay on one server


def test_local_engine_command():
    cfg = RolloutConfig(precision="fp8", api_key="k")
    cmd = local_engine_command(cfg, "/m", 5)
    assert cmd[1:3] == ["-m", "rollout.engines.local"]
    assert cmd[cmd.index("--precision") + 1] == "fp8" and cmd[cmd.index("--api-key") + 1] == "k"


def test_healthy_server_starts_and_stops_by_pid(fake, tmp_path):
    port = free_port()
    s = ServerProcess([sys.executable, fake, "ok", "--port", str(port)], f"http://127.0.0.1:{port}",
                      str(tmp_path / "ok.log"), name="fake")
    s.start().wait_healthy(timeout_s=20)
    pid = s.pid
    assert not _gone(pid) and s.healthy()
    s.stop()
    assert _gone(pid)


def test_health_timeout_reports_log_tail_and_stops(fake, tmp_path):
    port = free_port()
    log = tmp_path / "never.log"
    s = ServerProcess([sys.executable, fake, "never", "--port", str(port)], f"http://127.0.0.1:{port}",
                      str(log), name="fake")
    s.start()
    with pytest.raises(LaunchError) as err:
        s.wait_healthy(timeout_s=1.5)
    msg = str(err.value)
    assert "not healthy after" in msg and "FINAL-MARKER-LINE" in msg and str(log) in msg
    assert "log line 0\n" not in msg  # only the tail
    assert _gone(s.proc.pid)


def test_server_that_exits_fails_fast_with_tail(fake, tmp_path):
    port = free_port()
    s = ServerProcess([sys.executable, fake, "crash", "--port", str(port)], f"http://127.0.0.1:{port}",
                      str(tmp_path / "crash.log"), name="fake")
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="exited with code 3") as err:
        s.start().wait_healthy(timeout_s=60)
    assert time.monotonic() - t0 < 30 and "FINAL-MARKER-LINE" in str(err.value)


def test_launch_engines_builds_sglang_fleet_through_the_configured_python(fake, tmp_path):
    # rollout.sglang.python = a script that ignores `-m sglang.launch_server` and serves /health
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {fake} ok \"$@\"\n")
    wrapper.chmod(0o755)
    cfg = RolloutConfig(engine="sglang", num_engines=2, base_port=0, startup_timeout_s=30,
                        sglang=SGLangConfig(python=str(wrapper)))
    launched = start_engines(cfg, model_path="/some/model", log_dir=str(tmp_path / "logs"))
    try:
        assert len(launched.urls) == 2 and len(set(launched.urls)) == 2
        assert all(s.healthy() for s in launched.servers)
        first = (tmp_path / "logs" / "engine-0.log").read_text()
        assert "--model-path /some/model" in first and "--tp-size 1" in first
    finally:
        launched.stop()
    assert all(_gone(s.proc.pid) for s in launched.servers)


def test_attach_starts_nothing():
    launched = start_engines(RolloutConfig(urls=["http://10.0.0.1:30000"]))
    assert launched.urls == ["http://10.0.0.1:30000"] and launched.servers == []


def test_sigterm_stops_launched_servers(fake, tmp_path):
    port = free_port()
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(f'''
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from rollout.engines.processes import ServerProcess
        s = ServerProcess([sys.executable, {fake!r}, "ok", "--port", "{port}"], "http://127.0.0.1:{port}",
                          {str(tmp_path / "child.log")!r}).start()
        s.wait_healthy(30)
        open({str(pidfile)!r}, "w").write(str(s.pid))
        time.sleep(120)
    ''')
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.1)
        server_pid = int(pidfile.read_text())
        assert not _gone(server_pid)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not _gone(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(server_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
