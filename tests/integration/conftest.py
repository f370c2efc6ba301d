"""Fixtures of the end-to-end tests."""

import pytest


@pytest.fixture(scope="session")
def assets(tiny_assets):
    """The session's tiny model, checkpoint and prompts (tests/conftest.py), under the name the
    end-to-end runs use; test_tir_e2e.py defines its own (the TIR task's assets)."""
    return tiny_assets
