"""Checkpoint robustness: a truncated rank file or a dangling `latest` falls back to the newest
complete checkpoint (never to step 0 over it), and `checkpoint.keep` retention."""

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_alp.trainer.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

LAYOUT = SimpleNamespace(tp=1, pp=1, cp=1, dp=1)


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save(root, step, model, keep=0):
    with torch.no_grad():
        model.weight.fill_(float(step))
    return save_checkpoint(str(root), step, [model], None, {"bus_version": step}, LAYOUT, keep=keep)


def test_save_records_sizes_and_resumes(gloo, tmp_path):
    model = torch.nn.Linear(4, 4)
    path = _save(tmp_path, 2, model)
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["rank_file_bytes"] == {"rank_00000.pt": os.path.getsize(os.path.join(path, "rank_00000.pt"))}
    assert latest_checkpoint(str(tmp_path)) == path
    fresh = torch.nn.Linear(4, 4)
    assert load_checkpoint(path, [fresh], None, LAYOUT)["step"] == 2
    assert torch.equal(fresh.weight, torch.full((4, 4), 2.0))


def test_truncated_rank_file_falls_back_with_a_warning_naming_it(gloo, tmp_path, caplog):
    model = torch.nn.Linear(4, 4)
    older = _save(tmp_path, 1, model)
    newest = _save(tmp_path, 2, model)
    rank_file = os.path.join(newest, "rank_00000.pt")
    with open(rank_file, "r+b") as f:
        f.truncate(os.path.getsize(rank_file) // 2)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(tmp_path)) == older
    assert rank_file in caplog.text and "truncated" in caplog.text


def test_truncated_file_of_an_old_checkpoint_without_sizes_is_detected(gloo, tmp_path):
    model = torch.nn.Linear(4, 4)
    older = _save(tmp_path, 1, model)
    newest = _save(tmp_path, 2, model)
    meta_path = os.path.join(newest, "meta.json")
    meta = json.load(open(meta_path))
    del meta["rank_file_bytes"]  # as written before sizes were recorded
    json.dump(meta, open(meta_path, "w"))
    assert latest_checkpoint(str(tmp_path)) == newest
    rank_file = os.path.join(newest, "rank_00000.pt")
    with open(rank_file, "r+b") as f:
        f.truncate(os.path.getsize(rank_file) - 100)
    assert latest_checkpoint(str(tmp_path)) == older


def test_latest_pointing_to_a_missing_dir_uses_the_newest_complete_one(gloo, tmp_path):
    model = torch.nn.Linear(4, 4)
    _save(tmp_path, 1, model)
    step2 = _save(tmp_path, 2, model)
    (tmp_path / "latest").write_text("step_00000009")
    assert latest_checkpoint(str(tmp_path)) == step2
    (tmp_path / "latest").unlink()  # crash between the rename and the pointer update
    assert latest_checkpoint(str(tmp_path)) == step2


def test_no_complete_checkpoint_refuses_instead_of_starting_over(gloo, tmp_path):
    model = torch.nn.Linear(4, 4)
    only = _save(tmp_path, 1, model)
    os.remove(os.path.join(only, "meta.json"))
    with pytest.raises(CheckpointError, match="meta.json"):
        latest_checkpoint(str(tmp_path))
    assert latest_checkpoint(str(tmp_path / "nothing_here")) is None


def test_keep_retains_the_newest_n(gloo, tmp_path):
    model = torch.nn.Linear(4, 4)
    for step in range(1, 6):
        _save(tmp_path, step, model, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000004", "step_00000005"]
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000005")


def test_keep_never_deletes_the_current_or_counts_broken_or_newer_ones(gloo, tmp_path):
    model = torch.nn.Linear(4, 4)
    for step in (1, 2, 3, 9):
        _save(tmp_path, step, model)
    broken = os.path.join(tmp_path, "step_00000003")
    os.remove(os.path.join(broken, "rank_00000.pt"))
    # Resumed from step 2 (step 9 belongs to another timeline; step 3 is broken): saving step 4 keeps
    # step 4 plus one older complete one; step 9 and the broken step 3 are left alone.
    current = _save(tmp_path, 4, model, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002", "step_00000003", "step_00000004",
                                            "step_00000009"]
    assert prune_checkpoints(str(tmp_path), 1, current) == [os.path.join(tmp_path, "step_00000002")]
    assert prune_checkpoints(str(tmp_path), 0, current) == []
