"""Everything the RL loop needs before its first step, built from the config.

Bad configs fail in :func:`load_and_check` (``config_check.py``) before any process does heavy work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from ..config import Config, dump_yaml
from ..model.alp import alp_block_spec
from ..model.builder import build_gpt_model
from ..runtime.device import any_rank
from ..runtime.distributed import Layout, init_distributed, init_parallel_state
from .actor import Actor
from .batching import dp_shard
from .config_check import _check_output_dirs, load_and_check  # noqa: F401 (re-exported)
from .optim import Optimizer, wrap_ddp

logger = logging.getLogger(__name__)


def redacted(cfg: Config) -> Config:
    """The config as written to the run directory and TensorBoard: secrets replaced."""
    import copy

    out = copy.deepcopy(cfg)
    if out.rollout.api_key:
        out.rollout.api_key = "<redacted>"
    return out


@dataclass
class Trainer:
    """This rank's share of the trainer: the model, its optimizer, and the actors that use them."""

    layout: Layout
    dp_rank: int  # this rank's data-parallel coordinate
    run_dir: str
    model: torch.nn.Module  # this rank's GPTModel chunk (unwrapped)
    ddp: torch.nn.Module
    optimizer: Optimizer
    actor: Actor
    ref_actor: Optional[Actor]

    def shard(self, batch):
        """This rank's data-parallel share of a full batch."""
        return dp_shard(batch, self.dp_rank, self.layout.dp)


def make_actor(cfg: Config, model_chunks: List, optimizer=None) -> Actor:
    """An :class:`Actor` from the sections of the full config it needs."""
    from .batching import seq_pad_multiple

    return Actor(cfg.algorithm, cfg.run, cfg.alp, model_chunks, optimizer, vocab_size=cfg.model.vocab_size,
                 temperature=cfg.rollout.temperature, pad_multiple=seq_pad_multiple(cfg.parallel, cfg.precision))


def build_model(cfg: Config, alp: bool):
    spec = (lambda c: alp_block_spec(cfg.model, cfg.alp, c)) if alp else None
    return build_gpt_model(cfg.model, cfg.parallel, cfg.precision, block_spec=spec)


def load_initial_weights(cfg: Config, model) -> None:
    """The converted HF model (tools/convert.py hf-to-mcore) when ``checkpoint.load`` names one."""
    if cfg.checkpoint.load is None:
        logger.warning("checkpoint.load is not set: the policy starts from a random init")
        return
    from ..convert import load_megatron_checkpoint
    from ..convert.model_check import check_model_matches_checkpoint

    check_model_matches_checkpoint(cfg.model, cfg.checkpoint.load)
    load_megatron_checkpoint(model, cfg.checkpoint.load)


def setup(cfg: Config) -> Trainer:
    init_distributed(cfg.parallel.pg_timeout_minutes)
    layout = init_parallel_state(cfg.parallel, cfg.model, seed=cfg.run.seed)
    run_dir = cfg.run.output_dir
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        dump_yaml(redacted(cfg), os.path.join(run_dir, "config.yaml"))
    model = build_model(cfg, alp=cfg.alp.enabled)
    load_initial_weights(cfg, model)
    ddp = wrap_ddp(model)
    total = cfg.run.steps * cfg.run.mini_batches_per_step
    optimizer = Optimizer([ddp], cfg.optimizer, precision=cfg.precision.train, alp=cfg.alp, total_steps=total,
                          initial_loss_scale=cfg.precision.initial_loss_scale)
    actor = make_actor(cfg, [ddp], optimizer)
    ref_actor = None
    if cfg.algorithm.kl_coef > 0:
        ref = build_model(cfg, alp=False)
        load_initial_weights(cfg, ref)
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.eval()
        ref_actor = make_actor(cfg, [ref])
    from megatron.core import parallel_state as ps

    return Trainer(layout, ps.get_data_parallel_rank(), run_dir, model, ddp, optimizer, actor, ref_actor)


class Preempted(Exception):
    """Raised in the main thread by a stop signal that arrives while the rollout can be abandoned."""


class StopFlag:
    """Set by SIGTERM/SIGINT (SLURM preemption, Ctrl-C): the loop checkpoints and stops at the next
    step boundary, or at once while :meth:`interruptible` (the rollout: nothing trained yet).
    The engines' own signal handlers are told to leave the stop to us (checkpoint first)."""

    def __init__(self):
        from rollout.engines.processes import leave_signals_to_caller

        self.requested = False
        self.signum: Optional[int] = None
        self._interruptible = False
        leave_signals_to_caller()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (tests)
                pass

    def _handler(self, signum, frame):
        if not self.requested:
            logger.warning("signal %d: checkpointing and stopping (%s)", signum,
                           "abandoning this step's rollout" if self._interruptible else "after this step")
        self.requested, self.signum = True, self.signum or signum
        if self._interruptible:
            self._interruptible = False
            raise Preempted(signum)

    @contextlib.contextmanager
    def interruptible(self):
        """A block a stop signal may abandon (raising :class:`Preempted` inside it)."""
        if self.requested:
            raise Preempted(self.signum)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def any_rank(self) -> bool:
        return any_rank(self.requested)  # a CUDA tensor under NCCL, a CPU one under gloo
