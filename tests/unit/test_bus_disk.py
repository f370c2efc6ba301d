"""The disk bus: atomic versions, manifest checksums, ordering, garbage collection, FP8 export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rollout.bus import ChecksumError, DiskBus, VersionError, read_manifest, verify
from rollout.bus.distributed import flatten_bucket, unflatten_bucket
from rollout.bus.fp8 import QUANTIZATION_CONFIG, dequantize, error_bound, quantize_named
from rollout.bus.manifest import CHUNK_BYTES, INDEX, tensor_digest
from rollout.bus.versions import is_older, staleness, staleness_stats


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 40, generator=g).half(),
        "lm_head.weight": torch.randn(50, 16, generator=g),
    }


def test_publish_round_trip_manifest_index_and_buckets(tmp_path):
    bus = DiskBus(str(tmp_path / "bus"), keep=3)
    src = tensors()
    m = bus.publish(1, src.items(), config={"model_type": "qwen2"}, bucket_bytes=4000)
    path = bus.path(1)
    assert bus.versions() == [1] and os.path.basename(path) == "v00000001"
    assert m.total_bytes == sum(t.numel() * t.element_size() for t in src.values())
    assert len(m.files) >= 3  # small buckets -> several shards
    back = {}
    for f in m.files:
        back.update(load_file(os.path.join(path, f)))  # plain safetensors reads our shards
    assert set(back) == set(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
        e = read_manifest(path).tensors[name]
        assert e.shape == list(t.shape) and e.dtype == str(t.dtype)[6:] and e.sha256 == tensor_digest(t)
    index = json.load(open(os.path.join(path, INDEX)))
    assert index["metadata"]["total_size"] == m.total_bytes and set(index["weight_map"]) == set(src)
    assert json.load(open(os.path.join(path, "config.json"))) == {"model_type": "qwen2"}
    assert verify(path).version == 1
    assert not [n for n in os.listdir(path) if n.startswith("part-")]


def test_big_tensor_chunked_digest_matches_a_plain_rehash():
    t = torch.arange(CHUNK_BYTES // 4 * 2 + 3, dtype=torch.float32)  # three chunks
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert tensor_digest(t, pool) == tensor_digest(t)
    t2 = t.clone()
    t2[-1] += 1
    assert tensor_digest(t2) != tensor_digest(t)


def test_corrupted_shard_is_rejected_naming_the_tensor(tmp_path):
    bus = DiskBus(str(tmp_path), keep=3)
    m = bus.publish(1, tensors().items(), bucket_bytes=1)  # one tensor per shard
    bad = "model.layers.0.mlp.down_proj.weight"
    path = os.path.join(bus.path(1), m.tensors[bad].file)
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0xFF  # one flipped bit pattern in the tensor's bytes
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ChecksumError, match="sha256") as err:
        verify(bus.path(1))
    assert err.value.tensor == bad and bad in str(err.value)
    os.remove(path)
    with pytest.raises(ChecksumError, match="missing") as err:
        verify(bus.path(1))
    assert err.value.tensor == bad


def test_out_of_order_versions_are_refused_and_gc_keeps_k(tmp_path):
    bus = DiskBus(str(tmp_path), keep=2)
    for v in (1, 2, 5):
        bus.publish(v, tensors(v).items())
    assert bus.versions() == [2, 5]
    for v in (5, 3, 0):
        with pytest.raises(VersionError, match="not newer"):
            bus.publish(v, tensors().items())
    assert bus.versions() == [2, 5] and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    assert bus.rewind(5) == [5] and bus.latest() == 2
    bus.publish(5, tensors(7).items())
    assert bus.latest() == 5


CRASH = """
import os, sys, torch
from rollout.bus import DiskBus
os.rename = lambda *a: os._exit(3)  # die between the last write and the commit rename
DiskBus(sys.argv[1], keep=3).publish(2, [("w", torch.ones(100, 100))])
"""


def test_crash_between_write_and_rename_leaves_no_visible_version(tmp_path):
    bus = DiskBus(str(tmp_path), keep=3)
    bus.publish(1, tensors().items())
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-v00000002")]
    assert leftovers  # the half-published directory exists, under its temporary name only
    assert os.path.isfile(os.path.join(tmp_path, leftovers[0], "bus-manifest.json"))
    assert bus.versions() == [1] and bus.latest() == 1
    bus.publish(2, tensors(2).items())  # the next attempt succeeds and collects the dead one
    assert bus.versions() == [1, 2] and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_failed_publication_removes_its_staging(tmp_path):
    bus = DiskBus(str(tmp_path), keep=3)

    def bad():
        yield "a", torch.ones(3)
        raise RuntimeError("export blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        bus.publish(1, bad())
    assert os.listdir(tmp_path) == [] and bus.latest() is None


def test_fp8_export_is_within_the_e4m3_bound_and_declares_block_fp8():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 1, 200)  # rows of very different scale
    named = dict(quantize_named([("model.layers.0.mlp.up_proj.weight", w),
                                 ("model.layers.0.input_layernorm.weight", torch.ones(200)),
                                 ("model.embed_tokens.weight", torch.randn(10, 200))]))
    q, s = named["model.layers.0.mlp.up_proj.weight"], named["model.layers.0.mlp.up_proj.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 2)
    assert named["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16  # not a linear
    assert named["model.embed_tokens.weight"].dtype == torch.bfloat16  # outside the layers
    err = (dequantize(q, s) - w).abs()
    bound = error_bound(w, s)
    assert torch.all(err <= bound * (1 + 1e-6) + 1e-12), float((err - bound).max())
    assert float(err.max()) > 0  # it really is quantized
    assert QUANTIZATION_CONFIG["weight_block_size"] == [128, 128] and QUANTIZATION_CONFIG["fmt"] == "e4m3"


def test_flattened_bucket_round_trip_is_aligned():
    named = [("a", torch.ones(3, dtype=torch.float8_e4m3fn)), ("b", torch.arange(5.0)),
             ("c", torch.ones(2, 3, dtype=torch.bfloat16))]
    flat, names, dtypes, shapes = flatten_bucket(named)
    assert names == ["b", "c", "a"] and dtypes == ["float32", "bfloat16", "float8_e4m3fn"]
    back = dict(unflatten_bucket(flat, names, dtypes, shapes))
    for n, t in named:
        assert back[n].dtype == t.dtype and torch.equal(back[n].float(), t.float())


def test_versions_and_staleness():
    assert staleness(7, "5") == 2 and staleness("3", "default") is None
    assert is_older("2", "10") and not is_older("10", "2") and not is_older("0", "default")
    stats = staleness_stats(5, ["5", "4", "4", None])
    assert stats["rollout/staleness_mean"] == pytest.approx(2 / 3) and stats["rollout/staleness_max"] == 1
    assert stats["rollout/staleness_unknown"] == 1
