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

