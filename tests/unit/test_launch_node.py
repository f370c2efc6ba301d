"""The engine agent's decisions (launch/node.py): with bus.on_engine_failure = drop a dead server is
reported and the others keep serving until none is left; with stop one death ends the agent; after
a step-wide SIGTERM deaths are not failures. torchrun is told not to handle SIGTERM; server commands
run shielded."""

import types

from megatron_alp.launch.node import _EngineWatch, shielded, trainer_argv


def _server(pid, rc=None):
    proc = types.SimpleNamespace(poll=lambda: rc, returncode=rc)
    return types.SimpleNamespace(pid=pid, proc=proc, name=f"engine-{pid}", url=f"http://n:{pid}",
                                 log_path="/nonexistent")


def test_drop_keeps_the_survivors_serving_until_none_is_left(caplog):
    servers = [_server(1, 9), _server(2)]
    w = _EngineWatch(servers, "drop")
    assert w.new_deaths() and w.check(terminating=False) is None and not w.new_deaths()
    assert w.check(terminating=False) is None  # polled again every second: reported once
    assert caplog.text.count("1 of 2 server(s) still serving") == 1
    servers[1].proc.poll = lambda: 1
    assert w.check(terminating=False) == 1  # every server of the node is gone


def test_stop_policy_and_deaths_after_sigterm():
    assert _EngineWatch([_server(1, 9), _server(2)], "stop").check(terminating=False) == 1
    assert _EngineWatch([_server(1, 0), _server(2)], "stop").check(terminating=True) is None
    assert _EngineWatch([_server(1, 0), _server(2, 0)], "drop").check(terminating=True) == 0


def test_commands():
    assert shielded(["/py", "-m", "sglang.launch_server", "--port", "1"]) == \
        ["/py", "-m", "megatron_alp.launch.shield", "-m", "sglang.launch_server", "--port", "1"]
    assert shielded(["/bin/server", "-x"])[:2] == ["bash", "-c"] and shielded(["/bin/server", "-x"])[-2:] == \
        ["/bin/server", "-x"]
    spec = {"trainer": {"nodes": ["a", "b"], "procs_per_node": 8, "master_addr": "a", "master_port": 29500,
                        "args": ["--config", "j.yaml"]}}
    argv = trainer_argv(spec, "b")
    assert "--node-rank=1" in argv and argv[-2:] == ["--config", "j.yaml"]
