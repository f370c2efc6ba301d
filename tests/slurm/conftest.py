"""Fixtures of the SLURM tests: one real single-node SLURM for the whole session (cluster.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from .cluster import LocalSlurm, unavailable_reason


@pytest.fixture(scope="session")
def slurm():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    root = Path(tempfile.mkdtemp(prefix="alp-slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def job_root(tmp_path_factory) -> Path:
    """Run folders of the test jobs (test_sbatch.py's jobs train on the session's tiny assets;
    test_scale.py's first job makes its own in assets/)."""
    return tmp_path_factory.mktemp("slurm-jobs")
