"""Benchmark: the local CPU engine's generation throughput, concurrent (batched) vs one at a time.

    python -m bench.rollout                       # tiny Qwen2 (4 layers, width 128), 32 requests x 64 tokens
    python -m bench.rollout --hidden 256 --layers 4 --requests 64 --max-new-tokens 128
    python -m bench.rollout --help

One engine process (``python -m rollout.engines.local``, fp32, launched and stopped by pid) serves
both phases of the same run: ``sequential`` sends the requests one after another (each decodes
alone), ``concurrent`` sends them all at once (the engine's continuous batching decodes them
together). Every request generates exactly ``--max-new-tokens`` tokens (``ignore_eos``), so both
phases produce the same number of tokens. The phases alternate for ``--reps`` rounds and the
median tokens/s of each is reported with their ratio. Results go to bench/results/rollout-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rollout.config import ClientConfig, LocalEngineConfig, RolloutConfig
from rollout.engines.client import EngineClient
from rollout.engines.protocol import sampling_params
from rollout.engines.start import start_engines
from rollout.tiny_model import make_tiny_model

RESULTS = Path(__file__).resolve().parent / "results" / "rollout-cpu.md"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint (default: a tiny random Qwen2 built here)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


async def _phase(client: EngineClient, prompts, params, concurrent: bool) -> float:
    """Tokens per second of one phase."""
    t0 = time.perf_counter()
    if concurrent:
        outs = await asyncio.gather(*(client.generate(p, params) for p in prompts))
    else:
        outs = [await client.generate(p, params) for p in prompts]
    dt = time.perf_counter() - t0
    return sum(len(o.output_ids) for o in outs) / dt


async def _measure(url: str, args) -> dict:
    cfg = ClientConfig(request_timeout_s=3600)
    prompts = [[3 + (7 * i + j) % 90 for j in range(args.prompt_len)] for i in range(args.requests)]
    params = sampling_params(max_new_tokens=args.max_new_tokens, temperature=1.0, ignore_eos=True)
    res = {"sequential": [], "concurrent": []}
    async with EngineClient(url, config=cfg) as client:
        await client.generate(prompts[0], params)  # warm-up
        for rep in range(args.reps):
            order = ("sequential", "concurrent") if rep % 2 == 0 else ("concurrent", "sequential")
            for name in order:
                res[name].append(await _phase(client, prompts, params, name == "concurrent"))
        info = await client.server_info()
    res["max_batch_seen"] = info["internal_states"][0]["max_batch_seen"]
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        model = args.model or make_tiny_model(os.path.join(tmp, "model"), hidden_size=args.hidden,
                                              num_layers=args.layers, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=4 * args.hidden,
                                              max_position_embeddings=max(512, args.prompt_len
                                                                          + args.max_new_tokens + 8))
        cfg = RolloutConfig(engine="local", precision="fp32", base_port=0, model_path=model, startup_timeout_s=300,
                            local=LocalEngineConfig(max_batch_size=args.max_batch_size, batch_wait_ms=5.0,
                                                    threads=args.threads))
        launched = start_engines(cfg, log_dir=tmp)
        try:
            res = asyncio.run(_measure(launched.urls[0], args))
        finally:
            launched.stop()
    seq, conc = statistics.median(res["sequential"]), statistics.median(res["concurrent"])
    ratio = conc / seq
    cmd = "python -m bench.rollout " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# bench/rollout results",
        "",
        f"- Machine: CPU, {os.cpu_count()} cores ({_cpu_name()}); "
        f"torch {__import__('torch').__version__}; engine threads = {args.threads}",
        f"- Command: `{cmd.strip()}` ({time.time() - t_start:.0f} s)",
        "- Model: " + ('`' + args.model + '`' if args.model
                       else f"tiny random Qwen2, {args.layers} layers, width {args.hidden}, vocab 99") + ", fp32",
        f"- Workload: {args.requests} requests x {args.prompt_len} prompt tokens -> {args.max_new_tokens} new tokens "
        f"(ignore_eos), temperature 1; max batch {args.max_batch_size} (largest batch seen: {res['max_batch_seen']}).",
        f"- Median of {args.reps} alternating rounds, both phases against the same engine process.",
        "",
        "| phase | tokens/s (median) | all rounds | vs sequential |",
        "| --- | ---: | --- | ---: |",
        f"| sequential (one request at a time) | {seq:.1f} | "
        f"{', '.join(f'{x:.1f}' for x in res['sequential'])} | 1.00x |",
        f"| concurrent (continuous batching) | {conc:.1f} | "
        f"{', '.join(f'{x:.1f}' for x in res['concurrent'])} | {ratio:.2f}x |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"concurrent / sequential = {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
