"""The RL loop. Launch with torchrun (or slurm/), e.g.

    torchrun --nproc-per-node 2 -m megatron_alp.train --config configs/experiments/tiny_cpu.yaml

One step: rollout (driver, rank 0) -> advantages -> batch to every rank -> optional pi_old and
reference log-probs (unperturbed, no grad) -> mini-batch updates (ALP on inside the update
forward) -> publish the new weights on the bus and commit them to the fleet -> metrics ->
checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Dict

import torch.distributed as dist

from .runtime.distributed import handover_group
from .sync.weight_sync import CommitFailed, WeightSync
from .trainer.batching import dp_balanced_shard
from .trainer.checkpoint import Checkpointer, CheckpointError
from .trainer.evaluation import Evaluator
from .trainer.guard import NonFiniteGuard
from .trainer.monitor import make_monitor, tensorboard_hint
from .trainer.preempt import Abort, RolloutFailure, TrainingStopped, rollout_or_abort
from .trainer.setup import StopFlag, load_and_check, setup
from .trainer.step_metrics import StepClock, step_metrics
from .trainer.updates import run_updates

logger = logging.getLogger("megatron_alp.train")


def train(cfg) -> Dict[str, float]:
    trainer = setup(cfg)
    rank = dist.get_rank()
    checkpoints = Checkpointer(cfg.checkpoint, cfg.run.steps, trainer.run_dir, [trainer.ddp], trainer.optimizer,
                               trainer.layout)
    resumed = checkpoints.resume() or {}
    start, version = resumed.get("step", 0), resumed.get("bus_version", 0)
    monitor = make_monitor(cfg, trainer.run_dir, rank)
    sync = WeightSync(cfg.bus, cfg.rollout, cfg.model, [trainer.ddp], rank)
    guard = NonFiniteGuard(cfg.run.max_nonfinite_steps)
    stop = StopFlag()
    handover = handover_group(cfg.run.rollout_timeout_minutes)  # the batch's own long timeout
    driver = evaluator = None
    last: Dict[str, float] = {}

    def loop_state(next_step: int):  # what a resume needs beyond the model and the optimizer
        return {"bus_version": version, "driver": driver.state_dict(next_step) if rank == 0 else None}

    try:
        engine_path = sync.initial(version, resumed=bool(resumed))  # the engines start on these weights
        if rank == 0:
            driver = _start_driver(cfg, trainer.run_dir, engine_path, sync.engine_start_version,
                                   resumed.get("driver"), monitor)
            evaluator = Evaluator(cfg.eval, cfg.rollout, driver, monitor, trainer.run_dir)
        sync.attach(driver)
        if rank == 0 and start == 0:
            evaluator.maybe_run(0, cfg.run.steps)  # the starting weights (eval.at_start)
        for step in range(start, cfg.run.steps):
            clock = StepClock()
            # 1. rollout on the driver, the batch to every rank (or why not: checkpoint, then stop).
            stopping = stop.any_rank()
            payload = _from_rank0(rollout_or_abort(driver, stop, stopping, step, version) if rank == 0 else None,
                                  group=handover)  # the rollout's own long timeout
            if isinstance(payload, Abort):
                raise payload.error(step, checkpoints.maybe_save(step, loop_state(step), force=True))
            batch, rollout_metrics = payload
            local, sizes = _shard(cfg, trainer, batch)
            with clock.phase("train"):
                # 2. unperturbed no-grad forwards: pi_old (decoupled objectives, mismatch; fused into
                # the first update where it is unperturbed: run.fuse_old_logp), reference.
                # 3. mini-batch updates: staleness grows with each one; token metrics over all of them.
                per_update, step_level = run_updates(cfg, trainer, local, sizes, step)
            guard.update(per_update)
            # 4. publish the new weights (version = number of completed steps) and commit them.
            version = step + 1
            with clock.phase("sync"):
                try:
                    sync_metrics = sync.publish_and_commit(version)
                except CommitFailed as e:  # the step trained: checkpoint it, then one line naming the engines
                    ckpt = checkpoints.maybe_save(step + 1, loop_state(step + 1), force=True)
                    raise RolloutFailure(f"{e} (checkpoint {ckpt})") from None
            # 5. metrics: the trainer's (every stage's) and, on rank 0, the driver's and the loop's.
            metrics = step_metrics(trainer, per_update, step_level, {**rollout_metrics, **sync_metrics}, clock,
                                   float(batch.loss_mask.sum()), bus_version=version,
                                   consecutive_nonfinite=guard.consecutive)
            if rank == 0:
                monitor.log(metrics, step)
                last = metrics
            # 6. checkpoint: every N steps, at the end, on SIGTERM, and before giving up on NaNs.
            stopping = stop.any_rank()
            checkpoints.maybe_save(step + 1, loop_state(step + 1), force=stopping or guard.exhausted)
            if guard.exhausted:
                raise guard.error(checkpoints.root)
            if stopping:
                raise TrainingStopped(stop.signum or 15, f"stopped by signal {stop.signum} after step {step + 1}; "
                                      f"checkpoint in {checkpoints.root}; resume with the same command")
            if rank == 0:  # benchmarks on the committed version (eval.interval, eval.final), after the checkpoint
                evaluator.maybe_run(version, cfg.run.steps)
    finally:
        sync.close()
        if driver is not None:
            driver.close()
        monitor.close()
    if rank == 0 and cfg.logging.tensorboard:
        logger.info("TensorBoard logs: %s  (open with: %s)", f"{trainer.run_dir}/tensorboard",
                    tensorboard_hint(trainer.run_dir))
    return last


def _shard(cfg, trainer, batch):
    """This DP rank's rows: contiguous (padding), or balanced by tokens (packing; then also the
    row count of each mini-batch)."""
    if cfg.run.max_tokens_per_micro_batch > 0:
        return dp_balanced_shard(batch, trainer.dp_rank, trainer.layout.dp, cfg.run.mini_batches_per_step)
    return trainer.shard(batch), None


def _start_driver(cfg, run_dir: str, engine_path: str, engine_version, state, monitor):
    """Rank 0: the rollout driver on engines started from ``engine_path``, resumed from ``state``."""
    from .trainer.driver import RolloutDriver

    driver = RolloutDriver(cfg, run_dir, cfg.model.hf_path, engine_path, engine_version)
    if state:
        driver.load_state_dict(state)
    with open(f"{run_dir}/config.yaml") as f:  # written redacted by setup()
        monitor.text("config", f"```\n{f.read()}\n```")
    return driver


def _from_rank0(obj, group=None):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


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
            print(f"config error: {e}", file=sys.stderr)  # noqa: T201 - the CLI's one line, before any logging
        return 2
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
