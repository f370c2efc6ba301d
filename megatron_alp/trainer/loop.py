"""The RL loop, one step at a time: rollout (driver, rank 0) -> advantages -> batch to every rank ->
optional pi_old and reference log-probs (unperturbed, no grad) -> mini-batch updates (ALP on inside
the update forward) -> publish the new weights on the bus and commit them to the fleet -> metrics ->
checkpoint. The entry point is :mod:`megatron_alp.train`.
"""

from __future__ import annotations

import logging
from typing import Dict

import torch.distributed as dist

from ..runtime.distributed import handover_group
from ..sync.weight_sync import CommitFailed, WeightSync
from .batching import dp_balanced_shard
from .checkpoint import Checkpointer
from .evaluation import Evaluator
from .guard import NonFiniteGuard
from .monitor import make_monitor, tensorboard_hint
from .preempt import Abort, RolloutFailure, TrainingStopped, rollout_or_abort
from .setup import StopFlag, setup
from .step_metrics import StepClock, step_metrics
from .updates import run_updates

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
    from .driver import RolloutDriver

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
