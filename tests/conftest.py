"""Fixtures shared across the test folders."""

import pytest


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The tiny HF model (warmed up on the copy task), its Megatron checkpoint and prompts: built
    once per session (about a minute on 2 cores) for every end-to-end test (tests/integration) and
    every SLURM job (tests/slurm: the job script's ALP_TINY_ASSETS folder)."""
    from megatron_alp.demo.assets import prepare_tiny_assets

    return prepare_tiny_assets(str(tmp_path_factory.mktemp("assets")), warm_steps=55, tp=1)
