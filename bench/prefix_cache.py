"""Benchmark: the local engine's prefix cache on GRPO groups (8 samples of one prompt), on vs off.

    python -m bench.prefix_cache                  # tiny Qwen2 (4 layers, width 128), 4 groups x 8, 384-token prompts
    python -m bench.prefix_cache --prompt-len 1024 --groups 8 --max-new-tokens 16

Two schedulers over one model in this process (the engine's batching and prefill code, no HTTP):
``off`` recomputes the prompt for each of the 8 samples (``--prefix-cache-tokens 0``), ``on``
computes it once and the other 7 samples reuse its KV (``meta_info.cached_tokens`` = prompt - 1).
Each group's 8 requests arrive together, as slime sends them; groups run one after another. The
two settings alternate for ``--reps`` rounds; the median wall time of each and their ratio are
printed. Results go to bench/results/prefix-cache-cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from rollout.engines.local.prefix_cache import PrefixCache
from rollout.engines.local.runner import LocalModel, Request
from rollout.engines.local.scheduler import Scheduler
from rollout.tiny_model import make_tiny_model

RESULTS = Path(__file__).resolve().parent / "results" / "prefix-cache-cpu.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def run_groups(sched: Scheduler, prompts, args, tag: str) -> tuple:
    """Seconds for every group (8 requests submitted together, groups in turn); cached tokens."""
    cached, t0 = 0, time.perf_counter()
    for g, prompt in enumerate(prompts):
        done = threading.Semaphore(0)
        reqs = [Request(rid=f"{tag}-{g}-{i}", input_ids=list(prompt), max_new_tokens=args.max_new_tokens,
                        temperature=1.0, generator=torch.Generator().manual_seed(i))
                for i in range(args.group_size)]
        for r in reqs:
            sched.submit(r, lambda _r, done=done: done.release())
        for _ in reqs:
            done.acquire()
        cached += sum(r.cached_tokens for r in reqs)
    return time.perf_counter() - t0, cached


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        path = make_tiny_model(os.path.join(tmp, "model"), hidden_size=args.hidden, num_layers=args.layers,
                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * args.hidden,
                               max_position_embeddings=args.prompt_len + args.max_new_tokens + 8)
        model = LocalModel(path, prefix_cache_tokens=0)
    sched = Scheduler(model, max_batch_size=args.group_size, batch_wait_s=0.005)
    times = {"off": [], "on": []}
    cached = {}
    try:
        for rep in range(args.reps + 1):  # round 0 warms up and is not counted
            for mode in (("off", "on") if rep % 2 else ("on", "off")):
                model.prefix_cache = PrefixCache(1 << 20) if mode == "on" else None
                prompts = [[3 + (7 * g + 13 * j + rep) % 90 for j in range(args.prompt_len)]
                           for g in range(args.groups)]  # fresh prompts each round: no carry-over
                dt, cached[mode] = run_groups(sched, prompts, args, f"{mode}{rep}")
                if rep:
                    times[mode].append(dt)
    finally:
        sched.close()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    cmd = "python -m bench.prefix_cache " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "# bench/prefix_cache results",
        "",
        f"- Machine: CPU, {os.cpu_count()} cores; torch {torch.__version__}; threads = {args.threads}",
        f"- Command: `{cmd.strip()}` ({time.time() - t_start:.0f} s)",
        f"- Model: tiny random Qwen2, {args.layers} layers, width {args.hidden}, fp32",
        f"- Workload: {args.groups} GRPO groups x {args.group_size} samples of one {args.prompt_len}-token prompt "
        f"-> {args.max_new_tokens} new tokens each (temperature 1); a group's requests arrive together.",
        f"- Cached prompt tokens per round: off {cached['off']}, on {cached['on']} "
        f"(= groups x {args.group_size - 1} x {args.prompt_len - 1}).",
        f"- Median of {args.reps} alternating rounds after a warm-up round, same model and scheduler.",
        "",
        "| prefix cache | seconds (median) | all rounds | speedup |",
        "| --- | ---: | --- | ---: |",
        f"| off (every sample prefills its prompt) | {off:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in times['off'])} | 1.00x |",
        f"| on (7 of 8 samples reuse the prompt KV) | {on:.2f} | {', '.join(f'{x:.2f}' for x in times['on'])} | "
        f"{off / on:.2f}x |",
        "",
    ])
    print(text)
    print(f"prefix cache on / off speedup = {off / on:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
