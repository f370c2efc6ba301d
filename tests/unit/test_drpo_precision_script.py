"""`slurm/drpo_precision.sh`: each of the 9 cells of the DRPO precision matrix validates with the dry
run (2 nodes x 8 GPUs), by name or by job-array index, each in its own run folder and bus."""

import os
import subprocess

import pytest

from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.launch.plan import JobSpec, check_job

REPO = str(CONFIG_ROOT.parent)
CELLS = [(m, p) for m in ("grpo", "dppo", "drpo") for p in ("bf16", "fp8_rollout", "fp8_e2e")]


def _write_hf_config(hf, cfg_file) -> None:
    """config.json of the cells' model (the trainer refuses a model section that differs from it)."""
    import json

    import torch

    from megatron_alp.config import load_config
    from megatron_alp.convert.hf_config import hf_config_for_export

    (hf / "config.json").write_text(json.dumps(hf_config_for_export(load_config(cfg_file).model, torch.bfloat16)))


def _write_data(path) -> None:
    """Two labelled records (the dry run reads the data and refuses records without labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_alp.config import load_config

    d = load_config(CONFIG_ROOT / "experiments" / "drpo_precision" / "base.yaml").rollout.data
    rows = []
    for i in range(2):
        row: dict = {}
        for key, value in ((d.prompt_key, f"What is {i}+1?"), (d.label_key, str(i + 1))):
            *outer, last = key.split(".")
            node = row
            for part in outer:
                node = node.setdefault(part, {})
            node[last] = value
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


@pytest.fixture
def paths(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    _write_hf_config(hf, CONFIG_ROOT / "experiments" / "drpo_precision" / "base.yaml")
    (tmp_path / "mcore").mkdir()
    _write_data(tmp_path / "data.parquet")
    shared = os.path.join(os.path.expanduser("~"), ".alp-plan-test")  # not a node-local prefix; not created
    return [f"model.hf_path={hf}", f"checkpoint.load={tmp_path / 'mcore'}",
            f"rollout.data.path={tmp_path / 'data.parquet'}", f"run.output_root={shared}/runs"]


def _dry(args, env=None):
    return subprocess.run(["bash", "slurm/drpo_precision.sh", "--dry-run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_the_script_plans_every_cell_by_name_and_by_array_index():
    """The command the script runs for each cell (ALP_PYTHON=echo prints it instead of running it)."""
    for i, (method, precision) in enumerate(CELLS):
        for args, env in (([method, precision, "run.steps=5"], {}), (["run.steps=5"], {"SLURM_ARRAY_TASK_ID": str(i)})):
            res = _dry(args, {"ALP_PYTHON": "echo", **env})
            assert res.returncode == 0, res.stderr
            name = f"drpo_precision_{method}_{precision}"
            assert f"cell {method} x {precision}" in res.stdout
            cmd = res.stdout.strip().splitlines()[-1].split()
            assert cmd[:2] == ["-m", "megatron_alp.launch.plan"] and ["--nodes", "2"] == cmd[2:4]
            assert cmd[cmd.index("--config") + 1] == f"configs/experiments/drpo_precision/{method}_{precision}.yaml"
            assert cmd[cmd.index("--trainer-nodes") + 1] == "1" and cmd[cmd.index("--gpus-per-node") + 1] == "8"
            assert cmd[-3:] == [f"run.name={name}", f"bus.dir=runs/{name}/bus", "run.steps=5"]
    res = _dry(["drpo", "fp16"])
    assert res.returncode == 2 and "no cell 'drpo fp16'" in res.stderr
    res = _dry([])
    assert res.returncode == 2 and "name the cell" in res.stderr


@pytest.mark.parametrize("method,precision", CELLS)
def test_each_cell_passes_the_checks(method, precision, paths):
    """What that command checks (plan.check_job), for each cell, in this process."""
    name = f"drpo_precision_{method}_{precision}"
    spec = JobSpec(str(CONFIG_ROOT / "experiments" / "drpo_precision" / f"{method}_{precision}.yaml"),
                   [f"run.name={name}", f"bus.dir=runs/{name}/bus", *paths], ["gpu0", "gpu1"], 8, 1)
    c = check_job(spec)
    assert c.ok, c.problems
    assert c.plan.tp == 2 and c.plan.dp == 4 and len(c.plan.engine_urls) >= 1
    assert any("writes bus version 0" in n for n in c.notes) == precision.startswith("fp8")
    assert any("Transformer Engine" in n for n in c.notes) == (precision == "fp8_e2e")


@pytest.mark.slow
def test_one_cell_end_to_end(paths):
    res = _dry(["drpo", "fp8_e2e", *paths])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "dry run OK" in res.stdout and "runs/drpo_precision_drpo_fp8_e2e/bus" in res.stdout
