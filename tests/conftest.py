"""Fixtures shared across the test folders."""

import fcntl
import json
import os

import pytest

import megatron_alp  # noqa: F401 - first: installs the jit_fuser hook before a test module imports Megatron


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The tiny HF model (warmed up on the copy task), its Megatron checkpoint and prompts: built
    once per session (about a minute on 2 cores) for every end-to-end test (tests/integration) and
    every SLURM job (tests/slurm: the job script's ALP_TINY_ASSETS folder).

    Under pytest-xdist (`make test` runs two workers) the workers share one copy: the first to get
    here builds it under a file lock in the run's common temporary folder, the others wait for the
    lock and read the paths it recorded (the recipe of pytest-xdist's docs, "Making session-scoped
    fixtures execute only once")."""
    from megatron_alp.demo.assets import prepare_tiny_assets

    def build(out):
        return prepare_tiny_assets(str(out), warm_steps=55, tp=1)

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp("assets"))
    root = tmp_path_factory.getbasetemp().parent  # pytest-N/, above every worker's popen-gwK/
    record = root / "tiny_assets.json"
    with open(root / "tiny_assets.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another worker builds
        if record.exists():
            return json.loads(record.read_text())
        assets = build(root / "tiny_assets")
        record.write_text(json.dumps(assets))
        return assets




def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first (stable otherwise), for `make test`'s two xdist workers.

    With ``--dist loadscope`` each worker takes whole modules from a queue in this order (`make test`
    passes ``--no-loadscope-reorder``: xdist's default sorts modules by their NUMBER of tests, which
    put the few-but-long end-to-end modules last, where one worker ran them alone after the other
    had finished). Longest first keeps both workers busy to the end, and the many short unit
    modules fill the tail. Among the slow modules those that run whole jobs (tests/slurm,
    tests/integration: trainers, engines, SLURM) go first. Only the order changes, never which
    tests run.
    """
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") is not None}

    def rank(item):
        jobs = any(part in ("slurm", "integration") for part in item.path.parts[-3:-1])
        return (item.module.__name__ not in slow, not jobs)

    items.sort(key=rank)  # list.sort is stable: a module's tests keep their order
