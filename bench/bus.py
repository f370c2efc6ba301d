"""Benchmark: disk-bus publication vs a plain safetensors save of the same tensors; engine apply time.

    python -m bench.bus                          # tiny-wide Qwen2 (~400 MB fp32), 3 alternating rounds
    python -m bench.bus --hidden 512 --layers 4  # smaller
    python -m bench.bus --dir /shared/fs/tmp     # measure on the filesystem the bus will use

Phases, alternating for ``--reps`` rounds (medians reported), all in this process and run:

- ``plain``: ``safetensors.torch.save_file`` of the same tensors, grouped into the same shards, no
  fsync, no checksum (the baseline);
- ``bus``: ``DiskBus.publish`` as the trainer runs it by default: streamed shards, sha256 of every
  tensor, index + config + manifest, atomic rename, GC;
- ``bus, fsync``: the same with ``bus.fsync`` on (every file flushed to the disk before the rename);
- ``sha256``: only the checksums (the thread pool the bus uses), nothing written.

Then one local engine (``python -m rollout.engines.local``, fp32, started and stopped by pid) applies
a bus version with ``/update_weights_from_disk`` (manifest verification on) and the same shards
without a manifest (plain load), ``--reps`` times each. Results: bench/results/bus-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.rollout import _cpu_name
from rollout.bus import DiskBus
from rollout.bus.disk import hash_pool
from rollout.bus.manifest import submit_digest
from rollout.config import ClientConfig, RolloutConfig
from rollout.engines.client import EngineClient
from rollout.engines.launch import launch_engines
from rollout.tiny_model import make_tiny_model

RESULTS = Path(__file__).resolve().parent / "results" / "bus-cpu.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bus", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bucket-mb", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def _shards(named, bucket_bytes):
    out, cur, size = [], {}, 0
    for n, t in named:
        nb = t.numel() * t.element_size()
        if cur and size + nb > bucket_bytes:
            out.append(cur)
            cur, size = {}, 0
        cur[n] = t
        size += nb
    return out + ([cur] if cur else [])


def _plain(named, bucket_bytes, out_dir):
    from safetensors.torch import save_file

    os.makedirs(out_dir)
    for i, shard in enumerate(_shards(named, bucket_bytes)):
        save_file(shard, os.path.join(out_dir, f"model-{i:05d}.safetensors"), metadata={"format": "pt"})


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def _apply(url, path, version, reps):
    times = []
    async with EngineClient(url, config=ClientConfig(control_timeout_s=3600)) as c:
        for _ in range(reps):
            t0 = time.perf_counter()
            await c.update_weights_from_disk(path, weight_version=version)
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    root = tempfile.mkdtemp(prefix="bench-bus-", dir=args.dir)
    try:
        model_dir = make_tiny_model(os.path.join(root, "model"), hidden_size=args.hidden, num_layers=args.layers,
                                    num_attention_heads=8, num_key_value_heads=8,
                                    intermediate_size=int(2.75 * args.hidden))
        from safetensors.torch import load_file

        named = sorted(load_file(os.path.join(model_dir, "model.safetensors")).items())
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        config = json.load(open(os.path.join(model_dir, "config.json")))
        bucket = args.bucket_mb * 2 ** 20
        res = {"plain": [], "bus": [], "bus_fsync": [], "sha256": []}
        buses = {"bus": DiskBus(os.path.join(root, "bus"), keep=1),
                 "bus_fsync": DiskBus(os.path.join(root, "bus-fsync"), keep=1, fsync=True)}
        version = 0
        for rep in range(args.reps + 1):  # round 0 warms the page cache and is not counted
            order = ["plain", "bus", "bus_fsync", "sha256"] if rep % 2 else ["sha256", "bus_fsync", "bus", "plain"]
            for name in order:
                if name == "sha256":
                    with hash_pool() as pool:
                        dt = _timed(lambda: [r() for r in [submit_digest(t, pool) for _, t in named]])
                elif name == "plain":
                    d = os.path.join(root, f"plain-{rep}")
                    dt = _timed(lambda: _plain(named, bucket, d))
                    shutil.rmtree(d)
                else:
                    dt = _timed(lambda: buses[name].publish(version + 1, named, config=config, bucket_bytes=bucket))
                if rep:
                    res[name].append(dt)
            version += 1
        med = {k: statistics.median(v) for k, v in res.items()}
        # Apply: a bus version (verified) and the same shards without a manifest (plain load).
        bus_path = buses["bus"].path(version)
        plain_dir = os.path.join(root, "plain-apply")
        _plain(named, bucket, plain_dir)
        cfg = RolloutConfig(engine="local", precision="fp32", base_port=0, model_path=model_dir, startup_timeout_s=600)
        launched = launch_engines(cfg, log_dir=root)
        try:
            t_verified = asyncio.run(_apply(launched.urls[0], bus_path, str(version), args.reps))
            t_plain = asyncio.run(_apply(launched.urls[0], plain_dir, str(version), args.reps))
        finally:
            launched.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = med["plain"] / med["bus"]
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    cmd = "python -m bench.bus " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# bench/bus results",
        "",
        f"- Machine: CPU, {os.cpu_count()} cores ({_cpu_name()}); torch {torch.__version__}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; shared with other jobs (noisy)",
        f"- Command: `{cmd.strip()}` ({time.time() - t_start:.0f} s); written to "
        f"{'`' + args.dir + '`' if args.dir else 'a temporary directory (page cache)'}",
        f"- Tensors: a random Qwen2, {args.layers} layers, width {args.hidden}, fp32: {len(named)} tensors, "
        f"{nbytes / 1e6:.0f} MB, buckets of {args.bucket_mb} MiB",
        f"- Median of {args.reps} alternating rounds after one warm-up round, all phases in the same run.",
        "",
        "| publish | seconds (median) | all rounds | GB/s | throughput vs plain save |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    labels = {"plain": "plain `safetensors.save_file` (baseline)",
              "bus": "`DiskBus.publish` (default: sha256 per tensor, manifest, atomic rename)",
              "bus_fsync": "`DiskBus.publish`, fsync on (`bus.fsync`)",
              "sha256": "sha256 of every tensor alone (hash pool, no write)"}
    for k in ("plain", "bus", "bus_fsync", "sha256"):
        lines.append(f"| {labels[k]} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in res[k])} | {gbps[k]:.2f} | "
                     f"{med['plain'] / med[k]:.2f}x |")
    lines += [
        "",
        "| engine apply (`/update_weights_from_disk`, local engine) | seconds (median) | all | GB/s |",
        "| --- | ---: | --- | ---: |",
        f"| bus version (sha256 of every tensor checked) | {statistics.median(t_verified):.3f} | "
        f"{', '.join(f'{x:.3f}' for x in t_verified)} | {nbytes / statistics.median(t_verified) / 1e9:.2f} |",
        f"| same shards, no manifest (no check) | {statistics.median(t_plain):.3f} | "
        f"{', '.join(f'{x:.3f}' for x in t_plain)} | {nbytes / statistics.median(t_plain) / 1e9:.2f} |",
        "",
        f"Publish throughput ratio bus / plain = **{ratio:.2f}** (goal >= 0.8).",
        "",
        f"Where the time goes: the checksums alone take {med['sha256']:.3f} s ({med['sha256'] / med['bus']:.0%} of "
        f"the bus publication) on {os.cpu_count()} cores; the baseline writes into the page cache at memcpy "
        f"speed, so on this machine SHA-256 (the fastest cryptographic hash in the standard library here) "
        f"bounds the ratio. On a trainer node (many cores, a shared filesystem at a few GB/s) the hash pool "
        f"keeps up with the write; the engine-side check costs the same per byte.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
