"""The SLURM dry run: the 7B/32B/70B jobs validate without GPUs, impossible topologies are refused
with the numbers, and the memory estimate is what docs/slurm.md writes down."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_alp.config import load_config
from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.launch.memory import model_params
from megatron_alp.launch.plan import JobSpec, check_job
from megatron_alp.launch.topology import TopologyError, make_plan

EXP = CONFIG_ROOT / "experiments"
REPO = CONFIG_ROOT.parent
# config, nodes, trainer nodes, (tp, pp, dp), engines in all, estimated GB per trainer GPU
JOBS = {
    "7b": ("train_7b_alp.yaml", 4, 2, (4, 1, 4), 16, 33.1),
    "32b": ("train_32b_alp.yaml", 8, 4, (8, 1, 4), 8, 48.7),
    "70b": ("train_70b_alp.yaml", 16, 8, (8, 4, 2), 16, 35.5),
}


def _verl_parquet(path, label=True):
    """Two records in verl's layout (chat-message prompt, answer at reward_model.ground_truth)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "data_source": "t",
             "answer": str(i + 1), "reward_model": {"style": "rule", "ground_truth": str(i + 1)}} for i in range(2)]
    if not label:
        for r in rows:
            r.pop("answer")
            r["reward_model"] = {"style": "rule"}
    pq.write_table(pa.Table.from_pylist(rows), str(path))


@pytest.fixture
def paths(tmp_path):
    """Model, converted checkpoint and data that exist (the configs name cluster paths)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (tmp_path / "mcore").mkdir()
    _verl_parquet(tmp_path / "data.parquet")
    # run/bus: a creatable path outside the node-local prefixes (the configs' relative defaults
    # would resolve under the checkout, which CI may place in /tmp). Nothing is created there.
    shared = os.path.join(os.path.expanduser("~"), ".alp-plan-test")
    return [f"model.hf_path={hf}", f"checkpoint.load={tmp_path / 'mcore'}",
            f"rollout.data.path={tmp_path / 'data.parquet'}", f"run.output_root={shared}/runs",
            f"bus.dir={shared}/bus"]


def _write_hf_config(cfg_file, overrides) -> None:
    """The model directory's config.json, built from the job's model section: the trainer refuses
    a model section that differs from it (convert/model_check.py)."""
    import json

    import torch

    from megatron_alp.convert.hf_config import hf_config_for_export

    hf = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.hf_path=")), None)
    if hf and os.path.isdir(hf):
        model = load_config(cfg_file, [o for o in overrides if o.startswith("model.")]).model
        config = hf_config_for_export(model, torch.bfloat16)
        config.pop("eos_token_id", None)  # as a base model's: the stop set must carry the end-of-turn token
        with open(os.path.join(hf, "config.json"), "w") as f:
            json.dump(config, f)


def _spec(name: str, overrides=(), **kw) -> JobSpec:
    cfg, nodes, trainers, *_ = JOBS[name]
    _write_hf_config(EXP / cfg, overrides)
    base = dict(nodes=[f"gpu{i:02d}" for i in range(nodes)], gpus_per_node=8, trainer_nodes=trainers, job_id=1234)
    base.update(kw)
    return JobSpec(str(EXP / cfg), list(overrides), **base)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_cluster_jobs_pass_the_dry_run(name, paths):
    _, nodes, trainers, (tp, pp, dp), engines, gb = JOBS[name]
    c = check_job(_spec(name, paths))
    assert c.ok, c.problems
    p = c.plan
    assert (p.tp, p.pp, p.dp, p.world_size) == (tp, pp, dp, trainers * 8)
    assert p.trainer_nodes == [f"gpu{i:02d}" for i in range(trainers)] and len(p.engine_urls) == engines
    assert p.master_addr == "gpu00" and p.engine_urls[0].startswith(f"http://gpu{trainers:02d}:")
    assert c.trainer_mem.total_gb == pytest.approx(gb, abs=0.1) and c.trainer_mem.total_gb < 72
    assert c.engine_mem.kv_tokens > c.engine_mem.sequence_len


def test_parameter_counts_match_the_published_models():
    counts = {m: model_params(load_config(CONFIG_ROOT / "model" / f"{m}.yaml").model)
              for m in ("qwen2.5-7b", "qwen2.5-32b", "llama3-70b")}
    assert counts == {"qwen2.5-7b": 7_615_616_512, "qwen2.5-32b": 32_763_876_352, "llama3-70b": 70_553_706_496}


def test_missing_paths_are_named():
    c = check_job(_spec("7b"))
    text = "\n".join(c.problems)
    assert not c.ok and "checkpoint.load = checkpoints/qwen2.5-7b-mcore does not exist" in text
    assert "rollout.data.path = data/tir_train.parquet does not exist" in text


def test_node_local_bus_is_refused_on_several_nodes(paths):
    c = check_job(_spec("7b", [*paths, "bus.dir=/tmp/alp-bus"]))
    assert any("bus.dir = /tmp/alp-bus is node-local" in p for p in c.problems)


@pytest.mark.parametrize("overrides, kw, message", [
    (["parallel.tp=16", "model.num_attention_heads=32", "model.num_query_groups=16"], {},
     "parallel.tp = 16 exceeds the 8 trainer GPUs per node"),
    ([], {"trainer_nodes": 3}, "3 trainer node(s) x 8 GPUs/processes = 24 is not divisible by parallel.tp x pp x cp "
                               "= 8 x 4 x 1 = 32"),
    (["rollout.sglang.tp_size=3"], {}, "rollout nodes have 8 GPUs, not a multiple of one engine's "
                                       "rollout.sglang.tp_size x dp_size = 3"),
    ([], {"trainer_nodes": 16}, "trainer nodes = 16 = all 16 nodes leaves no rollout node"),
])
def test_impossible_topology_is_refused_with_the_numbers(overrides, kw, message, paths):
    name = "7b" if "parallel.tp=16" in overrides else "70b"
    with pytest.raises(TopologyError) as e:
        check_job(_spec(name, [*paths, *overrides], **kw))
    assert message in str(e.value)


def test_a_layout_that_does_not_fit_80gb_is_refused(paths):
    c = check_job(_spec("70b", [*paths, "parallel.pp=1", "parallel.recompute=none"]))
    [problem] = [p for p in c.problems if "trainer memory estimate" in p]
    assert "exceeds 72.0 GB usable (90% of 80 GB)" in problem and "parallel.pp" in problem


def test_batch_that_does_not_split_over_dp_is_refused(paths):
    with pytest.raises(ValueError, match="do not split over 16 data-parallel ranks|into run.mini_batches"):
        check_job(_spec("7b", [*paths, "parallel.tp=1", "parallel.sequence_parallel=false",
                               "run.prompts_per_step=3", "rollout.n_samples=5"]))


def test_fp8_sglang_engines_start_on_a_version_0_written_before_them(paths):
    c = check_job(_spec("7b", [*paths, "rollout.precision=fp8"]))
    assert c.ok, c.problems
    assert any("writes bus version 0 (block FP8)" in n for n in c.notes)


def test_one_node_cpu_and_attached_plans():
    cfg = load_config(EXP / "tiny_cpu_slurm.yaml")
    p = make_plan(cfg, ["n1"], 0, trainer_procs=2, job_id=7)
    assert (p.mode, p.world_size, p.engine_bind, p.master_addr) == ("shared", 2, "127.0.0.1", "127.0.0.1")
    assert p.engine_urls == [f"http://127.0.0.1:{20000 + 7 * 8}"] and p.master_port == 29507
    att = make_plan(load_config(EXP / "tiny_cpu_slurm.yaml", ["rollout.urls=[http://e1:30000]"]), ["n1", "n2"], 0,
                    trainer_procs=1)
    assert (att.mode, att.trainer_nodes, att.rollout_nodes, att.engine_urls) == \
        ("attached", ["n1", "n2"], [], ["http://e1:30000"])


def test_shell_dry_run_of_the_7b_script():
    res = subprocess.run(["bash", "slurm/train_7b_alp.sh", "--dry-run", "--no-path-check"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                           "ALP_PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "plan: 4 node(s) x 8 GPUs, mode split" in res.stdout
    assert "world 16 = TP 4 x PP 1 x CP 1 x DP 4 + SP" in res.stdout and "dry run OK" in res.stdout
    outside = subprocess.run(["bash", "slurm/train_7b_alp.sh"], cwd=REPO, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "ALP_PYTHON": sys.executable})
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


def test_plan_shows_the_rollout_staleness(paths):
    from megatron_alp.launch.plan import render

    assert "max_staleness 0 (synchronous)" in render(check_job(_spec("7b", paths)))
    text = render(check_job(_spec("7b", paths + ["rollout.max_staleness=2", "rollout.span_policy=keep"])))
    assert "max_staleness 2 (keep)" in text


def test_dry_run_refuses_missing_labels_and_a_stop_set_without_end_of_turn(paths, tmp_path):
    unlabeled = tmp_path / "unlabeled.parquet"
    _verl_parquet(unlabeled, label=False)
    c = check_job(_spec("7b", [*paths, f"rollout.data.path={unlabeled}"]))
    assert any("rollout.data.label_key = reward_model.ground_truth: 2 of 2 records" in p for p in c.problems)
    c = check_job(_spec("7b", [*paths, "rollout.stop_token_ids=[151643]"]))
    assert any("lacks the chat template's end-of-turn token <|im_end|> (151645)" in p for p in c.problems)
    assert check_job(_spec("7b", paths)).ok
