"""Everything the RL loop needs before its first step, built from the config.

Bad configs fail in :func:`load_and_check` before any process does heavy work.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from ..config import Config, dump_yaml, load_config
from ..model.alp import alp_block_spec
from ..model.builder import build_gpt_model
from ..runtime.distributed import Layout, init_distributed, init_parallel_state, validate_layout
from .actor import Actor
from .batching import dp_shard
from .optim import Optimizer, wrap_ddp

logger = logging.getLogger(__name__)


def load_and_check(config_path: Optional[str], overrides: List[str]) -> Config:
    """Load, validate, and check what the RL loop needs beyond the per-section checks."""
    cfg = load_config(config_path, overrides)
    r, run = cfg.rollout, cfg.run
    if cfg.precision.train in ("bf16", "fp16") and not torch.cuda.is_available():
        # Megatron's mixed-precision optimizer keeps fp32 main weights only for CUDA tensors (it
        # checks param.type() against the torch.cuda.* names); there is no CPU path to fall back to.
        raise ValueError(f"precision.train = {cfg.precision.train} needs a CUDA GPU (Megatron's mixed-precision "
                         f"optimizer accepts CUDA tensors only); train in fp32 on CPU. The rollout precision "
                         f"axis (rollout.precision = bf16 or fp8) works on CPU.")
    n = run.prompts_per_step * r.n_samples
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_layout(cfg.parallel, world, cfg.model)
    per_dp = n // layout.dp if n % layout.dp == 0 else None
    if per_dp is None:
        raise ValueError(f"run.prompts_per_step x rollout.n_samples = {n} sequences do not split over "
                         f"{layout.dp} data-parallel ranks")
    if per_dp % run.mini_batches_per_step:
        raise ValueError(f"{per_dp} sequences per DP rank do not split into run.mini_batches_per_step = "
                         f"{run.mini_batches_per_step} mini-batches")
    per_mini = per_dp // run.mini_batches_per_step
    if per_mini % run.micro_batch_size:
        raise ValueError(f"a mini-batch of {per_mini} sequences per DP rank does not split into "
                         f"run.micro_batch_size = {run.micro_batch_size}")
    if cfg.algorithm.kl_coef > 0 and cfg.checkpoint.load is None:
        logger.warning("algorithm.kl_coef > 0 with a randomly initialised model: the reference is that init")
    if not cfg.model.hf_path and not r.model_path and not r.urls:
        raise ValueError("model.hf_path (HF checkpoint with tokenizer) is needed to start the rollout engines")
    return cfg


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
    return Actor(cfg.algorithm, cfg.run, cfg.alp, model_chunks, optimizer, vocab_size=cfg.model.vocab_size,
                 temperature=cfg.rollout.temperature)


def build_model(cfg: Config, alp: bool):
    spec = (lambda c: alp_block_spec(cfg.model, cfg.alp, c)) if alp else None
    return build_gpt_model(cfg.model, cfg.parallel, cfg.precision, block_spec=spec)


def load_initial_weights(cfg: Config, model) -> None:
    """The converted HF model (tools/convert.py hf-to-mcore) when ``checkpoint.load`` names one."""
    if cfg.checkpoint.load is None:
        logger.warning("checkpoint.load is not set: the policy starts from a random init")
        return
    from ..convert import load_megatron_checkpoint

    load_megatron_checkpoint(model, cfg.checkpoint.load)


def setup(cfg: Config) -> Trainer:
    init_distributed()
    layout = init_parallel_state(cfg.parallel, cfg.model, seed=cfg.run.seed)
    run_dir = cfg.run.output_dir
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        dump_yaml(redacted(cfg), os.path.join(run_dir, "config.yaml"))
    model = build_model(cfg, alp=cfg.alp.enabled)
    load_initial_weights(cfg, model)
    ddp = wrap_ddp(model)
    total = cfg.run.steps * cfg.run.mini_batches_per_step
    optimizer = Optimizer([ddp], cfg.optimizer, precision=cfg.precision.train, alp=cfg.alp, total_steps=total)
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


class StopFlag:
    """Set by SIGTERM/SIGINT (SLURM preemption): the loop checkpoints at the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (tests)
                pass

    def _handler(self, signum, frame):
        logger.warning("signal %d: checkpointing and stopping after this step", signum)
        self.requested = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
