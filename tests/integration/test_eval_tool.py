"""tools/eval.py end to end: the three kinds of --model PATH, a real local engine, the written
tables against the written samples, and one-line errors for bad input."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rollout.tiny_model import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("eval_tool", os.path.join(ROOT, "tools", "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("hf")), alphabet="digits", seed=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from rollout.rewards.synthetic import synthetic_records

    path = tmp_path_factory.mktemp("data") / "copy.jsonl"
    with open(path, "w") as f:
        for r in synthetic_records(6, "copy", 2, seed=5):
            f.write(json.dumps(r) + "\n")
    return str(path)


def tensors(path):
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def test_hf_and_bus_version_paths(ev, hf_dir, tmp_path):
    from rollout.bus.disk import DiskBus

    assert ev.resolve_model(hf_dir, str(tmp_path)) == hf_dir
    want = tensors(hf_dir)
    bus = DiskBus(str(tmp_path / "bus"), keep=2)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    bus.publish(1, sorted(want.items()), config=config, tokenizer_dir=hf_dir)
    version = bus.path(1)
    assert ev.resolve_model(version, str(tmp_path)) == version  # verified, served as it is
    shard = next(f for f in os.listdir(version) if f.endswith(".safetensors"))
    with open(os.path.join(version, shard), "r+b") as f:  # flip a byte of the last tensor's data
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ev.EvalError, match="failed verification"):
        ev.resolve_model(version, str(tmp_path))
    with pytest.raises(ev.EvalError, match="no such directory"):
        ev.resolve_model(str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(ev.EvalError, match="not an HF checkpoint"):
        ev.resolve_model(str(tmp_path), str(tmp_path))


@pytest.mark.slow
def test_megatron_checkpoint_is_exported_through_convert(ev, hf_dir, tmp_path):
    mcore = str(tmp_path / "mcore")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), "hf-to-mcore", "--hf", hf_dir,
                    "--out", mcore, "--no-progress"], check=True, cwd=ROOT)
    served = ev.resolve_model(mcore, str(tmp_path / "out"))
    assert served == str(tmp_path / "out" / "hf")
    got, want = tensors(served), tensors(hf_dir)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name].float(), t.float()), name  # fp32 round trip is exact


@pytest.mark.slow
def test_cli_on_a_local_engine(ev, hf_dir, bench, tmp_path):
    out = tmp_path / "eval"
    rc = ev.main(["--model", hf_dir, "--data", f"copy={bench}", "--n", "3", "--out", str(out),
                  "rollout.engine=local", "rollout.precision=fp32", "rollout.base_port=0",
                  "rollout.reward=synthetic", "rollout.data.apply_chat_template=false",
                  "eval.prompt_key=prompt", "eval.label_key=answer", "eval.max_new_tokens=3"])
    assert rc == 0
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 6 * 3 and {s["benchmark"] for s in samples} == {"copy"}
    assert all(s["response_tokens"] <= 3 for s in samples)
    row = next(csv.DictReader(open(out / "results.csv")))
    by_problem = {}
    for s in samples:
        by_problem.setdefault(s["problem"], []).append(s["correct"])
    assert int(row["problems"]) == 6 and int(row["samples"]) == 18
    assert float(row["avg@3"]) == pytest.approx(sum(sum(c) / 3 for c in by_problem.values()) / 6)
    assert float(row["pass@3"]) == pytest.approx(sum(any(c) for c in by_problem.values()) / 6)
    trunc = sum(s["finish_reason"] == "length" for s in samples) / 18
    assert float(row["truncation_rate"]) == pytest.approx(trunc)
    assert "| copy | 6 | 18 |" in open(out / "results.md").read()


def test_bad_input_is_one_line(ev, hf_dir, bench, tmp_path, capsys):
    def err(*argv):
        assert ev.main(["--model", hf_dir, "--out", str(tmp_path / "o"), *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return lines[-1]

    assert "no such file" in err("--data", str(tmp_path / "missing.jsonl"))
    assert "pass@k needs 1 <= k <= eval.n = 4" in err("--data", bench, "--n", "4", "eval.pass_k=[8]")
    bad = tmp_path / "math500.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "sol": "1"}) + "\n")
    assert "benchmark 'math500' needs a field for its answer" in err("--data", str(bad), "rollout.engine=local",
                                                              "rollout.base_port=0", "rollout.precision=fp32")
    assert "eval.n must be >= 1" in err("--data", bench, "--n", "0")
