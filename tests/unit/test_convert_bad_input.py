"""tools/convert.py refuses bad input with one line before any worker starts, and an export into
a directory holding an older model never leaves weights transformers would load instead."""

import importlib.util
import os
import shutil

import pytest
import torch

from megatron_alp.convert.hf_io import SINGLE, ShardWriter, finalize_shards
from rollout.tiny_model import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("convert_tool", os.path.join(ROOT, "tools", "convert.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "hf"), num_layers=1, hidden_size=32,
                           intermediate_size=64)


def _one_line_error(convert, capsys, argv, expect):
    code = convert.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err
    return err


@pytest.mark.parametrize("damage", ["empty", "truncated", "header_only"])
def test_damaged_safetensors_is_one_line(convert, capsys, tiny, tmp_path, damage):
    src = str(tmp_path / "src")
    shutil.copytree(tiny, src)
    path = os.path.join(src, SINGLE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate({"empty": 0, "truncated": size - 1000, "header_only": 4}[damage])
    err = _one_line_error(convert, capsys, ["hf-to-mcore", "--hf", src, "--out", str(tmp_path / "o")], path)
    assert ("truncated" in err) or ("empty" in err)


def test_out_that_is_a_file_is_one_line(convert, capsys, tiny, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    _one_line_error(convert, capsys, ["hf-to-mcore", "--hf", tiny, "--out", str(out)], "is not a directory")


@pytest.mark.parametrize("size", ["abc", "0", "-5GB", "GB", "nanMB"])
def test_bad_max_shard_size_is_one_line(convert, capsys, tiny, tmp_path, size):
    _one_line_error(convert, capsys, ["mcore-to-hf", "--mcore", tiny, "--out", str(tmp_path / "o"),
                                      f"--max-shard-size={size}"], "--max-shard-size")


def test_sizes_parse(convert):
    assert convert._size("5GB") == 5 * 2**30 and convert._size(" 1.5 mb ") == int(1.5 * 2**20)
    assert convert._size("1048576") == 2**20


def test_tp_zero_is_one_line(convert, capsys, tiny, tmp_path):
    _one_line_error(convert, capsys, ["hf-to-mcore", "--hf", tiny, "--out", str(tmp_path / "o"), "--tp", "0"],
                    "parallel.tp")


def test_export_over_an_older_model_is_what_transformers_loads(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "out")
    shutil.copytree(tiny, out)  # an older export: model.safetensors (single file)
    new = {k: v + 1.0 for k, v in load_file(os.path.join(tiny, SINGLE)).items()}
    writer = ShardWriter(out, "s0", max_shard_bytes=20_000)
    for name, tensor in new.items():
        writer.add(name, tensor)
    writer.flush()
    assert len(writer.files) > 1
    finalize_shards(out, writer.files)
    assert not os.path.exists(os.path.join(out, SINGLE))
    model = AutoModelForCausalLM.from_pretrained(out)
    got = dict(model.named_parameters())
    for name, tensor in new.items():
        if name in got:
            torch.testing.assert_close(got[name].detach(), tensor, rtol=0, atol=0)
    # A second export with fewer shards leaves none of the first one's behind.
    writer2 = ShardWriter(out, "s1", max_shard_bytes=1 << 30)
    for name, tensor in new.items():
        writer2.add(name, tensor)
    writer2.flush()
    finalize_shards(out, writer2.files)
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_dtype_choices_are_the_worlds(convert):
    from megatron_alp.convert.world import DTYPE_ARGS

    assert sorted(convert.DTYPE_CHOICES) == sorted(DTYPE_ARGS)


def test_bad_input_is_refused_without_importing_torch(tiny, tmp_path):
    """The CLI checks config.json / our metadata and the layout before it imports torch or Megatron
    (3 s of CPU each time otherwise); the names and shapes check (Megatron) comes after them."""
    import json
    import subprocess
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gemma2")))
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{os.path.join(ROOT, 'tools', 'convert.py')!r}, *sys.argv[1:]]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print(code, sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))\n"
    )
    cases = [
        (["hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")], "unsupported model_type 'gemma2'"),
        (["hf-to-mcore", "--hf", tiny, "--out", str(tmp_path / "o"), "--tp", "3"], "parallel.tp = 3"),
        (["mcore-to-hf", "--mcore", tiny, "--out", str(tmp_path / "o")], "not a checkpoint written by"),
    ]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
        assert message in r.stderr and r.stdout.split("\n")[-2] == "2 []", (argv, r.stdout, r.stderr)
