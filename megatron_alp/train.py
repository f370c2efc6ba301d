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
import time
from typing import Dict, List

import torch.distributed as dist

from .runtime.distributed import handover_group
from .sync.weight_sync import WeightSync
from .trainer.batching import dp_shard, mini_batches
from .trainer.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .trainer.evaluation import Evaluator
from .trainer.monitor import make_monitor, tensorboard_hint
from .trainer.preempt import Abort, RolloutFailure, TrainingStopped, rollout_or_abort
from .trainer.setup import StopFlag, load_and_check, setup
from .trainer.step_metrics import merge_step_metrics, sigma_metrics

logger = logging.getLogger("megatron_alp.train")


def train(cfg) -> Dict[str, float]:
    t = setup(cfg)
    ps = t.actor.ps
    rank = dist.get_rank()
    ckpt_root = cfg.checkpoint.dir or f"{t.run_dir}/checkpoints"
    start, version, data_state, nonfinite = 0, 0, None, 0
    resume = latest_checkpoint(ckpt_root)
    if resume:
        meta = load_checkpoint(resume, [t.ddp], t.optimizer, t.layout)
        start, version, data_state = meta["step"], meta["bus_version"], meta.get("data")
    monitor = make_monitor(cfg, t.run_dir, rank)
    driver = evaluator = None
    sync = WeightSync(cfg, t, rank)
    stop = StopFlag()
    handover = handover_group(cfg.run.rollout_timeout_minutes)  # the batch's own long timeout
    last: Dict[str, float] = {}
    try:
        engine_path = sync.initial(version, resumed=bool(resume))  # the engines start on these weights
        if rank == 0:
            from .trainer.driver import RolloutDriver

            driver = RolloutDriver(cfg, t.run_dir, cfg.model.hf_path, engine_path)
            if data_state:
                driver.stream.load_state_dict(data_state)
            with open(f"{t.run_dir}/config.yaml") as f:  # written redacted by setup()
                monitor.text("config", f"```\n{f.read()}\n```")
            evaluator = Evaluator(cfg.eval, cfg.rollout, driver, monitor, t.run_dir)
        sync.attach(driver)
        if rank == 0 and start == 0:
            evaluator.maybe_run(0, cfg.run.steps)  # the starting weights (eval.at_start)
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            # 1. rollout on the driver, the batch to every rank (or why not: checkpoint, then stop).
            stopping = stop.any_rank()
            payload = [rollout_or_abort(driver, stop, stopping, step, version) if rank == 0 else None]
            dist.broadcast_object_list(payload, src=0, group=handover)  # the rollout's own long timeout
            if isinstance(payload[0], Abort):
                raise payload[0].error(step, _save(cfg, t, ckpt_root, step, version, driver, rank))
            batch, rollout_metrics = payload[0]
            local = dp_shard(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
            t_train = time.perf_counter()
            # 2. unperturbed no-grad forwards: pi_old (decoupled objectives, mismatch), reference.
            if cfg.algorithm.recompute_old_logp:
                local.old_logp = t.actor.compute_logprobs(local)
            if t.ref_actor is not None:
                local.ref_logp = t.ref_actor.compute_logprobs(local)
            if cfg.logging.mismatch_metrics:  # mismatch/*: unperturbed pi_old vs mu, never ALP's noise
                local.base_logp = local.old_logp if cfg.algorithm.recompute_old_logp else t.actor.compute_logprobs(local)
            # 3. mini-batch updates: staleness grows with each one.
            per_update: List[Dict] = []
            record: List[Dict] = []
            for k, mb in enumerate(mini_batches(local, cfg.run.mini_batches_per_step)):
                per_update.append(t.actor.train_step(mb, step=step * cfg.run.mini_batches_per_step + k, record=record))
            step_level = t.actor.step_metrics(record)
            del record
            skipped = any(m.get("train/skipped_step", 0) > 0 for m in per_update)
            nonfinite = nonfinite + 1 if skipped else 0
            train_s = time.perf_counter() - t_train
            # 4. publish the new weights (version = number of completed steps) and commit them.
            t_sync = time.perf_counter()
            version = step + 1
            sync_metrics = sync.publish_and_commit(version)
            # 5. metrics: the last pipeline stage's reduced metrics and every stage's sigma to rank 0.
            metrics = merge_step_metrics(per_update, step_level, src_rank=_metrics_rank(ps))
            metrics.update(sigma_metrics(t.model, t.ddp))
            if rank == 0:
                metrics.update(rollout_metrics)
                metrics.update(sync_metrics)
                n_tok = float(batch.loss_mask.sum())
                metrics.update({"perf/train_s": train_s, "perf/sync_s": time.perf_counter() - t_sync,
                                "perf/train_tokens_per_s": n_tok / max(train_s, 1e-9),
                                "perf/step_seconds": time.perf_counter() - t0, "train/bus_version": version,
                                "train/consecutive_nonfinite": nonfinite})
                monitor.log(metrics, step)
                last = metrics
            # 6. checkpoint: every N steps, at the end, on SIGTERM, and before giving up on NaNs.
            give_up = nonfinite >= cfg.run.max_nonfinite_steps
            stopping = stop.any_rank()
            if (cfg.checkpoint.save_interval and (step + 1) % cfg.checkpoint.save_interval == 0) or \
                    step + 1 == cfg.run.steps or stopping or give_up:
                _save(cfg, t, ckpt_root, step + 1, version, driver, rank)
            if give_up:
                raise RuntimeError(f"{nonfinite} consecutive non-finite losses (run.max_nonfinite_steps = "
                                   f"{cfg.run.max_nonfinite_steps}); checkpoint saved in {ckpt_root}")
            if stopping:
                raise TrainingStopped(stop.signum or 15, f"stopped by signal {stop.signum} after step {step + 1}; "
                                      f"checkpoint in {ckpt_root}; resume with the same command")
            if rank == 0:  # benchmarks on the committed version (eval.interval, eval.final), after the checkpoint
                evaluator.maybe_run(version, cfg.run.steps)
    finally:
        sync.close()
        if driver is not None:
            driver.close()
        monitor.close()
    if rank == 0 and cfg.logging.tensorboard:
        logger.info("TensorBoard logs: %s  (open with: %s)", f"{t.run_dir}/tensorboard", tensorboard_hint(t.run_dir))
    return last


def _save(cfg, t, ckpt_root: str, steps_done: int, version: int, driver, rank: int) -> str:
    """Collective checkpoint of ``steps_done`` completed steps (the data position from rank 0)."""
    meta = _from_rank0({"bus_version": version, "data": driver.stream.state_dict() if rank == 0 else None})
    return save_checkpoint(ckpt_root, steps_done, [t.ddp], t.optimizer, meta, t.layout, cfg.checkpoint.keep)


def _metrics_rank(ps) -> int:
    """Global rank of the last pipeline stage's (TP 0, DP 0) rank, which holds the reduced metrics.

    Megatron's default rank order (tp-cp-ep-dp-pp) puts the pipeline dimension outermost, so that
    rank is the first one of the last stage's block of world / pp ranks.
    """
    pp = ps.get_pipeline_model_parallel_world_size()
    return (pp - 1) * (dist.get_world_size() // pp)


def _from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
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
            print(f"config error: {e}", file=sys.stderr)
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
