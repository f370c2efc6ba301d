"""The disk bus: atomic versions, manifest checksums, ordering, garbage collection, FP8 export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rollout.bus import ChecksumError, DiskBus, VersionError, read_manifest, verify
from rollout.bus.disk import iter_verified_files
from rollout.bus.distributed import flatten_bucket, unflatten_bucket
from rollout.bus.fp8 import QUANTIZATION_CONFIG, dequantize, error_bound, quantize_named
from rollout.bus.manifest import CHECKSUMS, CHUNK_BYTES, INDEX, MANIFEST, BusError, tensor_digest
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
        assert e.shape == list(t.shape) and e.dtype == str(t.dtype)[6:] and e.digest == tensor_digest(t)
    assert m.checksum == "xxh3_128" and json.load(open(os.path.join(path, MANIFEST)))["checksum"] == "xxh3_128"
    index = json.load(open(os.path.join(path, INDEX)))
    assert index["metadata"]["total_size"] == m.total_bytes and set(index["weight_map"]) == set(src)
    assert json.load(open(os.path.join(path, "config.json"))) == {"model_type": "qwen2"}
    assert verify(path).version == 1
    assert not [n for n in os.listdir(path) if n.startswith("part-")]


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_big_tensor_chunked_digest_matches_a_plain_rehash(algorithm):
    import hashlib

    import xxhash

    t = torch.arange(CHUNK_BYTES // 4 * 2 + 3, dtype=torch.float32)  # three chunks
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert tensor_digest(t, pool, algorithm) == tensor_digest(t, None, algorithm)
    h = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}[algorithm]
    raw = t.numpy().tobytes()
    tree = h(b"".join(h(raw[i:i + CHUNK_BYTES]).digest() for i in range(0, len(raw), CHUNK_BYTES))).hexdigest()
    assert tensor_digest(t, None, algorithm) == tree
    small = torch.arange(1000, dtype=torch.float32)  # one chunk: the plain hash of the bytes
    assert tensor_digest(small, None, algorithm) == h(small.numpy().tobytes()).hexdigest()
    t2 = t.clone()
    t2[-1] += 1
    assert tensor_digest(t2, None, algorithm) != tensor_digest(t, None, algorithm)


def test_corrupted_shard_is_rejected_naming_the_tensor(tmp_path):
    bus = DiskBus(str(tmp_path), keep=3)
    m = bus.publish(1, tensors().items(), bucket_bytes=1)  # one tensor per shard
    bad = "model.layers.0.mlp.down_proj.weight"
    path = os.path.join(bus.path(1), m.tensors[bad].file)
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0xFF  # one flipped bit pattern in the tensor's bytes
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ChecksumError, match="xxh3_128 checksum") as err:
        verify(bus.path(1))
    assert err.value.tensor == bad and bad in str(err.value)
    os.remove(path)
    with pytest.raises(ChecksumError, match="missing") as err:
        verify(bus.path(1))
    assert err.value.tensor == bad


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_streamed_write_digest_equals_the_tensor_digest(algorithm):
    """The writer hashes each piece as it writes it; the digest must be the verifier's (chunk tree)."""
    from concurrent.futures import ThreadPoolExecutor

    from rollout.bus.manifest import raw_bytes, write_digest

    g = torch.Generator().manual_seed(1)
    with ThreadPoolExecutor(2) as pool:
        for n in (0, 1, 249, 250, 251, 1000, 1234):  # float32: 1000-byte chunks are 250 elements
            t = torch.randn(n, generator=g)
            for piece in (64, 333, 4096):
                out = bytearray()
                d = write_digest(out.extend, raw_bytes(t), algorithm, chunk_bytes=1000, piece_bytes=piece)
                assert bytes(out) == t.numpy().tobytes()
                assert d == tensor_digest(t, None, algorithm, chunk_bytes=1000)
                assert d == tensor_digest(t, pool, algorithm, chunk_bytes=1000)


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_published_big_tensor_digest_matches_the_verifier(tmp_path, algorithm):
    big = torch.randn(CHUNK_BYTES // 4 + 7, generator=torch.Generator().manual_seed(2))  # two chunks
    m = DiskBus(str(tmp_path), checksum=algorithm).publish(1, [("big", big), ("bf", big[:99].bfloat16())])
    assert m.tensors["big"].digest == tensor_digest(big, None, algorithm)
    assert verify(os.path.join(str(tmp_path), "v00000001")).tensors["big"].digest == m.tensors["big"].digest
    bus = DiskBus(str(tmp_path), checksum=algorithm)  # a writer without a hash pool streams: same digests
    staged = bus.stage(2)
    w = bus.writer(staged, "pp0", 1 << 30)
    w.add("big", big)
    entries, _ = w.close()
    assert entries["big"].digest == m.tensors["big"].digest
    bus.finalize(staged, 2, verify_first=True)


def _corrupt(version_dir, manifest, name):
    path = os.path.join(version_dir, manifest.tensors[name].file)
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0x10
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_each_checksum_verifies_and_names_a_corrupted_tensor(tmp_path, algorithm):
    bus = DiskBus(str(tmp_path), keep=3, checksum=algorithm)
    src = tensors()
    m = bus.publish(1, src.items(), bucket_bytes=1)
    on_disk = json.load(open(os.path.join(bus.path(1), MANIFEST)))
    assert on_disk["checksum"] == algorithm and on_disk["checksum_chunk_bytes"] == CHUNK_BYTES
    for name, t in src.items():
        assert on_disk["tensors"][name]["digest"] == tensor_digest(t, None, algorithm)
    assert verify(bus.path(1)).checksum == algorithm
    # a reader configured otherwise (the engine has no bus config) still uses the manifest's algorithm
    other = [a for a in CHECKSUMS if a != algorithm][0]
    assert DiskBus(str(tmp_path), keep=3, checksum=other).versions() == [1]
    assert sum(len(part) for part in iter_verified_files(bus.path(1))) == len(src)
    bad = "model.layers.0.self_attn.q_proj.weight"
    _corrupt(bus.path(1), m, bad)
    with pytest.raises(ChecksumError, match=f"{algorithm} checksum") as err:
        verify(bus.path(1))
    assert err.value.tensor == bad and bad in str(err.value)
    with pytest.raises(ChecksumError) as err:
        for _ in iter_verified_files(bus.path(1)):
            pass
    assert err.value.tensor == bad


@pytest.mark.parametrize("spelling", ["absent", "sha256-tree/16777216"])
def test_old_manifest_without_the_algorithm_is_verified_with_sha256(tmp_path, spelling):
    """Manifests from before ``bus.checksum``: per-tensor ``sha256`` keys, and ``checksum`` either
    missing or the old ``sha256-tree/<chunk>`` spelling."""
    bus = DiskBus(str(tmp_path), keep=3, checksum="sha256")
    src = tensors()
    src["big"] = torch.arange(CHUNK_BYTES // 4 + 5, dtype=torch.float32)  # two chunks: the tree digest
    m = bus.publish(1, src.items(), bucket_bytes=1)
    path = os.path.join(bus.path(1), MANIFEST)
    obj = json.load(open(path))
    del obj["checksum"], obj["checksum_chunk_bytes"]
    if spelling != "absent":
        obj["checksum"] = spelling
    for e in obj["tensors"].values():
        e["sha256"] = e.pop("digest")
    json.dump(obj, open(path, "w"))
    old = verify(bus.path(1))
    assert old.checksum == "sha256" and old.tensors["big"].digest == m.tensors["big"].digest
    bad = "model.embed_tokens.weight"
    _corrupt(bus.path(1), m, bad)
    with pytest.raises(ChecksumError, match="sha256 checksum") as err:
        verify(bus.path(1))
    assert err.value.tensor == bad
    # the same old manifest with xxh3 digests fails: the field's absence means sha256
    for name, e in obj["tensors"].items():
        e["sha256"] = tensor_digest(src[name], None, "xxh3_128")
    json.dump(obj, open(path, "w"))
    with pytest.raises(ChecksumError, match="sha256 checksum"):
        verify(bus.path(1))


def test_unknown_checksum_is_refused(tmp_path):
    with pytest.raises(BusError, match="unknown checksum algorithm 'md5'"):
        DiskBus(str(tmp_path), checksum="md5")
    bus = DiskBus(str(tmp_path))
    bus.publish(1, tensors().items())
    path = os.path.join(bus.path(1), MANIFEST)
    obj = json.load(open(path))
    obj["checksum"] = "blake3"
    json.dump(obj, open(path, "w"))
    with pytest.raises(BusError, match="unknown checksum algorithm 'blake3'"):
        read_manifest(bus.path(1))


def test_parts_hashed_with_another_algorithm_are_refused(tmp_path):
    staged = DiskBus(str(tmp_path), checksum="sha256").stage(1)
    w = DiskBus(str(tmp_path), checksum="sha256").writer(staged, "pp0", 1 << 20)
    w.add("w", torch.ones(4))
    w.close()
    with pytest.raises(BusError, match="same bus.checksum"):
        DiskBus(str(tmp_path), checksum="xxh3_128").finalize(staged, 1)


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
