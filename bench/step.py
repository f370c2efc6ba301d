"""End-to-end RL step time on the tiny CPU task: rollout / train / sync split, ALP on vs off.

Both runs use the same assets, seeds and config (configs/experiments/demo_tiny_cpu.yaml, which
has TP=2 and emulated FP8 rollout) and run back to back in this process's lifetime; the ratio is
ALP-on over ALP-off of the median train seconds per step (the first step is excluded as warm-up).

    python -m bench.step [--steps 8] [--nproc 2] [--out bench/results/step-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from megatron_alp.config.loader import CONFIG_ROOT

REPO = os.path.dirname(str(CONFIG_ROOT))
KEYS = ("perf/rollout_s", "perf/train_s", "perf/sync_s", "perf/step_seconds")


def _run(assets, out, name, nproc, steps, alp):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_alp.train", "--config", str(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml"),
           f"model.hf_path={assets['hf']}", f"checkpoint.load={assets['mcore']}", f"rollout.data.path={assets['data']}",
           f"run.output_root={out}", f"run.name={name}", f"bus.dir={os.path.join(out, name, 'bus')}",
           f"run.steps={steps}", f"alp.enabled={'true' if alp else 'false'}", f"parallel.tp={nproc}"]
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, name, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {k: [e.value for e in acc.Scalars(k)][1:] for k in KEYS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=None, help="write a markdown summary here")
    args = p.parse_args(argv)
    from megatron_alp.demo.assets import prepare_tiny_assets

    work = tempfile.mkdtemp(prefix="bench-step-")
    assets = prepare_tiny_assets(os.path.join(work, "assets"), tp=args.nproc)
    off = _run(assets, work, "alp_off", args.nproc, args.steps, alp=False)
    on = _run(assets, work, "alp_on", args.nproc, args.steps, alp=True)
    lines = [f"device: CPU ({os.cpu_count()} cores, {platform.machine()}), trainer processes: {args.nproc}, "
             f"steps: {args.steps} (first excluded)", "",
             "| median seconds per step | ALP off | ALP on | on / off |", "| --- | ---: | ---: | ---: |"]
    for k in KEYS:
        a, b = statistics.median(off[k]), statistics.median(on[k])
        lines.append(f"| {k} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# bench/step\n\nCommand: `python -m bench.step --steps {args.steps} --nproc {args.nproc}`"
                    f"\n\n{text}\n")


if __name__ == "__main__":
    main()
