"""Benchmark: the demo's rollout phase (`perf/rollout_s`) on the local engine, new paths vs the old.

    python -m bench.rollout_demo                 # 16 prompts x 8 samples x 6 tokens, fp8, 10 rounds
    python -m bench.rollout_demo --help

The workload is the demo's (configs/experiments/demo_tiny_cpu.yaml): its tiny Qwen2 shape (4 layers,
width 64, digits vocabulary; random weights here), copy-task prompts ``c:NNN=``, ``n_samples`` 8,
``max_new_tokens`` 6, temperature 1, emulated FP8, a per-sample ``sampling_seed``, the synthetic
reward, one :class:`rollout.generate.RolloutGenerator` over a :class:`rollout.fleet.Fleet`, exactly the
trainer's rollout call. Two engine processes serve it in the same run, one after the other in
alternating order each round (same prompts in a round, new prompts each round, as each RL step):

- ``baseline``: one HTTP request per sample, to an engine with ``--reference-paths`` (sampling row by
  row, every repeat of a prompt prefilled again, every FP8 activation quantized alone) at the demo's
  former ``max_batch_size`` 64;
- ``new``: one batch request per group (``Fleet.generate_batch``) to an engine on the batched paths at
  the demo's ``max_batch_size`` (128 = 16 prompts x 8: one batch).

It prints the median seconds per rollout of each, their ratio, the engine's forwards per rollout
(prefills + decode steps, from /server_info) and how many samples came out identical. Results go
to bench/results/rollout-demo-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rollout.config import LocalEngineConfig, RolloutConfig
from rollout.data import Prompt
from rollout.engines.client import EngineClient
from rollout.engines.processes import ServerProcess, free_port, start_all
from rollout.engines.start import local_engine_command
from rollout.fleet import Fleet
from rollout.generate import RolloutGenerator
from rollout.tiny_model import make_tiny_model

RESULTS = Path(__file__).resolve().parent / "results" / "rollout-demo-cpu.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.rollout_demo", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per rollout (run.prompts_per_step)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (rollout.n_samples)")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--precision", default="fp8")
    p.add_argument("--max-batch-size", type=int, default=128, help="the new engine's batch (the demo's)")
    p.add_argument("--baseline-max-batch-size", type=int, default=64, help="the baseline engine's batch")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def _prompts(tok, count: int, rnd: random.Random):
    out = []
    for i in range(count):
        text = f"c:{rnd.randrange(1000):03d}="
        out.append(Prompt(prompt_ids=tok.encode(text, add_special_tokens=False), text=text, label=text[2:5], index=i))
    return out


async def _stats(client: EngineClient) -> dict:
    return (await client.server_info())["internal_states"][0]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(gen: RolloutGenerator, client: EngineClient, pid: int, prompts, seed: int):
    before = await _stats(client)
    t0, c0, e0 = time.perf_counter(), time.process_time(), _cpu_s(pid)
    samples = await gen.generate(prompts, seed=seed)
    dt, cpu = time.perf_counter() - t0, (time.process_time() - c0, _cpu_s(pid) - e0)
    after = await _stats(client)
    await client.flush_cache()  # as the demo's weight update each step
    forwards = (after["prefills"] - before["prefills"]) + (after["steps"] - before["steps"])
    return dt, forwards, cpu, [(s.response_ids,) for s in samples]


class _PerSample:
    """A fleet seen without ``generate_batch``: the generator sends one request per sample."""

    def __init__(self, fleet: Fleet):
        self.generate = fleet.generate


async def _measure(urls, pids, tok, args):
    cfg = RolloutConfig(engine="local", n_samples=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0,
                        reward="synthetic", seed=7)
    fleets = {name: Fleet.from_urls([url]) for name, url in urls.items()}
    clients = {name: EngineClient(url) for name, url in urls.items()}
    # the baseline sends each sample as its own request, as the generator did before batch requests
    gens = {name: RolloutGenerator(_PerSample(f) if name == "baseline" else f, tok, cfg) for name, f in fleets.items()}
    res = {name: {"s": [], "forwards": [], "client_cpu": [], "engine_cpu": []} for name in urls}
    same = total = 0
    rnd = random.Random(0)
    try:
        for name in urls:  # warm-up round (not counted)
            await _round(gens[name], clients[name], pids[name], _prompts(tok, args.prompts, rnd), 7)
        for k in range(args.rounds):
            prompts = _prompts(tok, args.prompts, rnd)
            order = list(urls) if k % 2 == 0 else list(urls)[::-1]
            outs = {}
            for name in order:
                dt, fw, cpu, outs[name] = await _round(gens[name], clients[name], pids[name], prompts, 7 + k)
                res[name]["s"].append(dt)
                res[name]["forwards"].append(fw)
                res[name]["client_cpu"].append(cpu[0])
                res[name]["engine_cpu"].append(cpu[1])
            same += sum(a[0] == b[0] for a, b in zip(outs["baseline"], outs["new"], strict=True))
            total += len(outs["new"])
    finally:
        for f in list(fleets.values()) + list(clients.values()):
            await f.close()
    res["same"], res["total"] = same, total
    return res


def _engine(cfg: RolloutConfig, model: str, reference: bool, log_dir: str, name: str) -> ServerProcess:
    port = free_port()
    cmd = local_engine_command(cfg, model, port) + (["--reference-paths"] if reference else [])
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", os.path.join(log_dir, f"{name}.log"), name=name)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-rollout-demo-") as tmp:
        model = make_tiny_model(os.path.join(tmp, "model"), alphabet="digits", hidden_size=64, num_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
        tok = AutoTokenizer.from_pretrained(model)
        base = RolloutConfig(engine="local", precision=args.precision, seed=7,
                             local=LocalEngineConfig(max_batch_size=args.baseline_max_batch_size))
        new = RolloutConfig(engine="local", precision=args.precision, seed=7,
                            local=LocalEngineConfig(max_batch_size=args.max_batch_size))
        servers = start_all([_engine(base, model, True, tmp, "baseline"), _engine(new, model, False, tmp, "new")],
                            timeout_s=300)
        try:
            res = asyncio.run(_measure({"baseline": servers[0].url, "new": servers[1].url},
                                      {"baseline": servers[0].pid, "new": servers[1].pid}, tok, args))
        finally:
            for s in servers:
                s.stop()
    b, n = statistics.median(res["baseline"]["s"]), statistics.median(res["new"]["s"])
    med = {name: {k: statistics.median(v) for k, v in res[name].items()} for name in ("baseline", "new")}
    fb, fn = med["baseline"]["forwards"], med["new"]["forwards"]
    cmd = "python -m bench.rollout_demo " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# bench/rollout_demo results",
        "",
        f"- Machine: CPU, {os.cpu_count()} cores; torch {__import__('torch').__version__}; engine threads = 1; "
        f"load average at the end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- Command: `{cmd.strip()}` ({time.time() - t_start:.0f} s)",
        f"- Workload: the demo's rollout: {args.prompts} prompts x {args.n} samples, {args.max_new_tokens} new tokens "
        f"(stop at EOS), temperature 1, {args.precision}, tiny random Qwen2 (4 layers, width 64, digits vocab), "
        f"one RolloutGenerator over a Fleet; median of {args.rounds} alternating rounds.",
        "",
        "| engine | max batch | s per rollout (median) | all rounds | forwards | engine CPU s | client CPU s "
        "| vs baseline |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        f"| baseline (per-sample requests, --reference-paths) | {args.baseline_max_batch_size} | {b:.3f} | "
        f"{', '.join(f'{x:.3f}' for x in res['baseline']['s'])} | {fb:.0f} | {med['baseline']['engine_cpu']:.3f} | "
        f"{med['baseline']['client_cpu']:.3f} | 1.00x |",
        f"| new (group batch requests, batched paths) | {args.max_batch_size} | {n:.3f} | "
        f"{', '.join(f'{x:.3f}' for x in res['new']['s'])} | {fn:.0f} | {med['new']['engine_cpu']:.3f} | "
        f"{med['new']['client_cpu']:.3f} | {b / n:.2f}x faster |",
        "",
        "Medians per rollout: forwards = the engine's prefills + decode steps (/server_info); engine / client CPU s "
        "= CPU time of the engine process (/proc) and of this process (the generator and its HTTP client), "
        "which contention on a shared machine inflates less than wall time.",
        "",
        f"Samples with identical tokens in both engines: {res['same']} / {res['total']} (the batch size changes "
        f"the bf16 rounding of a forward, so a rare sample may differ; the paths themselves are checked to give "
        f"the same tokens in tests/unit/test_local_batched_paths.py).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"baseline / new = {b / n:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
