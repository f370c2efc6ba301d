"""A shielded server keeps SIGTERM ignored although it installs its own handler (as aiohttp's
run_app and uvicorn do), and still stops on SIGINT (the engine agent's stop)."""

import os
import signal
import subprocess
import sys
import textwrap

SERVER = textwrap.dedent("""
    import asyncio, signal
    async def main():
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        how = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: (how.append(s.name), done.set()))
        signal.signal(signal.SIGTERM, lambda *_: how.append("direct"))
        print("ready", flush=True)
        await done.wait()
        print("stopped by", how[0], flush=True)
    asyncio.run(main())
""")


def _ignored(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return bool(mask >> (sig - 1) & 1)


def test_sigterm_stays_ignored_and_sigint_stops(tmp_path):
    (tmp_path / "fake_server.py").write_text(SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_alp.launch.shield", "-m", "fake_server"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert _ignored(proc.pid, signal.SIGTERM) and not _ignored(proc.pid, signal.SIGINT)
        proc.send_signal(signal.SIGTERM)  # discarded by the kernel (ignored)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out.strip() == "stopped by SIGINT" and proc.returncode == 0
