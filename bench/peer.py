"""Peer baseline: Hugging Face TRL's GRPOTrainer vs this backend, one RL step on the demo's task.

Both sides run the demo's task at the demo's settings (configs/experiments/demo_tiny_cpu.yaml):
the same warm-started tiny model (megatron_alp.demo.assets), the same prompt file and reward
(rollout.rewards.synthetic, the copy task), 16 prompts x 8 samples per rollout, 6 new tokens at
temperature 1, 4 optimizer steps per rollout, Adam at lr 3e-4, gradient clip 1.0, no KL, fp32 on the
CPU. One RL step = one rollout (generation + reward) + its 4 optimizer steps; seconds per RL step
are medians over the steps after the first (warm-up).

- TRL: ``GRPOTrainer`` (``steps_per_generation=4``, ``per_device_train_batch_size=32``,
  ``num_generations=8``: one 128-sample generation per 4 optimizer steps), one process, in a
  subprocess of its own; the RL step is timed between the ends of every 4th optimizer step
  (a ``TrainerCallback``). Its loss is TRL's GRPO (pi/pi_old clip), ours Token-ALP.
- Ours: ``python -m megatron_alp.train`` under torchrun (the demo's 2 trainer processes, data-parallel,
  a local rollout engine process), ``perf/step_seconds`` from its TensorBoard log; the run at
  the demo config's own settings and one per ``--variant NAME=OVERRIDES``.

Both are measured in the same invocation, back to back, ``--reps`` times alternately (paired: the
shared machine's load moves the absolute numbers; the ratio ours / TRL is printed per pair). When
TRL is not installed (optional extra ``bench``: ``pip install 'megatron-alp[bench]'``) the TRL side
is skipped with the reason, our side still runs, and the exit status is 0.

    python -m bench.peer [--steps 8] [--reps 2] [--out bench/results/peer-cpu.md] \
        [--variant "padded=run.max_tokens_per_micro_batch=0"] [--variant "dp2=parallel.tp=1"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.demo import TRAINER_PROCS

REPO = os.path.dirname(str(CONFIG_ROOT))
DEMO = CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml"


def _demo_settings():
    """The demo config's settings that the TRL side mirrors (one source of truth: the YAML)."""
    from megatron_alp.config import load_config

    cfg = load_config(str(DEMO), [])
    return {"prompts": cfg.run.prompts_per_step, "samples": cfg.rollout.n_samples,
            "updates": cfg.run.mini_batches_per_step,
            "new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.rollout.temperature, "lr": cfg.optimizer.lr,
            "clip": cfg.optimizer.clip_grad, "seed": cfg.run.seed, "nproc": TRAINER_PROCS}


def trl_missing() -> str:
    """Why TRL cannot run here ('' when it can)."""
    try:
        import trl  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return (f"TRL is not importable ({type(e).__name__}: {e}); install the optional extra: "
                "pip install 'megatron-alp[bench]'")
    return ""


def _trl_worker(hf: str, data: str, steps: int, out: str) -> None:
    """One TRL GRPO run (in its own process): per-RL-step seconds and rewards into ``out`` (JSON)."""
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout.rewards.synthetic import synthetic_reward

    s = _demo_settings()
    torch.manual_seed(s["seed"])
    with open(data) as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)

    def reward(prompts, completions, answer, **_):
        return [synthetic_reward(p, c, a) for p, c, a in zip(prompts, completions, answer, strict=True)]

    per_rollout = s["prompts"] * s["samples"]
    args = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(out), "trl_out"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=per_rollout // s["updates"], gradient_accumulation_steps=1,
        steps_per_generation=s["updates"], num_generations=s["samples"], num_iterations=1,
        max_completion_length=s["new_tokens"], temperature=s["temperature"], learning_rate=s["lr"],
        weight_decay=0.0, max_grad_norm=s["clip"], lr_scheduler_type="constant", beta=0.0,
        max_steps=steps * s["updates"], logging_steps=1,
        save_strategy="no", report_to="none", seed=s["seed"], dataloader_num_workers=0, disable_tqdm=True,
    )
    ends, rewards = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % s["updates"] == 0:  # the last optimizer step of a rollout
                ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and (state.global_step - 1) % s["updates"] == 0:
                rewards.append(float(logs["reward"]))  # the step's rollout, logged on its first update

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tok,
                          callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    marks = [start, *ends]
    with open(out, "w") as f:
        json.dump({"step_seconds": [b - a for a, b in zip(marks, marks[1:], strict=False)], "reward": rewards,
                   "trl": __import__("trl").__version__}, f)


def _trl(assets, work, steps: int, tag: str):
    out = os.path.join(work, f"trl_{tag}.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as each of our processes; 2 threads thrash on a loaded 2-core VM
    subprocess.run([sys.executable, "-m", "bench.peer", "--trl-worker", assets["hf"], assets["data"], str(steps), out],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def _ours(assets, work, steps: int, tag: str, overrides=()):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name = f"ours_{tag}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={_demo_settings()['nproc']}",
           "-m", "megatron_alp.train", "--config", str(DEMO), f"model.hf_path={assets['hf']}",
           f"checkpoint.load={assets['mcore']}", f"rollout.data.path={assets['data']}", f"run.output_root={work}",
           f"run.name={name}", f"bus.dir={os.path.join(work, name, 'bus')}", f"run.steps={steps}", *overrides]
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acc = EventAccumulator(os.path.join(work, name, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    get = lambda k: [e.value for e in acc.Scalars(k)]  # noqa: E731
    return {"step_seconds": get("perf/step_seconds"), "train_s": get("perf/train_s"),
            "rollout_s": get("perf/rollout_s"),
            "reward": get("rollout/reward_mean")}


def _med(xs):
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _last(xs, k=6):
    return sum(xs[-k:]) / max(1, len(xs[-k:])) if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="RL steps per run (the first is excluded)")
    p.add_argument("--reps", type=int, default=1, help="alternating (TRL, ours) pairs")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="another 'ours' run per pair: a name, '=', space-separated overrides (repeatable)")
    p.add_argument("--out", default=None, help="write a markdown summary here")
    p.add_argument("--trl-worker", nargs=4, metavar=("HF", "DATA", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_worker:
        hf, data, steps, out = args.trl_worker
        _trl_worker(hf, data, int(steps), out)
        return 0
    from megatron_alp.demo.assets import prepare_tiny_assets

    s = _demo_settings()
    why = trl_missing()
    if why:
        print(f"bench.peer: TRL side skipped: {why}", flush=True)
    work = tempfile.mkdtemp(prefix="bench-peer-")
    assets = prepare_tiny_assets(os.path.join(work, "assets"), tp=s["nproc"], log=lambda m: None)
    variants = [("demo", [])] + [(v.split("=", 1)[0], v.split("=", 1)[1].split()) for v in args.variant]
    rows = []
    for rep in range(args.reps):
        trl = None if why else _trl(assets, work, args.steps, str(rep))
        for name, overrides in variants:
            ours = _ours(assets, work, args.steps, f"{name}{rep}", overrides)
            rows.append((rep, name, trl, ours))
            line = f"pair {rep} ({name}): ours {_med(ours['step_seconds']):.3f} s/step"
            if trl:
                line += f", TRL {_med(trl['step_seconds']):.3f} s/step, ours / TRL = " \
                        f"{_med(ours['step_seconds']) / _med(trl['step_seconds']):.2f}"
            print(line, flush=True)
    lines = [f"device: CPU ({os.cpu_count()} cores, {platform.machine()}); {args.steps} RL steps per run (first "
             f"excluded), {s['prompts']} prompts x {s['samples']} samples, {s['updates']} optimizer steps per rollout; "
             f"TRL {rows[0][2]['trl'] if rows[0][2] else 'skipped: ' + why}", "",
             "| pair | ours | ours s/step (train / rollout) | TRL s/step | ours / TRL | reward last 6: ours, TRL |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for rep, name, trl, ours in rows:
        o = _med(ours["step_seconds"])
        t = _med(trl["step_seconds"]) if trl else None
        trl_cols = f"{t:.3f} | {o / t:.2f}" if trl else "- | -"
        trl_reward = f"{_last(trl['reward']):.2f}" if trl else "-"
        lines.append(f"| {rep} | {name} | {o:.3f} ({_med(ours['train_s']):.3f} / {_med(ours['rollout_s']):.3f}) | "
                     f"{trl_cols} | {_last(ours['reward']):.2f}, {trl_reward} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        cmd = " ".join(["python -m bench.peer", *(argv if argv is not None else sys.argv[1:])])
        with open(args.out, "w") as f:
            f.write(f"# bench/peer\n\nCommand: `{cmd}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
