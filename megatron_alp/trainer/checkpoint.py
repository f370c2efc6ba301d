"""Trainer checkpoints that resume bit-for-bit: model (sigma included), optimizer and LR schedule,
every RNG state, step, data position and bus version.

Layout: ``<dir>/step_<N>/rank_<r>.pt`` (one file per trainer rank, the same parallel layout on
resume) plus ``meta.json``; written under ``.tmp-step_<N>`` and renamed once every rank has
written, and ``latest`` updated last, so a crash mid-save never leaves a half checkpoint visible.
To change the layout, export (tools/convert.py) and start a new run from the converted model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..runtime.rng import rng_state, set_rng_state

logger = logging.getLogger(__name__)


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def _step_of(name: str) -> Optional[int]:
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def incomplete_reason(path: str) -> Optional[str]:
    """None when ``path`` is a complete checkpoint, else why not (naming the file).

    Complete: ``meta.json`` parses, and each of its ``world_size`` rank files exists with the
    size recorded at save time (older checkpoints without sizes: a readable zip directory,
    which a truncated ``torch.save`` file lacks).
    """
    import zipfile

    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        return f"{path} does not exist"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        world = int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{meta_path} is missing or unreadable ({e})"
    sizes = meta.get("rank_file_bytes") or {}
    for r in range(world):
        name = f"rank_{r:05d}.pt"
        file = os.path.join(path, name)
        try:
            size = os.path.getsize(file)
        except OSError:
            return f"{file} is missing"
        if name in sizes and size != int(sizes[name]):
            return f"{file} is truncated ({size} bytes, {sizes[name]} written)"
        if name not in sizes:
            try:
                with zipfile.ZipFile(file):
                    pass
            except (zipfile.BadZipFile, OSError) as e:
                return f"{file} is unreadable ({e})"
    return None


def checkpoint_dirs(root: str) -> List[str]:
    """The ``step_<N>`` directories under ``root``, newest step first."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    steps = sorted((s, n) for n in names if (s := _step_of(n)) is not None)
    return [os.path.join(root, n) for _, n in reversed(steps)]


class CheckpointError(RuntimeError):
    """Checkpoints exist under the root but none is complete (refusing to start from step 0 over them)."""


def latest_checkpoint(root: Optional[str]) -> Optional[str]:
    """The checkpoint to resume from: ``latest`` if complete, else the newest complete ``step_<N>``
    (with a warning naming what was skipped and why). None when there is no checkpoint at all;
    :class:`CheckpointError` when there are some but none is complete."""
    if not root:
        return None
    candidates = []
    ptr = os.path.join(root, "latest")
    if os.path.exists(ptr):
        with open(ptr) as f:
            candidates.append(os.path.join(root, f.read().strip()))
    candidates += [d for d in checkpoint_dirs(root) if d not in candidates]
    skipped = []
    for path in candidates:
        reason = incomplete_reason(path)
        if reason is None:
            if skipped:
                logger.warning("checkpoint: skipping %s; resuming from the newest complete one, %s",
                               "; ".join(skipped), path)
            return path
        skipped.append(reason)
    if skipped and any(_step_of(os.path.basename(c)) is not None and os.path.isdir(c) for c in candidates):
        raise CheckpointError(f"no complete checkpoint in {root} ({'; '.join(skipped)}); "
                              f"move it away to start from step 0")
    if skipped:
        logger.warning("checkpoint: %s; no checkpoint to resume from", "; ".join(skipped))
    return None


def prune_checkpoints(root: str, keep: int, current: str) -> List[str]:
    """Delete all but the newest ``keep`` complete checkpoints up to ``current`` (which is always
    kept, as is anything newer than it or not complete: those are not ours to judge). Returns
    the deleted directories."""
    if keep <= 0:
        return []
    cur = _step_of(os.path.basename(current))
    older = [d for d in checkpoint_dirs(root) if d != current and _step_of(os.path.basename(d)) < cur]
    complete = [d for d in older if incomplete_reason(d) is None]
    deleted = complete[keep - 1:]
    for d in deleted:
        shutil.rmtree(d, ignore_errors=True)
        logger.info("checkpoint: removed %s (checkpoint.keep = %d)", d, keep)
    return deleted


def save_checkpoint(root: str, step: int, model_chunks: List, optimizer, meta: Dict[str, Any], layout,
                    keep: int = 0) -> str:
    """Collective: every trainer rank calls it. Returns the checkpoint directory. ``keep`` > 0:
    afterwards remove all but the newest ``keep`` complete checkpoints (:func:`prune_checkpoints`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = _step_dir(root, step)
    tmp = os.path.join(root, f".tmp-step_{step:08d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    dist.barrier()
    state = {
        "model": [c.module.state_dict() if hasattr(c, "module") else c.state_dict() for c in model_chunks],
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "rank": rank,
    }
    rank_file = os.path.join(tmp, f"rank_{rank:05d}.pt")
    torch.save(state, rank_file)
    with open(rank_file, "rb+") as f:
        os.fsync(f.fileno())
    sizes = [None] * world
    dist.all_gather_object(sizes, (os.path.basename(rank_file), os.path.getsize(rank_file)))
    if rank == 0:
        full_meta = dict(meta, step=step, world_size=world, rank_file_bytes=dict(sizes),
                         layout={"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp})
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(full_meta, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        logger.info("checkpoint saved: %s", final)
        prune_checkpoints(root, keep, final)
    dist.barrier()
    return final


def load_checkpoint(path: str, model_chunks: List, optimizer, layout) -> Dict[str, Any]:
    """Restore this rank's state from ``path``; returns the metadata (step, data position, ...)."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    want = {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp}
    if meta.get("layout") != want or meta.get("world_size") != dist.get_world_size():
        raise ValueError(f"checkpoint {path} was written with layout {meta.get('layout')} on "
                         f"{meta.get('world_size')} ranks; this run has {want} on {dist.get_world_size()}")
    state = torch.load(os.path.join(path, f"rank_{dist.get_rank():05d}.pt"), map_location="cpu", weights_only=False)
    for chunk, sd in zip(model_chunks, state["model"], strict=True):
        target = chunk.module if hasattr(chunk, "module") else chunk
        target.load_state_dict(sd)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return meta


class Checkpointer:
    """The checkpoint policy of one run: where checkpoints live, when a step is saved, and resume.

    A step is saved every ``checkpoint.save_interval`` steps, after the last step, and whenever the
    caller forces it (a stop signal, giving up on non-finite losses).
    """

    def __init__(self, checkpoint, total_steps: int, run_dir: str, model_chunks: List, optimizer, layout):
        self.root = checkpoint.dir or os.path.join(run_dir, "checkpoints")
        self.interval = checkpoint.save_interval
        self.keep = checkpoint.keep
        self.total_steps = total_steps
        self.chunks, self.optimizer, self.layout = model_chunks, optimizer, layout

    def resume(self) -> Optional[Dict[str, Any]]:
        """Restore the latest checkpoint, if any; returns its metadata (``step`` and what
        :meth:`maybe_save` was given) or None on a fresh start."""
        path = latest_checkpoint(self.root)
        return load_checkpoint(path, self.chunks, self.optimizer, self.layout) if path else None

    def due(self, step: int, force: bool = False) -> bool:
        """Whether the state after ``step`` completed steps is saved."""
        return force or step == self.total_steps or bool(self.interval and step % self.interval == 0)

    def maybe_save(self, step: int, state: Dict[str, Any], force: bool = False) -> Optional[str]:
        """Collective: save after ``step`` completed steps when :meth:`due`; returns the checkpoint
        directory (None when not due). ``state`` is the loop's own state (rank 0's copy is saved)."""
        if not self.due(step, force):
            return None
        box = [state]
        dist.broadcast_object_list(box, src=0)
        return save_checkpoint(self.root, step, self.chunks, self.optimizer, box[0], self.layout, self.keep)
