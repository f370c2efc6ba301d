"""The trainer's entry point. Launch with torchrun (or slurm/), e.g.

    torchrun --nproc-per-node 2 -m megatron_alp.train --config configs/experiments/tiny_cpu.yaml

The loop itself is :func:`megatron_alp.trainer.loop.train`. This module imports neither torch nor
Megatron-Core: a bad config is refused before they load, and the reward pool's worker processes
(``spawn``: each one imports the launching module, ``megatron_alp.train``, as its ``__mp_main__``)
do not import the trainer.
"""

from __future__ import annotations

import argparse
import logging
import os

from .runtime.command_output import command_logger
from .trainer.config_check import load_and_check

logger = logging.getLogger("megatron_alp.train")


def quiet_third_party() -> None:
    """Megatron logs every parameter name at INFO and warns once per module that Apex/TE are
    absent (expected on CPU): keep the terminal to our one line per step."""
    import warnings

    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="megatron-alp RL trainer (launch with torchrun)")
    parser.add_argument("--config", default=None, help="YAML config (with includes)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_third_party()
    _die_with_torchrun()
    try:
        cfg = load_and_check(args.config, args.overrides)
    except ValueError as e:  # ConfigError included: one line, once (rank 0), no traceback
        if os.environ.get("RANK", "0") == "0":
            command_logger("train").error("config error: %s", e)  # one line on stderr, no timestamp
        return 2
    import torch.distributed as dist

    from .trainer.checkpoint import CheckpointError
    from .trainer.loop import train
    from .trainer.preempt import RolloutFailure, TrainingStopped

    code = 0
    try:
        train(cfg)
    except TrainingStopped as e:  # checkpointed, engines stopped; every rank has the same message
        if dist.get_rank() == 0:
            logger.warning("%s", e)
        code = 128 + e.signum
    except (RolloutFailure, CheckpointError) as e:
        if dist.get_rank() == 0:
            logger.error("%s", e)
        code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def _die_with_torchrun() -> None:
    """Under torchrun, a SIGKILLed agent must not leave this worker (and, through the engines' own
    PR_SET_PDEATHSIG, its engines) running: the kernel kills us when our parent dies."""
    from rollout.engines.processes import set_parent_death_signal

    if "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != 1:
        set_parent_death_signal(expected_parent=os.getppid())


if __name__ == "__main__":
    raise SystemExit(main())
