"""CPU mini-reproduction of the ALP and DRPO papers' qualitative claims (docs/results.md).

    OMP_NUM_THREADS=1 python tools/mini_repro.py --out runs/mini_repro [--seeds 1 2 3] [--steps 60]

1. prepares the tiny assets once (megatron_alp.demo.assets: a tiny Qwen2-shaped model warm-started
   on the copy task, converted to a Megatron checkpoint) and the RL task's prompts (default: reverse
   a 3-digit string, which the copy warm start does not solve: a learning curve with room);
2. runs every (config, seed) of configs/experiments/mini_repro/ one after the other with torchrun
   (emulated FP8 rollout, 16 optimizer steps per rollout batch; see base.yaml there);
3. calls tools/compare_runs.py for the two comparisons: (a) Seq-Bypass vs Seq-ALP vs Token-ALP vs
   Token-MIS (``alp_*`` files) and (b) GRPO vs DPPO vs DRPO, plus DRPO with delta 0.15 as an
   ablation (``drpo_*`` files).

Every command is written to ``<out>/commands.md``; a run whose TensorBoard already holds all its
steps is skipped (``--force`` reruns), so an interrupted matrix resumes where it stopped.
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

CONFIG_DIR = os.path.join("configs", "experiments", "mini_repro")
GROUPS = {
    "alp": [("Seq-Bypass", "seq_bypass"), ("Seq-ALP", "seq_alp"), ("Token-ALP", "token_alp"),
            ("Token-MIS", "token_mis")],
    "drpo": [("GRPO (clip)", "grpo"), ("DPPO-TV", "dppo"), ("DRPO", "drpo"), ("DRPO delta 0.15", "drpo_d015")],
}


def asset_paths(out: str, task: str, digits: int) -> dict:
    assets = os.path.join(out, "assets")  # the layout megatron_alp.demo.assets writes
    return {"hf": os.path.join(assets, "hf_warm"), "mcore": os.path.join(assets, "mcore"),
            "task_data": os.path.join(assets, f"{task}{digits}_train.jsonl")}


def prepare(out: str, task: str, digits: int, warm_steps: int, hidden: int = 64) -> dict:
    """The tiny model, its Megatron checkpoint and the task's prompts, made once per ``out``."""
    from megatron_alp.demo.assets import prepare_tiny_assets
    from rollout.rewards.synthetic import synthetic_records

    paths = asset_paths(out, task, digits)
    stamp = os.path.join(out, "assets", "assets.json")
    if not os.path.exists(stamp):
        prepare_tiny_assets(os.path.join(out, "assets"), warm_steps=warm_steps, tp=1, log=print,
                            hidden_size=hidden, intermediate_size=2 * hidden, digits=digits)
        with open(stamp, "w") as f:
            json.dump(paths, f)
    if not os.path.exists(paths["task_data"]):
        with open(paths["task_data"], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in synthetic_records(2048, task, digits, seed=0))
    return paths


def size_overrides(hidden: int, digits: int) -> list:
    """The model section of the assets' model and the response cap of the task (the answer plus
    EOS plus slack); the DRPO group's horizon is that cap, as 8192 is the recipe's."""
    cap = digits + 3
    return [f"model.hidden_size={hidden}", f"model.ffn_hidden_size={2 * hidden}", f"rollout.max_new_tokens={cap}",
            f"rollout.data.max_prompt_len={digits + 8}", f"algorithm.horizon={cap}"]


def run_command(python: str, cfg: str, name: str, seed: int, out: str, assets: dict, steps: int,
                nproc: int, extra) -> list:
    runs = os.path.join(out, "runs")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_alp.train", "--config", os.path.join(CONFIG_DIR, f"{cfg}.yaml"),
            f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}",
            f"rollout.data.path={assets['task_data']}", f"run.output_root={runs}",
            f"bus.dir={os.path.join(out, 'bus', name)}", f"run.name={name}", f"run.steps={steps}",
            f"run.seed={seed}", f"rollout.seed={seed}", f"alp.seed={1000 + seed}",
            f"parallel.tp={nproc}", *extra]


def logged_steps(run_dir: str) -> int:
    from compare_runs import event_dirs, read_scalars

    dirs = event_dirs(os.path.join(run_dir, "tensorboard")) if os.path.isdir(run_dir) else []
    if not dirs:
        return 0
    return len(read_scalars(dirs[0]).get("rollout/reward_mean", {}))


def run_all(todo, out: str, env: dict, jobs: int) -> list:
    """Run ``(name, cmd)`` pairs, at most ``jobs`` at a time; one log per run under ``out/logs``."""
    record, running, queue = [], {}, list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            name, cmd = queue.pop(0)
            log = open(os.path.join(out, "logs", f"{name}.log"), "w")
            running[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT),
                             log, time.time())
        for name, (proc, log, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            del running[name]
            dt = time.time() - t0
            record.append({"run": name, "rc": rc, "seconds": round(dt, 1)})
            print(f"[{'ok' if rc == 0 else f'FAILED rc={rc}'}] {name} in {dt:.0f} s"
                  + ("" if rc == 0 else f" (log: {out}/logs/{name}.log)"), flush=True)
        time.sleep(2)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "mini_repro"))
    ap.add_argument("--results", default=os.path.join(REPO, "docs", "results"), help="tables and plots")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--task", default="reverse", choices=["copy", "reverse", "add"])
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--warm-steps", type=int, default=55)
    ap.add_argument("--hidden", type=int, default=64, help="model width (FFN = 2 x width)")
    ap.add_argument("--configs", nargs="+", default=None, help="only these config names of the groups")
    ap.add_argument("--nproc", type=int, default=1, help="trainer processes (TP size)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at the same time (each is a trainer + an engine)")
    ap.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    t_start = time.time()
    assets = (asset_paths(out, args.task, args.digits) if args.dry_run
              else prepare(out, args.task, args.digits, args.warm_steps, args.hidden))
    extra = [*size_overrides(args.hidden, args.digits), *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    record, lines, todo = [], [f"# mini-reproduction commands (cwd: {REPO})\n"], []
    for group in args.groups:
        for _label, cfg in GROUPS[group]:
            if args.configs and cfg not in args.configs:
                continue
            for seed in args.seeds:
                name = f"{cfg}_s{seed}"
                cmd = run_command(sys.executable, cfg, name, seed, out, assets, args.steps, args.nproc, extra)
                text = "OMP_NUM_THREADS=1 " + shlex.join(cmd)
                lines.append(f"- `{name}`: `{text}`\n")
                run_dir = os.path.join(out, "runs", name)
                if args.dry_run:
                    print(text)
                    continue
                if not args.force and logged_steps(run_dir) >= args.steps:
                    print(f"[skip] {name}: complete", flush=True)
                    continue
                if args.force or os.path.isdir(run_dir):
                    shutil.rmtree(run_dir, ignore_errors=True)  # no half-run resume: each run starts fresh
                    shutil.rmtree(os.path.join(out, "bus", name), ignore_errors=True)
                todo.append((name, cmd))
    record = run_all(todo, out, env, max(1, args.jobs))
    with open(os.path.join(out, "commands.md"), "w") as f:
        f.writelines(lines)
    if args.dry_run:
        return 0
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"runs": record, "matrix_seconds": round(time.time() - t_start, 1)}, f, indent=1)
    import compare_runs

    for group in args.groups:
        specs = [f"{label}={os.path.join(out, 'runs', cfg)}_s*" for label, cfg in GROUPS[group]
                 if not args.configs or cfg in args.configs]
        if not specs:  # --configs selected nothing of this group
            continue
        compare_runs.main([*(a for s in specs for a in ("--run", s)), "--out", args.results,
                           "--prefix", f"{group}_"])
    print(f"matrix wall time {time.time() - t_start:.0f} s; commands in {out}/commands.md")
    return 0 if all(r["rc"] == 0 for r in record) else 1


if __name__ == "__main__":
    sys.exit(main())
