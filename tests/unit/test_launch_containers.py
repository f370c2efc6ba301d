"""Container jobs: the supervisor checks and plans a job on a batch host without torch (torch and
Megatron live in the steps' image), every step gets its role's launcher (pyxis srun options or an
apptainer prefix), and SGLang runs on the engine step's Python, not the trainer's."""

import subprocess
import sys

from megatron_alp.config import load_config
from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.launch.engines_spec import build_engine_spec
from megatron_alp.launch.srun import step_launcher
from megatron_alp.launch.topology import make_plan

EXP = CONFIG_ROOT / "experiments"
REPO = str(CONFIG_ROOT.parent)

NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError, as on a batch host without it
from megatron_alp.launch.plan import JobSpec, check_job, render
from megatron_alp.launch.engines_spec import engine_start_path
from megatron_alp.launch import supervisor  # noqa: F401
c = check_job(JobSpec("configs/experiments/train_7b_alp.yaml", [], ["n0", "n1", "n2", "n3"], 8, 2,
                      check_paths=False))
assert c.ok, c.problems
assert engine_start_path(c.cfg) == (c.cfg.model.hf_path, 0)
render(c)
heavy = [m for m in sys.modules if m.split(".")[0] in ("megatron", "transformer_engine", "sglang")]
print("OK", heavy, c.notes[0][:40])
"""


def test_supervisor_plans_a_job_without_torch():
    res = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "OK [] torch is not importable on this host (a", res.stdout


def test_each_role_gets_its_launcher():
    env = {"ALP_SRUN_ARGS": "--mpi=none", "ALP_TRAINER_SRUN_ARGS": "--container-image=/img/train.sqsh",
           "ALP_ENGINE_SRUN_ARGS": "--container-image=/img/sglang.sqsh",
           "ALP_ENGINE_PREFIX": "apptainer exec --nv '/img/sg lang.sif'"}
    assert step_launcher("trainer", env) == ("--mpi=none --container-image=/img/train.sqsh", [])
    assert step_launcher("engine", env) == ("--mpi=none --container-image=/img/sglang.sqsh",
                                            ["apptainer", "exec", "--nv", "/img/sg lang.sif"])
    assert step_launcher("trainer", {"ALP_STEP_PREFIX": "env A=1"}) == ("", ["env", "A=1"])


def test_sglang_runs_on_the_engine_python(tmp_path):
    cfg = load_config(EXP / "train_32b_alp.yaml", ["precision.train=fp32"])
    plan = make_plan(cfg, [f"g{i}" for i in range(4)], 8, trainer_nodes=2)
    spec = build_engine_spec(cfg, plan, "/models/q32", 0, "KEY", str(tmp_path), "/sglang/bin/python")
    assert {e["cmd"][0] for v in spec.values() for e in v} == {"/sglang/bin/python"}
