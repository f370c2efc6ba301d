"""The trainer's config checks beyond each section's own: what the RL loop needs of the whole tree.

No torch or Megatron at import (torch only to ask for CUDA when half precision is asked for): a bad
config is refused in a line before the entry point or a SLURM dry run imports either.
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional

from ..config import Config, load_config
from ..runtime.layout import validate_layout
from ..runtime.placement import check_gpu_placement

logger = logging.getLogger(__name__)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_and_check(config_path: Optional[str], overrides: List[str]) -> Config:
    """Load, validate, and check what the RL loop needs beyond the per-section checks."""
    cfg = load_config(config_path, overrides)
    r, run = cfg.rollout, cfg.run
    if cfg.precision.train in ("bf16", "fp16") and not _cuda():
        # Megatron's mixed-precision optimizer keeps fp32 main weights only for CUDA tensors (it
        # checks param.type() against the torch.cuda.* names); there is no CPU path to fall back to.
        raise ValueError(f"precision.train = {cfg.precision.train} needs a CUDA GPU (Megatron's mixed-precision "
                         f"optimizer accepts CUDA tensors only); train in fp32 on CPU. The rollout precision "
                         f"axis (rollout.precision = bf16 or fp8) works on CPU.")
    n = run.prompts_per_step * r.n_samples
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_layout(cfg.parallel, world, cfg.model)
    check_gpu_placement(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
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
    from ..convert.model_check import check_model_matches_checkpoint

    check_model_matches_checkpoint(cfg.model, cfg.checkpoint.load)  # trainer = checkpoint = engine model
    _check_output_dirs(cfg)
    return cfg


def _check_output_dirs(cfg: Config) -> None:
    """Directories the run writes must not be existing files (found now, not at the first save)."""
    for field, path in (("run.output_root", cfg.run.output_root), ("checkpoint.dir", cfg.checkpoint.dir),
                        ("bus.dir", cfg.bus.dir if cfg.bus.backend == "disk" else None)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{field} = {path} exists and is not a directory")
