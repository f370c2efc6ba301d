"""`make demo`'s entry point runs end to end (few steps) and its loss falls."""

from __future__ import annotations

from megatron_alp import demo


def test_demo_smoke_runs_and_loss_falls():
    assert demo.main(["--steps", "4", "--tp", "2"]) == 0
