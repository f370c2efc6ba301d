"""End-to-end RL runs on CPU, resume: a run stopped after 1 step and resumed
reproduces the uninterrupted run's later steps, padded and packed. A module of its own so that
`make test`'s two xdist workers (--dist loadscope: one module per worker at a time) can run it
beside test_train_e2e.py; the runs and helpers are test_train_e2e.py's."""

from __future__ import annotations

import pytest

from .test_train_e2e import _assert_same_scalars, _train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("packing", [
    pytest.param(False, id="padded"),
    pytest.param(True, id="packed", marks=pytest.mark.slow),
])
def test_resume_reproduces_uninterrupted_run(assets, tmp_path, packing):
    opts = ["parallel.tp=1"] + (["run.max_tokens_per_micro_batch=48"] if packing else [])
    full = _train(assets, str(tmp_path / "a"), "run", 1, *opts, steps=3)
    part = _train(assets, str(tmp_path / "b"), "run", 1, *opts, steps=1)
    # Same command with more steps: resumes from <run>/checkpoints/latest (step 1, bus version 1).
    part = _train(assets, str(tmp_path / "b"), "run", 1, *opts, steps=3)
    _assert_same_scalars(full, part, resumed_at=1)
