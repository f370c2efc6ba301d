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


def latest_checkpoint(root: Optional[str]) -> Optional[str]:
    if not root:
        return None
    ptr = os.path.join(root, "latest")
    if not os.path.exists(ptr):
        return None
    with open(ptr) as f:
        path = os.path.join(root, f.read().strip())
    return path if os.path.isdir(path) else None


def save_checkpoint(root: str, step: int, model_chunks: List, optimizer, meta: Dict[str, Any], layout) -> str:
    """Collective: every trainer rank calls it. Returns the checkpoint directory."""
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
    torch.save(state, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        full_meta = dict(meta, step=step, world_size=world,
                         layout={"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp})
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(full_meta, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        logger.info("checkpoint saved: %s", final)
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
    for chunk, sd in zip(model_chunks, state["model"]):
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

    def maybe_save(self, step: int, state: Dict[str, Any], force: bool = False) -> bool:
        """Collective: save after ``step`` completed steps when :meth:`due`. ``state`` is the loop's
        own state (rank 0's copy is saved); returns whether a checkpoint was written."""
        if not self.due(step, force):
            return False
        box = [state]
        dist.broadcast_object_list(box, src=0)
        save_checkpoint(self.root, step, self.chunks, self.optimizer, box[0], self.layout)
        return True
