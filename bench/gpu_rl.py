"""A tiny RL run end to end on a GPU (a step of `make gpu-check`): bf16 training with Megatron's
distributed optimizer on the GPU, the local rollout engine (it computes on the CPU: it has no device
option), the disk bus, TensorBoard; then a resume from the checkpoint for one more step.

    python -m bench.gpu_rl --out gpu_rl.json [--steps 2]

Checked: the run ends, ``train/loss`` and ``train/grad_norm`` are finite every step, the bus reached
version ``steps``, the resumed run adds one step. Writes the scalars it checked to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from megatron_alp.config.loader import CONFIG_ROOT

REPO = os.path.dirname(str(CONFIG_ROOT))
CONFIG = str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml")


def _train(assets, out, steps, precision):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "megatron_alp.train", "--config", CONFIG, "parallel.tp=1", f"precision.train={precision}",
           f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}",
           f"rollout.data.path={assets['data']}", f"run.output_root={out}", "run.name=gpu_rl",
           f"bus.dir={os.path.join(out, 'gpu_rl', 'bus')}", f"run.steps={steps}", "run.prompts_per_step=8",
           "run.micro_batch_size=4", "run.mini_batches_per_step=2", "checkpoint.save_interval=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return os.path.join(out, "gpu_rl")


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="bf16")
    a = p.parse_args(argv)
    from megatron_alp.demo.assets import prepare_tiny_assets

    t0 = time.perf_counter()
    root = tempfile.mkdtemp(prefix="gpu-rl-")
    assets = prepare_tiny_assets(os.path.join(root, "assets"), warm_steps=2, tp=1, num_prompts=64)
    t_assets = time.perf_counter() - t0
    run = _train(assets, root, a.steps, a.precision)
    first = _scalars(run)
    run = _train(assets, root, a.steps + 1, a.precision)  # resumes from the last checkpoint
    scal = _scalars(run)
    keys = ("train/loss", "train/grad_norm", "rollout/reward_mean", "train/bus_version", "train/skipped_step")
    res = {"precision": a.precision, "steps": a.steps, "assets_s": t_assets, "total_s": time.perf_counter() - t0,
           "scalars": {k: scal.get(k) for k in keys}, "first_run_steps": len(first.get("train/loss", []))}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    loss = scal.get("train/loss") or []
    ok = (len(loss) >= a.steps + 1 and all(math.isfinite(x) for x in loss)
          and all(math.isfinite(x) for x in scal.get("train/grad_norm", [math.nan]))
          and scal["train/bus_version"][-1] == a.steps + 1)
    print(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
