"""The demo's train phase and weight sync, timed in isolation (no rollout engine, no torchrun).

What ``perf/train_s`` times in the demo (configs/experiments/demo_tiny_cpu.yaml: the tiny
Qwen2-shaped model, TP=2 over gloo, Token-ALP, packing under 512 tokens): the no-grad pi_old
pass over the step's 128 samples, then 4 optimizer steps of 32 samples and the step's token
metrics (trainer/updates.py ``run_updates``); and what ``bus/publish_s`` times: the export and
disk-bus publication of the weights (sync/publish.py; the engines' load is not included).
A synthetic batch shaped like the demo's (6-token prompts, 1-6 response tokens).

    python -m bench.train_phase [--steps 12] [--nproc 2] [--baseline-rev REV | --baseline PATH]

``--baseline-rev REV`` (or ``--baseline PATH``, a checkout of it): another revision, extracted with
``git archive`` (this file copied in, so a revision from before it works too); the two trees are
measured alternately in the same run (one world each, interleaved ``--rounds`` times) and the
ratio baseline / this tree printed. Wall seconds and rank 0's CPU seconds are both reported: on
a shared machine the wall time includes waiting for the other rank to be scheduled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _batch(n: int, seed: int):
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(seed)
    prompt = 6
    resp = torch.randint(1, 7, (n,), generator=g)
    L = prompt + 6
    tokens = torch.randint(0, 24, (n, L), generator=g)
    mask = torch.zeros(n, L)
    for i, r in enumerate(resp.tolist()):
        mask[i, prompt:prompt + r] = 1
        tokens[i, prompt + r:] = 0
    rollout_logp = torch.where(mask > 0, -torch.rand(n, L, generator=g) * 0.5, torch.zeros(n, L))
    adv = torch.randn(n, generator=g)
    return RLBatch(tokens=tokens, loss_mask=mask, rollout_logp=rollout_logp, advantages=adv,
                   sample_ids=torch.arange(n))


def _world(rank, world_size, steps, bus_dir, overrides=()):
    import torch.distributed as dist

    from megatron_alp.config import load_config
    from megatron_alp.config.loader import CONFIG_ROOT
    from megatron_alp.runtime.distributed import init_distributed, init_parallel_state
    from megatron_alp.sync.publish import Publisher
    from megatron_alp.trainer.batching import dp_balanced_shard
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.setup import build_model, make_actor
    from megatron_alp.trainer.updates import run_updates

    torch.set_num_threads(1)
    cfg = load_config(CONFIG_ROOT / "experiments" / "demo_tiny_cpu.yaml",
                      [f"parallel.tp={world_size}", f"bus.dir={bus_dir}", f"run.steps={steps}", *overrides])
    init_distributed(cfg.parallel.pg_timeout_minutes)
    init_parallel_state(cfg.parallel, cfg.model, seed=cfg.run.seed)
    model = build_model(cfg, alp=cfg.alp.enabled)
    ddp = wrap_ddp(model)
    optimizer = Optimizer([ddp], cfg.optimizer, precision=cfg.precision.train, alp=cfg.alp,
                          total_steps=steps * cfg.run.mini_batches_per_step)
    actor = make_actor(cfg, [ddp], optimizer)

    class _Trainer:  # what run_updates reads
        pass

    trainer = _Trainer()
    trainer.actor, trainer.ref_actor = actor, None
    publisher = Publisher(cfg.bus, cfg.model, precision=cfg.rollout.precision)
    n = cfg.run.prompts_per_step * cfg.rollout.n_samples
    train_s, sync_s, train_cpu, sync_cpu = [], [], [], []
    for step in range(steps):
        batch = _batch(n, seed=step)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        local, sizes = dp_balanced_shard(batch, 0, 1, cfg.run.mini_batches_per_step)
        run_updates(cfg, trainer, local, sizes, step)
        t1, c1 = time.perf_counter(), time.process_time()
        publisher.publish(step + 1, [ddp])
        t2, c2 = time.perf_counter(), time.process_time()
        if step:  # the first step warms up
            train_s.append(t1 - t0)
            sync_s.append(t2 - t1)
            train_cpu.append(c1 - c0)
            sync_cpu.append(c2 - c1)
    publisher.close()
    return {"train_s": train_s, "sync_s": sync_s, "train_cpu": train_cpu, "sync_cpu": sync_cpu}


def measure(nproc: int, steps: int, overrides=()) -> dict:
    from megatron_alp.runtime.spawn import run_world

    with tempfile.TemporaryDirectory(prefix="bench-train-phase-") as bus:
        return run_world(_world, nproc, args=(steps, bus, tuple(overrides)), timeout=1800)[0]


def _in_tree(tree: str, nproc: int, steps: int) -> dict:
    """``measure`` run with ``tree`` first on the import path (a fresh interpreter)."""
    code = (f"import json, bench.train_phase as b; print('RESULT', json.dumps(b.measure({nproc}, {steps})))")
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True, capture_output=True, text=True)
    import json

    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _extract(repo: str, rev: str) -> str:
    """``rev``'s tree in a temporary directory, with this benchmark copied in."""
    import shutil

    out = tempfile.mkdtemp(prefix="bench-train-phase-base-")
    archive = subprocess.run(["git", "-C", repo, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    shutil.copy(os.path.abspath(__file__), os.path.join(out, "bench", "train_phase.py"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline", default=None, help="a checkout of the revision to compare with")
    p.add_argument("--baseline-rev", default=None, help="a git revision to compare with (extracted to a temp dir)")
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.baseline_rev:
        args.baseline = _extract(here, args.baseline_rev)
    trees = {"this": here} if not args.baseline else {"baseline": os.path.abspath(args.baseline), "this": here}
    res = {k: {"train_s": [], "sync_s": [], "train_cpu": [], "sync_cpu": []} for k in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            r = _in_tree(tree, args.nproc, args.steps)
            for k in r:
                res[name][k] += r[k]
    print(f"demo train phase, TP={args.nproc}, {args.steps - 1} steps x {args.rounds} rounds (medians), "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in trees:
        m = {k: statistics.median(v) for k, v in res[name].items()}
        print(f"  {name:8s} train_s {m['train_s']:.4f} (rank-0 CPU {m['train_cpu']:.4f})  "
              f"publish_s {m['sync_s']:.4f} (CPU {m['sync_cpu']:.4f})")
    if args.baseline:
        for k in ("train_s", "sync_s", "train_cpu", "sync_cpu"):
            b, t = statistics.median(res["baseline"][k]), statistics.median(res["this"][k])
            print(f"  {k}: baseline / this = {b / t:.2f}x")


if __name__ == "__main__":
    main()
