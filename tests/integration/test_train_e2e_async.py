"""End-to-end RL runs on CPU, asynchronous rollout (bound, whole groups, resume)
and pi_old fused into the first update. A module of its own so that
`make test`'s two xdist workers (--dist loadscope: one module per worker at a time) can run it
beside test_train_e2e.py; the runs and helpers are test_train_e2e.py's."""

from __future__ import annotations

import os

import pytest

from .prompts import stream_prompts
from .test_train_e2e import CONFIG, PROMPTS_PER_STEP, _overrides, _scalars, _timing, _train

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_async_rollout_bound_and_resume(assets, tmp_path):
    """max_staleness = 1: every trained sample's version is within 1 of its step, every group is
    whole and from one version, and a run stopped after 1 step and resumed (the prompts drawn ahead
    are drawn and generated again) trains exactly the uninterrupted run's prompts, each once: the
    prompt stream's first 3 x 8 in order (prompts.py; a 3-step run checked once to train exactly
    those, and test_async_fault.py's run trains them through a fault)."""
    from megatron_alp.trainer.group_log import read_group_log

    opts = ("parallel.tp=1", "rollout.max_staleness=1", "checkpoint.save_interval=1")
    _train(assets, str(tmp_path / "b"), "run", 1, *opts, steps=1)
    part = _train(assets, str(tmp_path / "b"), "run", 1, *opts, steps=3)
    log = read_group_log(os.path.join(part, "rollout", "trained_groups.jsonl"))
    assert sorted(log) == [0, 1, 2]
    for step, groups in log.items():
        assert [g["group_id"] for g in groups] == list(range(8)), step
        for g in groups:
            versions = [int(v) for v in g["sample_versions"]]
            assert len(versions) == 8 and len(set(versions)) == 1, (step, g)  # the config's n_samples
            assert 0 <= step - g["version"] <= 1 and g["version"] == versions[0], (step, g)
    scal, hists = _scalars(part)
    assert "rollout/staleness_hist" in hists
    assert max(scal["rollout/staleness_max"]) <= 1 and scal["rollout/stale_regenerated_groups"] == [0.0] * 3
    trained = sorted((s, g["group_id"], g["prompt_index"]) for s, gs in log.items() for g in gs)
    assert trained == stream_prompts(CONFIG, _overrides(assets, str(tmp_path / "b"), "run", *opts), 3,
                                     PROMPTS_PER_STEP)


@pytest.mark.slow
def test_fused_old_logp_leaves_the_run_unchanged(assets, tmp_path):
    """pi_old from the first update's forward (run.fuse_old_logp, the default) instead of the
    separate no-grad pass: every logged scalar of the loop (rewards, losses, ratios, mismatch/)
    is the separate pass's, step after step (the sampled rollouts included)."""
    opts = ("parallel.tp=1", "alp.enabled=false", "algorithm.objective=ppo", "algorithm.recompute_old_logp=true")
    fused = _train(assets, str(tmp_path / "fused"), "run", 1, *opts, "run.fuse_old_logp=true")
    separate = _train(assets, str(tmp_path / "separate"), "run", 1, *opts, "run.fuse_old_logp=false")
    a, _ = _scalars(fused)
    b, _ = _scalars(separate)
    compared = sorted(k for k in a if not _timing(k))
    assert sorted(k for k in b if not _timing(k)) == compared and "mismatch/k3" in compared
    for key in compared:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
