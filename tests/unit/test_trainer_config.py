"""The trainer refuses bad configs before any heavy work, with messages naming the fields."""

from __future__ import annotations

import pytest
import torch

from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.trainer.setup import load_and_check

DEMO = str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml")
BASE = ["model.hf_path=/nonexistent", "rollout.data.path=/nonexistent"]


def test_demo_config_passes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_and_check(DEMO, BASE)
    assert cfg.alp.enabled and cfg.parallel.tp == 1  # two processes are DP=2 (the demo)


def test_batch_must_split_over_dp_and_micro_batches(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # tp 2 -> dp 2
    tp2 = BASE + ["parallel.tp=2"]
    with pytest.raises(ValueError, match=r"do not split into run.mini_batches_per_step = 3"):
        load_and_check(DEMO, tp2 + ["run.mini_batches_per_step=3"])
    with pytest.raises(ValueError, match=r"run.micro_batch_size = 5"):
        load_and_check(DEMO, tp2 + ["run.micro_batch_size=5"])
    with pytest.raises(ValueError, match=r"world size 3 is not divisible"):
        monkeypatch.setenv("WORLD_SIZE", "3")
        load_and_check(DEMO, tp2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_training_refused_on_cpu(monkeypatch, dtype):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=rf"precision.train = {dtype} needs a CUDA GPU"):
        load_and_check(DEMO, BASE + [f"precision.train={dtype}"])


def test_written_config_hides_the_api_key(tmp_path):
    from megatron_alp.config import dump_yaml, load_config
    from megatron_alp.trainer.setup import redacted

    cfg = load_config(DEMO, BASE + ["rollout.api_key=s3cret-key"])
    dump_yaml(redacted(cfg), tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cret-key" not in text and "<redacted>" in text
    assert cfg.rollout.api_key == "s3cret-key"  # the live config is untouched
