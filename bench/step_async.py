"""Synchronous vs asynchronous rollout (rollout.max_staleness 0, 1, 2) on the tiny CPU task.

The engine and the trainer get separate cores so that overlap is physically possible: the local
engine is started here pinned to core 1 (os.sched_setaffinity, inherited by the child) and the
trainer (one process, attached to it with rollout.urls) is pinned to core 0. Each run gets a
fresh engine (an attached engine refuses a version older than the one it runs). Reported per
max_staleness: median seconds per step of rollout (what the step waited for its batch), train,
step, and samples/s = samples per step / step seconds; the ratio is samples/s over the
synchronous run's, measured in the same invocation. The first step is excluded (warm-up).

    python -m bench.step_async [--steps 8] [--out bench/results/step-async-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from megatron_alp.config.loader import CONFIG_ROOT

REPO = os.path.dirname(str(CONFIG_ROOT))
CONFIG = str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml")
KEYS = ("perf/rollout_s", "perf/train_s", "perf/step_seconds")


EXTRA: list = []  # --set overrides, for every run


def _overrides(assets, out, name, steps):
    return [*EXTRA, f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}",
            f"rollout.data.path={assets['data']}",
            f"run.output_root={out}", f"run.name={name}", f"bus.dir={os.path.join(out, name, 'bus')}",
            f"run.steps={steps}", "parallel.tp=1"]


def _start_engine(assets, out, name, core):
    from megatron_alp.config import load_config
    from rollout.engines.processes import ServerProcess, free_port, start_all
    from rollout.engines.start import local_engine_command

    cfg = load_config(CONFIG, _overrides(assets, out, name, 1))
    port = free_port()
    server = ServerProcess(local_engine_command(cfg.rollout, assets["hf"], port), f"http://127.0.0.1:{port}",
                           os.path.join(out, f"{name}-engine.log"), name=f"{name}-engine",
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})  # the engine inherits it
    try:
        start_all([server], 300)
    finally:
        os.sched_setaffinity(0, mine)
    return server


def _run(assets, out, name, steps, staleness, cores):
    server = _start_engine(assets, out, name, cores[1])
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "megatron_alp.train", "--config", CONFIG, *_overrides(assets, out, name, steps),
               f'rollout.urls=["{server.url}"]', f"rollout.max_staleness={staleness}"]
        subprocess.run(["taskset", "-c", str(cores[0]), *cmd], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        server.stop()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, name, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    res = {k: statistics.median([e.value for e in acc.Scalars(k)][1:]) for k in KEYS}
    res["samples"] = [e.value for e in acc.Scalars("rollout/num_samples")][0]
    res["staleness_mean"] = statistics.mean([e.value for e in acc.Scalars("rollout/staleness_mean")])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--staleness", default="0,1,2")
    p.add_argument("--out", default=None, help="write a markdown summary here")
    p.add_argument("--set", action="append", default=[], help="config override for every run, e.g. "
                   "rollout.max_new_tokens=24 (a longer rollout, closer to the train time)")
    p.add_argument("--assets", default=None, help="reuse prepared tiny assets (hf_warm/, mcore/ converted at TP=1, "
                   "copy_train.jsonl) instead of preparing them")
    args = p.parse_args(argv)
    from megatron_alp.demo.assets import prepare_tiny_assets

    EXTRA[:] = args.set
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("bench.step_async: skipped (needs 2 cores to pin the engine and the trainer apart)")
        return
    work = tempfile.mkdtemp(prefix="bench-step-async-")
    if args.assets:
        assets = {"hf": os.path.join(args.assets, "hf_warm"), "mcore": os.path.join(args.assets, "mcore"),
                  "data": os.path.join(args.assets, "copy_train.jsonl")}
    else:
        assets = prepare_tiny_assets(os.path.join(work, "assets"), tp=1)
    ks = [int(k) for k in args.staleness.split(",")]
    results = {k: _run(assets, work, f"k{k}", args.steps, k, cores[:2]) for k in ks}
    base = results[ks[0]]
    lines = [f"trainer pinned to core {cores[0]}, engine to core {cores[1]}; {args.steps} steps (first excluded); "
             f"medians; overrides {args.set or 'none'}; load average {os.getloadavg()[0]:.1f} at the end", "",
             "| max_staleness | rollout wait s | train s | step s | samples/s | vs k=0 | mean staleness |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, r in results.items():
        sps, sps0 = r["samples"] / r["perf/step_seconds"], base["samples"] / base["perf/step_seconds"]
        lines.append(f"| {k} | {r['perf/rollout_s']:.3f} | {r['perf/train_s']:.3f} | {r['perf/step_seconds']:.3f} | "
                     f"{sps:.1f} | {sps / sps0:.2f}x | {r['staleness_mean']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# bench/step_async\n\nCommand: `python -m bench.step_async --steps {args.steps}`\n\n{text}\n")


if __name__ == "__main__":
    main()
