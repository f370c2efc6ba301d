"""``tools/convert.py`` end to end, as a user runs it (subprocesses; spawned and torchrun worlds).

HF (with tokenizer) -> Megatron at TP=2 with --verify -> HF with --verify and small shards; the
result loads with transformers' Auto classes and computes the source's logits exactly. Bad inputs
fail before any world starts, with exit code 2 and the intended message; --verify beyond --tol
exits 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed.convert_models import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert.py")


def _run(*args, torchrun: int = 0, timeout: int = 300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, TOOL, *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
               TOOL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def cli_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = make_hf_model(str(root / "src"), "qwen2", seed=5, tokenizer=True)
    mcore, hf = str(root / "mcore"), str(root / "hf")
    r1 = _run("hf-to-mcore", "--hf", src, "--out", mcore, "--tp", "2", "--verify", "--no-progress")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _run("mcore-to-hf", "--mcore", mcore, "--out", hf, "--verify", "--max-shard-size", "200KB", "--no-progress")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    return root, src, mcore, hf, r1, r2


def test_cli_round_trip_loads_in_transformers(cli_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, src, mcore, hf, r1, r2 = cli_dirs
    for r in (r1, r2):
        assert re.search(r"verify: max \|d logits\| = \S+, max \|d log-probs\| = \S+.*: OK", r.stdout), r.stdout
    # Megatron side: dist checkpoint + our metadata + the source's config and tokenizer.
    assert {"metadata.json", ".metadata", "megatron_alp_convert.json"} <= set(os.listdir(mcore))
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(os.path.join(mcore, "hf")))
    # HF side: several shards with an index, config.json, tokenizer files.
    files = set(os.listdir(hf))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    with open(os.path.join(hf, "config.json")) as f, open(os.path.join(src, "config.json")) as g:
        assert json.load(f) == json.load(g)
    tok = AutoTokenizer.from_pretrained(hf)
    ids = torch.tensor([tok("Hello, converter!")["input_ids"]])
    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_cli_under_torchrun(cli_dirs):
    root, src, mcore, hf, _, _ = cli_dirs
    out = str(root / "hf-torchrun")
    r = _run("mcore-to-hf", "--mcore", mcore, "--out", out, "--pp", "2", "--no-progress", torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    from tests.distributed.convert_models import read_hf_tensors

    want, got = read_hf_tensors(hf), read_hf_tensors(out)
    assert set(want) == set(got) and all(torch.equal(want[n], got[n]) for n in want)


def test_cli_verify_beyond_tolerance_exits_1(cli_dirs):
    root, src, mcore, _, _, _ = cli_dirs
    r = _run("hf-to-mcore", "--hf", src, "--out", str(root / "tol0"), "--verify", "--tol", "0", "--no-progress")
    diffs = [float(x) for x in re.findall(r"= (\S+),", r.stdout.split("verify:")[1])[:2]]
    assert r.returncode == (0 if max(diffs) == 0 else 1), r.stdout + r.stderr
    assert ("FAILED" in r.stdout) == (r.returncode == 1)


def test_cli_refuses_bad_inputs_before_starting(cli_dirs, tmp_path):
    root, src, mcore, _, _, _ = cli_dirs
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gemma2")))
    os.link(os.path.join(src, "model.safetensors"), bad / "model.safetensors")
    r = _run("hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unsupported model_type 'gemma2'; supported: llama, qwen2, qwen3" in r.stderr, r.stderr
    r = _run("hf-to-mcore", "--hf", src, "--out", mcore)  # not empty
    assert r.returncode == 2 and "is not empty" in r.stderr, r.stderr
    r = _run("mcore-to-hf", "--mcore", mcore, "--out", str(tmp_path / "o3"), "--tp", "4")  # 2 KV heads
    assert r.returncode == 2 and "model.num_query_groups = 2 is not divisible by parallel.tp = 4" in r.stderr, r.stderr
    r = _run("mcore-to-hf", "--mcore", src, "--out", str(tmp_path / "o2"))  # an HF dir is not a Megatron one
    assert r.returncode == 2 and "not a checkpoint written by tools/convert.py" in r.stderr, r.stderr
