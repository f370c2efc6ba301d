"""Engines on ports chosen with free_port: a port taken between choosing it and the server binding
it (another job, a parallel test) makes the start choose new ports instead of failing the run."""

from __future__ import annotations

import socket
import sys

import pytest

from rollout.engines.processes import LaunchError, ServerProcess, free_port, start_on_free_ports


def _http_server(port: int, log_path: str) -> ServerProcess:
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path, name="http", health_path="/")


def test_a_taken_port_is_chosen_again(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    first = iter([taken.getsockname()[1]])  # the first choice is already bound by someone else
    ports = []

    def make():
        ports.append(next(first, None) or free_port())
        return [_http_server(ports[-1], str(tmp_path / "server.log"))]

    try:
        servers = start_on_free_ports(make, timeout_s=60)
        try:
            assert len(ports) == 2 and ports[0] == taken.getsockname()[1] and ports[1] != ports[0]
            assert servers[0].url.endswith(f":{ports[1]}") and servers[0].healthy()
            assert "address already in use" in (tmp_path / "server.log").read_text().lower()
        finally:
            for s in servers:
                s.stop(grace_s=5)
    finally:
        taken.close()


def test_other_failures_are_not_retried(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return [ServerProcess([sys.executable, "-c", "raise SystemExit('bad model path')"], "http://127.0.0.1:9",
                              str(tmp_path / "bad.log"), name="bad")]

    with pytest.raises(LaunchError, match="bad model path"):
        start_on_free_ports(make, timeout_s=30)
    assert len(calls) == 1
