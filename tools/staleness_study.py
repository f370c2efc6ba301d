"""The asynchronous-rollout study of issue 17 (docs/results.md): the demo task (megatron_alp.demo's
config, configs/experiments/demo_tiny_cpu.yaml) with rollout.max_staleness 0 and 2, for Token-ALP,
Token-MIS and plain bypass (Token-ALP's objective without the perturbation), several seeds each.

    OMP_NUM_THREADS=1 nice -n 19 python tools/staleness_study.py --out /tmp/async_study [--seeds 1 2 3]
    python tools/staleness_table.py --out /tmp/async_study          # the table

1. prepares the demo's tiny assets once (megatron_alp.demo.assets: the warm-started tiny model, its
   TP=2 Megatron checkpoint, the copy task's prompts) under ``<out>/assets``;
2. runs every (seed, max_staleness, objective) one after the other with torchrun (2 trainer
   processes, one local engine with emulated FP8 weights, as ``python -m megatron_alp.demo`` does,
   without its held-out evaluation), with ``logging.raw_samples=true`` so that each run's per-token
   log-ratios land in ``hist_samples.jsonl`` for pooled quantiles.

Resumable: a run whose TensorBoard already holds ``--steps`` steps is skipped; an incomplete one is
started again from scratch. Every command is written to ``<out>/commands.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

CONFIG = os.path.join("configs", "experiments", "demo_tiny_cpu.yaml")
# label -> overrides of the demo config (which includes configs/algo/token_alp.yaml)
OBJECTIVES = {
    "token_alp": [],
    "token_mis": ["alp.enabled=false", "algorithm.objective=mis_token", "algorithm.eps_low=0.2",
                  "algorithm.eps_high=0.28", "algorithm.is_low=0.3333333333333333", "algorithm.is_high=3.0"],
    "bypass": ["alp.enabled=false"],  # bypass_token, Token-ALP's clip range, no perturbation, no IS weight
}
STALENESS = (0, 2)


def run_name(obj: str, k: int, seed: int) -> str:
    return f"{obj}_k{k}_s{seed}"


def assets_of(out: str) -> dict:
    a = os.path.join(out, "assets")
    return {"hf": os.path.join(a, "hf_warm"), "mcore": os.path.join(a, "mcore"),
            "data": os.path.join(a, "copy_train.jsonl")}


def prepare(out: str, warm_steps: int, nproc: int) -> dict:
    from megatron_alp.demo.assets import prepare_tiny_assets

    stamp = os.path.join(out, "assets", "assets.json")
    if not os.path.exists(stamp):
        shutil.rmtree(os.path.join(out, "assets"), ignore_errors=True)
        prepare_tiny_assets(os.path.join(out, "assets"), warm_steps=warm_steps, tp=nproc, log=print)
        with open(stamp, "w") as f:
            json.dump(assets_of(out), f)
    return assets_of(out)


def command(obj: str, k: int, seed: int, out: str, assets: dict, steps: int, nproc: int, extra) -> list:
    name = run_name(obj, k, seed)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_alp.train", "--config", CONFIG,
            f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}",
            f"rollout.data.path={assets['data']}", f"run.output_root={os.path.join(out, 'runs')}",
            f"bus.dir={os.path.join(out, 'bus', name)}", f"run.name={name}", f"run.steps={steps}",
            f"run.seed={seed}", f"rollout.seed={seed}", f"alp.seed={1000 + seed}",
            f"rollout.max_staleness={k}", "logging.raw_samples=true", "checkpoint.save_interval=0",
            f"parallel.tp={nproc}", *OBJECTIVES[obj], *extra]


def logged_steps(run_dir: str) -> int:
    from compare_runs import event_dirs, read_scalars

    dirs = event_dirs(os.path.join(run_dir, "tensorboard")) if os.path.isdir(run_dir) else []
    return max((len(read_scalars(d).get("rollout/reward_mean", {})) for d in dirs), default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/async_study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--staleness", type=int, nargs="+", default=list(STALENESS))
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    ap.add_argument("--steps", type=int, default=30, help="RL steps per run (the demo's 30)")
    ap.add_argument("--warm-steps", type=int, default=55)
    ap.add_argument("--nproc", type=int, default=2, help="trainer processes (TP size; the demo's 2)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    assets = assets_of(out) if args.dry_run else prepare(out, args.warm_steps, args.nproc)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    lines, failed, t_start = [f"# staleness study commands (cwd: {REPO})\n"], [], time.time()
    grid = [(o, k, s) for s in args.seeds for k in args.staleness for o in args.objectives]
    for i, (obj, k, seed) in enumerate(grid):
        name = run_name(obj, k, seed)
        cmd = command(obj, k, seed, out, assets, args.steps, args.nproc, args.overrides)
        text = "OMP_NUM_THREADS=1 " + shlex.join(cmd)
        lines.append(f"- `{name}`: `{text}`\n")
        if args.dry_run:
            print(text)
            continue
        run_dir = os.path.join(out, "runs", name)
        if logged_steps(run_dir) >= args.steps:
            print(f"[{i + 1}/{len(grid)} skip] {name}: complete", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # no half-run resume: each run starts fresh
        shutil.rmtree(os.path.join(out, "bus", name), ignore_errors=True)
        t0 = time.time()
        with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        status = "ok" if rc == 0 else f"FAILED rc={rc} (log: {out}/logs/{name}.log)"
        print(f"[{i + 1}/{len(grid)} {status}] {name} in {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    with open(os.path.join(out, "commands.md"), "w") as f:
        f.writelines(lines)
    print(f"grid wall time {time.time() - t_start:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
