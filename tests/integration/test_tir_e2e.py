"""Multi-turn tool-integrated reasoning end to end on CPU (configs/experiments/tir_tiny_cpu.yaml).

A tiny model warm-started on the scripted multiply-with-Python task (megatron_alp/demo/tir_task.py)
calls the tool through the local engine and the real sandbox; rewards come from verl-format data
(``reward_model.ground_truth``) through the math reward in worker processes. Checked: the trainer's
batch masks exactly the observation tokens, and a Seq-ALP run trains with non-zero tool-use
metrics in TensorBoard.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_alp.config.loader import CONFIG_ROOT

REPO = os.path.dirname(str(CONFIG_ROOT))
CONFIG = str(CONFIG_ROOT / "experiments" / "tir_tiny_cpu.yaml")

# The fixture warm-starts and converts a model (about a minute on 2 free cores, far more on a loaded
# machine): a longer limit than the suite's default 600 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_alp.demo.tir_task import prepare_tir_assets

    reuse = os.environ.get("ALP_TIR_ASSETS")  # a folder `python -m megatron_alp.demo.tir_task` wrote
    if reuse:
        return {"hf": os.path.join(reuse, "hf_warm"), "mcore": os.path.join(reuse, "mcore"),
                "data": os.path.join(reuse, "train.parquet")}
    return prepare_tir_assets(str(tmp_path_factory.mktemp("tir")), warm_steps=200)


def _overrides(assets, out):
    return [f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}",
            f"rollout.data.path={assets['data']}", f"run.output_root={out}", f"bus.dir={os.path.join(out, 'bus')}"]


def test_trainer_batch_masks_exactly_the_tool_output(assets, tmp_path):
    from megatron_alp.config import load_config
    from megatron_alp.trainer.driver import RolloutDriver
    from rollout.tir import OBS_MARKER

    cfg = load_config(CONFIG, _overrides(assets, str(tmp_path)))
    driver = RolloutDriver(cfg, str(tmp_path), assets["hf"], assets["hf"])
    try:
        batch, metrics = driver.rollout(step=0, weight_version=0)
    finally:
        driver.close()
    tok = driver.tokenizer
    n_obs = 0
    for i in range(len(batch)):
        ids, mask = batch.tokens[i].tolist(), batch.loss_mask[i].tolist()
        start = next(j for j, m in enumerate(mask) if m > 0)  # the first response token
        end = max(j for j, m in enumerate(mask) if m > 0) + 1
        masked = [t for j, t in enumerate(ids[start:end], start) if mask[j] == 0]
        text = tok.decode(masked)
        # every masked response token is tool output: "\nCode execution result: ...\n" blocks only
        assert text.count(OBS_MARKER) == text.count("\n" + OBS_MARKER)
        assert not masked or text.startswith("\n" + OBS_MARKER)
        assert OBS_MARKER not in tok.decode([t for j, t in enumerate(ids[start:end], start) if mask[j] > 0])
        n_obs += len(masked)
        assert batch.rollout_logp[i][[j for j in range(start, end) if mask[j] == 0]].abs().sum() == 0
    assert n_obs > 0 and metrics["rollout/obs_tokens_mean"] == pytest.approx(n_obs / len(batch))
    assert metrics["rollout/tool_calls_mean"] > 0 and metrics["rollout/tool_status_ok"] > 0
    assert metrics["rollout/reward_mean"] > 0, metrics  # verl labels reached the math reward


def test_seq_alp_multi_turn_trains_with_the_tool(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "megatron_alp.train", "--config", CONFIG, *_overrides(assets, out), "run.name=tir"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    acc = EventAccumulator(os.path.join(out, "tir", "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    scal = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    for key in ("rollout/tool_calls_mean", "rollout/turns_mean", "rollout/obs_tokens_mean",
                "rollout/tool_status_ok", "rollout/final_answer_frac", "train/loss", "alp/sigma_mean"):
        assert key in scal and len(scal[key]) == 2, key
    assert all(v > 0 for v in scal["rollout/tool_calls_mean"]) and all(v > 1 for v in scal["rollout/turns_mean"])
    assert all(v > 0 for v in scal["rollout/obs_tokens_mean"]) and all(v > 0 for v in scal["rollout/tool_status_ok"])
    assert max(scal["rollout/reward_mean"]) > 0 and scal["rollout/reward_timeouts"] == [0.0, 0.0]
    assert scal["train/bus_version"][-1] == 2
