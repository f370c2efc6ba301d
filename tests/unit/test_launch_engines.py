"""The launcher's rollout side and per-node commands: engine command lines across nodes, the
weights a resumed job's engines start on, the health wait, torchrun's node rank, srun options."""

from __future__ import annotations

import json
import time

import pytest

from megatron_alp.config import load_config
from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.launch.engines_spec import build_engine_spec, engine_start_path, wait_healthy
from megatron_alp.launch.node import gpu_env, trainer_argv
from megatron_alp.launch.srun import srun_command
from megatron_alp.launch.topology import make_plan

EXP = CONFIG_ROOT / "experiments"


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_sglang_engines_over_two_rollout_nodes(tmp_path):
    cfg = load_config(EXP / "train_32b_alp.yaml", ["precision.train=fp32"])
    plan = make_plan(cfg, [f"g{i}" for i in range(4)], 8, trainer_nodes=2)
    spec = build_engine_spec(cfg, plan, "/models/q32", 0, "KEY", str(tmp_path))
    assert sorted(spec) == ["g2", "g3"] and all(len(v) == 2 for v in spec.values())
    cmds = [e["cmd"] for node in ("g2", "g3") for e in spec[node]]
    assert [_flag(c, "--base-gpu-id") for c in cmds] == ["0", "4", "0", "4"]  # GPUs inside each node
    assert [_flag(c, "--random-seed") for c in cmds] == [str(cfg.rollout.seed + k) for k in range(4)]
    assert all(_flag(c, "--host") == "0.0.0.0" for c in cmds)
    # The key is not on any command line (world-readable in /proc): SGLang reads it from a 0600 file.
    assert all("KEY" not in c and _flag(c, "-m") == "megatron_alp.launch.sglang_main" for c in cmds)
    key_file = tmp_path / "api_key"
    assert key_file.read_text() == "KEY" and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert all(e["env"] == {"ROLLOUT_API_KEY_FILE": str(key_file)} for v in spec.values() for e in v)
    assert [e["url"] for e in spec["g3"]] == ["http://g3:30000", "http://g3:30001"] == plan.engine_urls[2:]


def test_local_engine_gets_the_key_from_its_environment(tmp_path):
    cfg = load_config(EXP / "tiny_cpu_slurm.yaml")
    plan = make_plan(cfg, ["n1"], 0, trainer_procs=2, job_id=3)
    [entry] = build_engine_spec(cfg, plan, "/m", 5, "SECRET", str(tmp_path))["n1"]
    assert "SECRET" not in " ".join(entry["cmd"]) and entry["env"] == {"ROLLOUT_API_KEY": "SECRET"}
    assert _flag(entry["cmd"], "--weight-version") == "5" and _flag(entry["cmd"], "--host") == "127.0.0.1"


def _checkpoint(root, step, version):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "rank_00000.pt").write_bytes(b"x" * 8)  # a complete checkpoint: its rank file, of the recorded size
    (d / "meta.json").write_text(json.dumps({"step": step, "bus_version": version, "world_size": 1,
                                             "rank_file_bytes": {"rank_00000.pt": 8}}))
    (root / "latest").write_text(d.name)


def test_resumed_engines_start_on_the_checkpoint_bus_version(tmp_path):
    over = [f"run.output_root={tmp_path}", f"bus.dir={tmp_path}/bus", "model.hf_path=/hf"]
    cfg = load_config(EXP / "tiny_cpu_slurm.yaml", over)
    assert engine_start_path(cfg) == ("/hf", 0)  # fresh run
    _checkpoint(tmp_path / "tiny_cpu_slurm" / "checkpoints", 6, 6)
    assert engine_start_path(cfg) == ("/hf", 0)  # the bus lost version 6: HF weights (warned)
    version = tmp_path / "bus" / "v00000006"
    version.mkdir(parents=True)
    (version / "config.json").write_text("{}")
    assert engine_start_path(cfg) == (str(version), 6)


def test_health_wait_stops_when_the_step_dies():
    t0 = time.monotonic()
    missing = wait_healthy(["http://127.0.0.1:9"], None, timeout_s=60, alive=lambda: False)
    assert missing == ["http://127.0.0.1:9"] and time.monotonic() - t0 < 10


def test_torchrun_rank_comes_from_the_node_name():
    spec = {"trainer": {"nodes": ["a", "b", "c"], "procs_per_node": 8, "master_addr": "a", "master_port": 29511,
                        "args": ["--config", "job.yaml", "run.steps=2"]}}
    argv = trainer_argv(spec, "c")
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=3", "--nproc-per-node=8", "--node-rank=2", "--master-addr=a", "--master-port=29511"} <= set(argv)
    assert argv[-5:] == ["-m", "megatron_alp.train", "--config", "job.yaml", "run.steps=2"]


def test_srun_steps_are_named_and_fail_fast():
    cmd = srun_command("trainer", ["a", "b"], ["python", "x"], extra="--container-image=img:1 --mpi=none")
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd and "--job-name=alp-trainer" in cmd
    assert "--nodelist=a,b" in cmd and "--nodes=2" in cmd and "--ntasks-per-node=1" in cmd
    assert cmd[-4:] == ["--container-image=img:1", "--mpi=none", "python", "x"]


def test_one_gpu_node_is_split_between_trainer_and_engines(monkeypatch):
    cfg = load_config(EXP / "train_7b_alp.yaml", ["precision.train=fp32", "rollout.sglang.tp_size=2"])
    plan = make_plan(cfg, ["g0"], 8, trainer_gpus=4)
    assert (plan.mode, plan.procs_per_node, plan.engines_per_node) == ("shared", 4, 2)
    assert (plan.gpu_slice("trainer"), plan.gpu_slice("engines")) == ([0, 4], [4, 4])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4,5,6,7,8,9")  # the job's GPUs on a shared node
    assert gpu_env(plan.gpu_slice("trainer")) == {"CUDA_VISIBLE_DEVICES": "2,3,4,5"}
    assert gpu_env(plan.gpu_slice("engines")) == {"CUDA_VISIBLE_DEVICES": "6,7,8,9"}
    assert gpu_env(None) == {} and make_plan(cfg, ["a", "b"], 8, trainer_nodes=1).gpu_slice("trainer") is None


def _supervisor(tmp_path, overrides):
    import argparse

    from megatron_alp.launch.plan import JobSpec, check_job
    from megatron_alp.launch.supervisor import Supervisor

    config = str(EXP / "tiny_cpu_slurm.yaml")
    over = [f"run.output_root={tmp_path}", "model.hf_path=/hf", *overrides]
    checked = check_job(JobSpec(config, over, ["n1"], trainer_procs=2, job_id=42, check_paths=False))
    args = argparse.Namespace(config=config, overrides=over)
    return Supervisor(checked, args, "42", "JOBKEY")


def test_job_file_carries_urls_and_key_only_for_engines_we_start(tmp_path):
    import yaml

    sup = _supervisor(tmp_path, [])
    plan = json.load(open(sup.write_files({}, None)))
    job = yaml.safe_load(open(tmp_path / "tiny_cpu_slurm" / "slurm-42" / "job.yaml"))
    assert job["rollout"] == {"urls": sup.c.plan.engine_urls, "api_key": "JOBKEY"}
    assert plan["trainer"]["args"][:2] == ["--config", str(tmp_path / "tiny_cpu_slurm" / "slurm-42" / "job.yaml")]
    attached = _supervisor(tmp_path, ["rollout.urls=[http://e:1]", "rollout.api_key=THEIRS"])
    attached.write_files({}, None)
    job = yaml.safe_load(open(tmp_path / "tiny_cpu_slurm" / "slurm-42" / "job.yaml"))
    assert "rollout" not in job and attached.api_key == "THEIRS"


def test_api_key_per_job(monkeypatch):
    from megatron_alp.launch.supervisor import job_api_key

    monkeypatch.delenv("ALP_API_KEY", raising=False)
    a, b = job_api_key(), job_api_key()
    assert a != b and len(a) >= 24
    monkeypatch.setenv("ALP_API_KEY", "none")
    assert job_api_key() is None
    monkeypatch.setenv("ALP_API_KEY", "mine")
    assert job_api_key() == "mine"


def test_children_of_a_process():
    import subprocess
    import sys

    from megatron_alp.launch.node import children

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import os

        assert child.pid in children(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_sglang_main_reads_the_key_from_its_file(tmp_path, monkeypatch):
    import sys

    from megatron_alp.launch import sglang_main

    key = tmp_path / "api_key"
    key.write_text("K123\n")
    assert sglang_main.key_args({"ROLLOUT_API_KEY_FILE": str(key)}) == ["--api-key", "K123"]
    assert sglang_main.key_args({"ROLLOUT_API_KEY": "E1"}) == ["--api-key", "E1"]
    assert sglang_main.key_args({}) == []
    with pytest.raises(SystemExit, match="ROLLOUT_API_KEY_FILE=.*missing.*cannot read"):
        sglang_main.key_args({"ROLLOUT_API_KEY_FILE": str(tmp_path / "missing")})
    ran = {}
    monkeypatch.setattr(sglang_main.runpy, "run_module", lambda name, **kw: ran.update(name=name, argv=sys.argv))
    monkeypatch.setattr(sys, "argv", ["x", "--port", "1"])
    monkeypatch.setenv("ROLLOUT_API_KEY_FILE", str(key))
    sglang_main.main()
    assert ran == {"name": "sglang.launch_server", "argv": ["sglang.launch_server", "--port", "1", "--api-key", "K123"]}
    monkeypatch.setattr(sys, "argv", ["x", "--api-key", "visible"])
    with pytest.raises(SystemExit, match="--api-key on the command line"):
        sglang_main.main()
