"""The disk bus at scale (issue 21): finalize requires every stage's part by name, each stage
verifies its own shards, the writer thread overlaps writes with the next bucket, GC runs before a
new version is staged, and a crashed publication's temporary directory is removed on the next start."""

import os

import pytest
import torch

from rollout.bus import ChecksumError, DiskBus, verify
from rollout.bus.disk import verify_part
from rollout.bus.manifest import BusError
from rollout.bus.shards import ShardWriter


def _stage_tensors(stage, seed=0):
    g = torch.Generator().manual_seed(seed + stage)
    return {f"model.layers.{stage}.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
            f"model.layers.{stage}.input_layernorm.weight": torch.randn(16, generator=g).bfloat16()}


def _write_stages(bus, staged, stages, seed=0):
    out = {}
    for s in stages:
        w = bus.writer(staged, f"pp{s}", bucket_bytes=600)
        for n, t in _stage_tensors(s, seed).items():
            w.add(n, t)
        out[s] = w.close()[0]
    return out


def test_a_missing_stage_part_refuses_the_version(tmp_path):
    bus = DiskBus(str(tmp_path / "bus"), keep=2)
    staged = bus.stage(1)
    _write_stages(bus, staged, [0, 2])  # stage 1's writer never finished
    with pytest.raises(BusError, match=r"part of pp1 is missing \(no part-model-pp1.json\)"):
        bus.finalize(staged, 1, parts=["pp0", "pp1", "pp2"])
    assert bus.versions() == []
    _write_stages(bus, staged, [1])
    m = bus.finalize(staged, 1, parts=["pp0", "pp1", "pp2"])
    assert sorted(m.tensors) == sorted(n for s in range(3) for n in _stage_tensors(s))
    verify(bus.path(1))


def test_each_stage_verifies_only_its_own_shards(tmp_path):
    bus = DiskBus(str(tmp_path / "bus"), keep=2)
    staged = bus.stage(1)
    entries = _write_stages(bus, staged, [0, 1])
    verify_part(staged, entries[0], bus.checksum)
    verify_part(staged, entries[1], bus.checksum)
    victim = sorted(e.file for e in entries[1].values())[0]
    with open(os.path.join(staged, victim), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xfe\xfd")
    verify_part(staged, entries[0], bus.checksum)  # stage 0 does not read stage 1's files
    with pytest.raises(ChecksumError):
        verify_part(staged, entries[1], bus.checksum)


def test_background_writer_writes_the_same_shards(tmp_path):
    g = torch.Generator().manual_seed(3)
    src = [(f"t{i}", torch.randn(10 + i, 8, generator=g)) for i in range(7)]
    results = []
    for background in (False, True):
        d = tmp_path / f"bg{int(background)}"
        d.mkdir()
        w = ShardWriter(str(d), "model", bucket_bytes=900, fsync=False, background=background)
        for n, t in src:
            w.add(n, t)
        entries, files = w.close()
        results.append(({n: vars(e) for n, e in entries.items()}, files,
                        {f: (d / f).read_bytes() for f in files}))
    assert results[0] == results[1] and len(results[0][1]) >= 4


def test_gc_runs_before_staging_so_keep_bounds_the_disk(tmp_path):
    bus = DiskBus(str(tmp_path / "bus"), keep=2)
    for v in (1, 2):
        bus.publish(v, _stage_tensors(0, v).items())
    staged = bus.stage(3)
    # While version 3 is written, only keep - 1 = 1 published version is left (the latest).
    assert bus.versions() == [2]
    _write_stages(bus, staged, [0], seed=3)
    bus.finalize(staged, 3, parts=["pp0"])
    assert bus.versions() == [2, 3]
    one = DiskBus(str(tmp_path / "one"), keep=1)
    one.publish(1, _stage_tensors(0).items())
    one.stage(2)
    assert one.versions() == [1]  # never the last complete version


def test_a_crashed_publication_is_removed_on_the_next_start(tmp_path):
    bus = DiskBus(str(tmp_path / "bus"), keep=2)
    bus.publish(1, _stage_tensors(0).items())
    crashed = bus.stage(2)  # a run died here, before finalize
    _write_stages(bus, crashed, [0])
    again = DiskBus(str(tmp_path / "bus"), keep=2)  # the next run
    assert again.remove_stale() == [os.path.basename(crashed)]
    assert not os.path.exists(crashed) and again.versions() == [1]
    assert [n for n in os.listdir(again.root) if n.startswith(".tmp")] == []
