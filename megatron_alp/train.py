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
import time
from typing import Dict, List

import torch.distributed as dist

from .runtime.distributed import handover_group
from .sync.weight_sync import WeightSync
from .trainer.batching import dp_shard, mini_batches
from .trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .trainer.evaluation import Evaluator
from .trainer.monitor import make_monitor, tensorboard_hint
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
            # 1. rollout on the driver, the batch to every rank.
            payload = [driver.rollout(step, version) if rank == 0 else None]
            dist.broadcast_object_list(payload, src=0, group=handover)
            batch, rollout_metrics = payload[0]
            local = dp_shard(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
            t_train = time.perf_counter()
            # 2. unperturbed no-grad forwards: pi_old (decoupled objectives, mismatch), reference.
            if cfg.algorithm.recompute_old_logp:
                local.old_logp = t.actor.compute_logprobs(local)
            if t.ref_actor is not None:
                local.ref_logp = t.ref_actor.compute_logprobs(local)
            # 3. mini-batch updates: staleness grows with each one.
            per_update: List[Dict] = []
            for k, mb in enumerate(mini_batches(local, cfg.run.mini_batches_per_step)):
                per_update.append(t.actor.train_step(mb, step=step * cfg.run.mini_batches_per_step + k))
            skipped = any(m.get("train/skipped_step", 0) > 0 for m in per_update)
            nonfinite = nonfinite + 1 if skipped else 0
            train_s = time.perf_counter() - t_train
            # 4. publish the new weights (version = number of completed steps) and commit them.
            t_sync = time.perf_counter()
            version = step + 1
            sync_metrics = sync.publish_and_commit(version)
            # 5. metrics: the last pipeline stage's reduced metrics and every stage's sigma to rank 0.
            metrics = merge_step_metrics(per_update, src_rank=_metrics_rank(ps))
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
                meta = {"bus_version": version, "data": driver.stream.state_dict() if rank == 0 else None}
                meta = _from_rank0(meta)
                save_checkpoint(ckpt_root, step + 1, [t.ddp], t.optimizer, meta, t.layout)
            if give_up:
                raise RuntimeError(f"{nonfinite} consecutive non-finite losses (run.max_nonfinite_steps = "
                                   f"{cfg.run.max_nonfinite_steps}); checkpoint saved in {ckpt_root}")
            if stopping:
                logger.warning("stopped by signal after step %d; resume with the same command", step + 1)
                break
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
    cfg = load_and_check(args.config, args.overrides)
    train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
