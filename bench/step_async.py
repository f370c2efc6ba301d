"""Synchronous vs asynchronous rollout (rollout.max_staleness 0, 1, 2) on the tiny CPU task.

The engine and the trainer get separate cores so that overlap is physically possible: the local
engine is started here pinned to core 1 (os.sched_setaffinity, inherited by the child) and the
trainer (one process under torchrun, attached to it with rollout.urls; its reward workers inherit
the pinning) is pinned to core 0 with taskset. Each run gets a fresh engine (an attached engine
refuses a version older than the one it runs). The first step of each run is excluded (warm-up);
every number is a median over the remaining steps.

Per max_staleness: rollout gen s (the engine's generation of one batch: perf/rollout_s at k = 0,
where the step waits for all of it; perf/rollout_gen_s, first group issued to last finished, at
k >= 1), rollout wait s (what the step waited for its batch, perf/rollout_s), train s
(perf/train_s: the no-grad forwards and the mini-batch updates), sync s (perf/sync_s: publish and
commit), step s (perf/step_seconds) and samples/s = samples per step / step s; "vs k=0" is
samples/s over the synchronous run's, measured in the same invocation.

The issue's goals, printed as PASS/FAIL lines with their numbers; the two phases' costs come from the
synchronous run, where nothing overlaps them: rollout = its rollout s, train = its step s minus
rollout s (everything the trainer does in a step: forwards, updates, weight sync, bookkeeping).
1. overlap: step s at k >= 1 <= 1.15 x max(rollout, train);
2. throughput: samples/s at k >= 1 >= 1.3 x the synchronous samples/s, where rollout and train take
   similar time (the line states rollout / train; the default settings below aim at ~1).

The default settings (BALANCE) make the engine's share of a step close to the trainer's on one core
each (measured on a quiet 2-core VM: rollout / train ~0.75): engine batches of 32 sequences
(rollout.local.max_batch_size; the demo's 64 makes rollout ~0.55 x train), the demo's micro-batch
of 8, and the synthetic reward scored inline (rollout.reward_workers = 0: no reward worker
processes, which would inherit the trainer's core); --set overrides them (and anything else) for
every run.

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
KEYS = ("perf/rollout_s", "perf/rollout_gen_s", "perf/train_s", "perf/sync_s", "perf/step_seconds")
# rollout ~ train on the 2-core dev VM (see the module docstring; measured in bench/results/step-async-cpu.md)
BALANCE = ["rollout.local.max_batch_size=32", "run.micro_batch_size=8", "rollout.reward_workers=0"]


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
    tags = set(acc.Tags()["scalars"])
    series = {k: [e.value for e in acc.Scalars(k)][1:] if k in tags else [] for k in KEYS}
    # the trainer's own part of a step: everything but the wait for the batch
    series["trainer_s"] = [a - b for a, b in zip(series["perf/step_seconds"], series["perf/rollout_s"], strict=True)]
    series["samples"] = [e.value for e in acc.Scalars("rollout/num_samples")][1:]
    series["staleness_mean"] = [e.value for e in acc.Scalars("rollout/staleness_mean")][1:]
    return series


def _summary(series) -> dict:
    """Medians of the pooled per-step values (mean for the staleness)."""
    res = {k: statistics.median(v) if v else float("nan") for k, v in series.items() if k != "staleness_mean"}
    res["staleness_mean"] = statistics.mean(series["staleness_mean"])
    return res


def goal_lines(results) -> list:
    """The issue's two goals as PASS/FAIL lines with their numbers (module docstring)."""
    sync = results.get(0)
    if sync is None:
        return ["goals: not checked (needs the max_staleness 0 run as the baseline)"]
    rollout, train = sync["perf/rollout_s"], sync["trainer_s"]
    bound, sps0 = 1.15 * max(rollout, train), sync["samples"] / sync["perf/step_seconds"]
    out = [f"phases (synchronous run): rollout {rollout:.3f} s, train {train:.3f} s, rollout / train "
           f"{rollout / train:.2f}"]
    for k, r in results.items():
        if k == 0:
            continue
        step, sps = r["perf/step_seconds"], r["samples"] / r["perf/step_seconds"]
        out.append(f"{'PASS' if step <= bound else 'FAIL'} overlap k={k}: step {step:.3f} s <= 1.15 x "
                   f"max(rollout, train) = {bound:.3f} s (ratio {step / max(rollout, train):.2f})")
        out.append(f"{'PASS' if sps >= 1.3 * sps0 else 'FAIL'} throughput k={k}: {sps:.1f} samples/s >= 1.3 x "
                   f"{sps0:.1f} = {1.3 * sps0:.1f} (ratio {sps / sps0:.2f}; rollout / train {rollout / train:.2f})")
    return out


def table_lines(results) -> list:
    lines = ["| max_staleness | rollout gen s | rollout wait s | train s | sync s | step s | samples/s | vs k=0 "
             "| mean staleness |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = next(iter(results.values()))
    sps0 = base["samples"] / base["perf/step_seconds"]
    for k, r in results.items():
        gen = r["perf/rollout_s"] if k == 0 else r["perf/rollout_gen_s"]
        sps = r["samples"] / r["perf/step_seconds"]
        lines.append(f"| {k} | {gen:.3f} | {r['perf/rollout_s']:.3f} | {r['perf/train_s']:.3f} "
                     f"| {r['perf/sync_s']:.3f} "
                     f"| {r['perf/step_seconds']:.3f} | {sps:.1f} | {sps / sps0:.2f}x | {r['staleness_mean']:.2f} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--staleness", default="0,1,2")
    p.add_argument("--reps", type=int, default=1, help="runs per max_staleness, in mirrored order (0 1 2 2 1 0)")
    p.add_argument("--out", default=None, help="write a markdown summary here")
    p.add_argument("--set", action="append", default=[], help="config override for every run, after the "
                   f"defaults {' '.join(BALANCE)}, e.g. rollout.local.max_batch_size=64 (the demo's engine batch)")
    p.add_argument("--assets", default=None, help="reuse prepared tiny assets (hf_warm/, mcore/ converted at TP=1, "
                   "copy_train.jsonl) instead of preparing them")
    args = p.parse_args(argv)
    from megatron_alp.demo.assets import prepare_tiny_assets

    EXTRA[:] = [*BALANCE, *args.set]
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
    # repetitions in mirrored order (0 1 2 2 1 0 ...): a load that drifts during the bench biases
    # no max_staleness; each k's per-step values are pooled over its repetitions
    order = [k for rep in range(args.reps) for k in (ks if rep % 2 == 0 else ks[::-1])]
    load0 = os.getloadavg()
    pooled = {k: {} for k in ks}
    for i, k in enumerate(order):
        series = _run(assets, work, f"k{k}_r{i}", args.steps, k, cores[:2])
        for key, vals in series.items():
            pooled[k].setdefault(key, []).extend(vals)
        print(f"max_staleness {k}: median step {statistics.median(series['perf/step_seconds']):.3f} s "
              f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    results = {k: _summary(pooled[k]) for k in ks}
    load1 = os.getloadavg()
    head = (f"trainer pinned to core {cores[0]}, engine to core {cores[1]}; {args.steps} steps (first excluded) "
            f"x {args.reps} run(s) per max_staleness in mirrored order; medians; settings {' '.join(EXTRA)}; "
            f"load average (1/5/15 min) {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the start, "
            f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at the end")
    text = "\n".join([head, "", *table_lines(results), "", *goal_lines(results)])
    print(text)
    if args.out:
        cmd = " ".join(["python -m bench.step_async", f"--steps {args.steps}", f"--reps {args.reps}",
                        *(f"--set {x}" for x in args.set)])
        with open(args.out, "w") as f:
            f.write(f"# bench/step_async\n\nCommand: `{cmd}`\n\n{text}\n")


if __name__ == "__main__":
    main()
