"""`make demo`: a real (tiny) ALP run on a CPU, from nothing, in a few minutes.

1. make a tiny Qwen2-shaped model with a digits tokenizer (rollout.tiny_model);
2. warm-start it briefly on the synthetic copy task so RL has a signal (demo/warmstart.py);
3. convert it with tools/convert.py (HF -> Megatron distributed checkpoint, TP=2);
4. run Token-ALP with torchrun (2 trainer processes, TP=2 over gloo) against a local rollout
   engine that serves emulated-FP8 weights (configs/experiments/demo_tiny_cpu.yaml);
5. report the reward curve, the held-out evaluation (eval/copy_heldout/avg@4, pass@k) before and
   after training, and where the TensorBoard logs are.

    python -m megatron_alp.demo [--out demo_out] [--steps 30] [overrides ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

from ..config.loader import CONFIG_ROOT
from . import TRAINER_PROCS
from .assets import REPO, run_cmd

logger = logging.getLogger("megatron_alp.demo")


def _series(tb_dir: str):
    """{tag: [(step, value), ...]} of every scalar in the run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its reader logs each file it finishes
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _report_eval(series) -> None:
    """The held-out evaluation before (step 0) and after training (the last evaluated step)."""
    for tag in sorted(t for t in series if t.startswith("eval/") and ("/avg@" in t or "/pass@" in t)):
        points = sorted(series[tag])
        if len(points) >= 2:
            logger.info("%s: before training %.3f -> after %d steps %.3f", tag, points[0][1], points[-1][0],
                        points[-1][1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "demo_out"), help="work directory (recreated)")
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the config's)")
    p.add_argument("--warm-steps", type=int, default=55, help="supervised warm-start steps")
    p.add_argument("--nproc", type=int, default=TRAINER_PROCS, help="trainer processes")
    p.add_argument("--config", default=str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml"))
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for the trainer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.time()
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    from .assets import prepare_tiny_assets

    assets = prepare_tiny_assets(out, warm_steps=args.warm_steps, tp=args.nproc, log=logger.info)
    hf_dir, mcore_dir, data = assets["hf"], assets["mcore"], assets["data"]

    logger.info("[4/5] Token-ALP with a local FP8-emulating rollout engine (torchrun, %d procs)", args.nproc)
    overrides = [f"model.hf_path={hf_dir}", f"checkpoint.load={mcore_dir}", f"rollout.data.path={data}",
                 f"eval.datasets=[copy_heldout={assets['heldout']}]",
                 f"run.output_root={out}", f"bus.dir={os.path.join(out, 'bus')}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
          "-m", "megatron_alp.train", "--config", args.config, *overrides], env=env)

    tb = os.path.join(out, "demo", "tensorboard")
    series = _series(tb)
    curve = [v for _, v in series.get("rollout/reward_mean", [])]
    logger.info("[5/5] done in %.0f s", time.time() - t0)
    if curve:
        k = max(1, len(curve) // 5)
        first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k
        logger.info("mean reward: first %d steps %.3f -> last %d steps %.3f (%s)", k, first, k, last,
                    "rising" if last > first else "NOT rising")
    _report_eval(series)
    logger.info("TensorBoard logs: %s\n    open them with:  .venv/bin/tensorboard --logdir %s", tb, tb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
