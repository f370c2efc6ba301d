"""`slurm/drpo_precision.sh`: each of the 9 cells of the DRPO precision matrix validates with the dry
run (2 nodes x 8 GPUs), by name or by job-array index, each in its own run folder and bus."""

import os
import subprocess

import pytest

from megatron_alp.config.loader import CONFIG_ROOT

REPO = str(CONFIG_ROOT.parent)
CELLS = [(m, p) for m in ("grpo", "dppo", "drpo") for p in ("bf16", "fp8_rollout", "fp8_e2e")]


@pytest.fixture
def paths(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (tmp_path / "mcore").mkdir()
    (tmp_path / "data.parquet").write_text("")
    shared = os.path.join(os.path.expanduser("~"), ".alp-plan-test")  # not a node-local prefix; not created
    return [f"model.hf_path={hf}", f"checkpoint.load={tmp_path / 'mcore'}",
            f"rollout.data.path={tmp_path / 'data.parquet'}", f"run.output_root={shared}/runs"]


def _dry(args, env=None):
    return subprocess.run(["bash", "slurm/drpo_precision.sh", "--dry-run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("method,precision", CELLS)
def test_each_cell_passes_the_dry_run(method, precision, paths):
    res = _dry([method, precision, *paths])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"cell {method} x {precision} (configs/experiments/drpo_precision/{method}_{precision}.yaml)" in res.stdout
    assert "dry run OK" in res.stdout
    assert ("writes bus version 0 (block FP8)" in res.stdout) == precision.startswith("fp8")
    assert f"runs/drpo_precision_{method}_{precision}/bus" in res.stdout or not precision.startswith("fp8")


def test_array_index_and_bad_cells():
    res = _dry([], {"SLURM_ARRAY_TASK_ID": "7", "ALP_PYTHON": "false"})  # stops before Python runs
    assert "DRPO precision cell drpo x fp8_rollout" in res.stdout, res.stdout + res.stderr
    res = _dry(["drpo", "fp16"])
    assert res.returncode == 2 and "no cell 'drpo fp16'" in res.stderr
    res = _dry([])
    assert res.returncode == 2 and "name the cell" in res.stderr
