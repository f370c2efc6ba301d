"""Bad config input is refused at load with one message naming the field (issue 16, section 4)."""

import os
import subprocess
import sys

import pytest

from megatron_alp.config import ConfigError, load_config
from megatron_alp.config.loader import CONFIG_ROOT

REPO = os.path.dirname(str(CONFIG_ROOT))


@pytest.mark.parametrize("override,field", [
    ("parallel.tp=0", "parallel.tp"),
    ("parallel.pp=-1", "parallel.pp"),
    ("parallel.dp=0", "parallel.dp"),
    ("optimizer.lr=-1e-4", "optimizer.lr"),
    ("optimizer.lr=.nan", "optimizer.lr"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.min_lr=-1e-6", "optimizer.min_lr"),
    ("optimizer.min_lr=1.0", "optimizer.min_lr"),
    ("optimizer.clip_grad=-1", "optimizer.clip_grad"),
    ("optimizer.warmup_steps=-5", "optimizer.warmup_steps"),
    ("optimizer.adam_beta1=1.0", "optimizer.adam_beta1"),
    ("optimizer.adam_beta2=1.5", "optimizer.adam_beta2"),
    ("optimizer.adam_eps=0", "optimizer.adam_eps"),
    ("run.steps=-1", "run.steps"),
    ("run.prompts_per_step=0", "run.prompts_per_step"),
    ("checkpoint.save_interval=-2", "checkpoint.save_interval"),
    ("checkpoint.keep=-1", "checkpoint.keep"),
    ("run.name=../escape", "run.name"),
    ("run.name=a/b", "run.name"),
    ("run.name=..", "run.name"),
    ("run.name=' '", "run.name"),
    ("rollout.temperature=.nan", "rollout.temperature"),
    ("algorithm.kl_coef=.nan", "algorithm.kl_coef"),
    ("alp.sigma_init=.nan", "alp.sigma_init"),
    ("rollout.sandbox.max_processes=0", "rollout.sandbox.max_processes"),
    ("rollout.sandbox.isolation=chroot", "rollout.sandbox.isolation"),
])
def test_refused_naming_the_field(override, field):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert field in str(err.value) and "\n" not in str(err.value)


def test_good_values_still_load():
    cfg = load_config(None, ["optimizer.lr=0", "optimizer.min_lr=0", "run.steps=0", "optimizer.clip_grad=0",
                             "run.name=my-run_1.5", "checkpoint.keep=3"])
    assert cfg.checkpoint.keep == 3 and cfg.run.name == "my-run_1.5"


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optimizer:\n  lr: 1.0e-5\n  clip_grad: 1.0\n  lr: 1.0e-3\nrun:\n  steps: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(line 4; first at line 2\)"):
        load_config(path)
    top = tmp_path / "dup_top.yaml"
    top.write_text("run:\n  steps: 2\nrun:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'run'"):
        load_config(top)


def test_config_error_through_the_entry_point_is_one_line():
    out = subprocess.run([sys.executable, "-m", "megatron_alp.train", "parallel.tp=0"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert lines == ["config error: parallel.tp must be >= 1, got 0"], out.stderr


def test_the_entry_point_module_imports_neither_torch_nor_megatron():
    # The reward pool's spawned workers import the launching module (megatron_alp.train) as their
    # __mp_main__: the trainer's imports there cost each worker seconds of CPU and hundreds of MB.
    code = ("import sys, megatron_alp.train; "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("field", ["run.output_root", "checkpoint.dir", "bus.dir"])
def test_output_dirs_that_are_files_are_refused_at_load(tmp_path, field):
    from megatron_alp.trainer.setup import _check_output_dirs

    target = tmp_path / "a_file"
    target.write_text("x")
    cfg = load_config(None, [f"{field}={target}"])
    with pytest.raises(ValueError, match=f"{field} = .* exists and is not a directory"):
        _check_output_dirs(cfg)
    _check_output_dirs(load_config(None, [f"{field}={tmp_path}"]))  # a directory is fine
