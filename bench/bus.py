"""Benchmark: disk-bus publication vs a plain safetensors save of the same tensors; engine apply time.

    python -m bench.bus                          # tiny-wide Qwen2 (~400 MB fp32), 5 alternating rounds
    python -m bench.bus --hidden 512 --layers 4  # smaller
    python -m bench.bus --dir /shared/fs/tmp     # measure on the filesystem the bus will use

Phases, alternating (forward, then reversed) for ``--reps`` rounds after a warm-up round (medians
reported), all in this process and run:

- ``plain``: ``safetensors.torch.save_file`` of the same tensors, grouped into the same shards, no
  fsync, no checksum (the baseline; its directory is removed outside the timed region);
- ``bus``: ``DiskBus.publish`` as the trainer runs it by default: streamed shards, xxh3_128 of every
  tensor (``bus.checksum``), index + config + manifest, atomic rename, GC of the previous version
  (``keep=1``: one version deleted per publication, as in steady state);
- ``bus_sha256``: the same with ``bus.checksum = sha256``;
- ``bus_fsync``: the default with ``bus.fsync`` on (every file flushed to the disk before the rename);
- ``xxh3_128`` / ``sha256``: only the checksums (the thread pool a verifier uses), nothing written;
  ``sha256_1t``: the same on one thread. SHA-256 is compute-bound, so ``sha256_1t / sha256`` is how
  many cores the hash pool actually got during the run (the machine is shared).

Then one local engine (``python -m rollout.engines.local``, fp32, started and stopped by pid) applies
an xxh3_128 version and a sha256 version with ``/update_weights_from_disk`` (manifest verification
on) and the same shards without a manifest (plain load), ``--reps`` times each.
Results: bench/results/bus-cpu.md.
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

from bench import bus_phases
from bench.rollout import _cpu_name
from rollout.bus import DiskBus
from rollout.bus.disk import hash_pool
from rollout.bus.manifest import submit_digest
from rollout.config import ClientConfig, RolloutConfig
from rollout.engines.client import EngineClient
from rollout.engines.start import start_engines
from rollout.tiny_model import make_tiny_model

RESULTS = Path(__file__).resolve().parent / "results" / "bus-cpu.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bus", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bucket-mb", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
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


PHASES = ("plain", "bus", "bus_sha256", "bus_fsync", "xxh3_128", "sha256", "sha256_1t")
LABELS = {"plain": "plain `safetensors.save_file` (baseline)",
          "bus": "`DiskBus.publish`, default (xxh3_128 per tensor, manifest, atomic rename, GC)",
          "bus_sha256": "`DiskBus.publish`, `bus.checksum = sha256`",
          "bus_fsync": "`DiskBus.publish`, default + fsync on (`bus.fsync`)",
          "xxh3_128": "xxh3_128 of every tensor alone (hash pool, from memory, no write)",
          "sha256": "sha256 of every tensor alone (hash pool, no write)",
          "sha256_1t": "sha256 of every tensor alone, one thread"}


def _timed_gc(bus: DiskBus, sink: list) -> None:
    """Record how long each publication's garbage collection takes: ``DiskBus.publish`` runs it before
    staging (``gc(keep)``) and after the rename (``gc()``, which deletes the previous version); the
    sink gets their sum, one entry per publication."""
    gc = bus.gc
    before: list = []  # the pre-staging pass of the publication under way

    def timed(keep=None):
        t0 = time.perf_counter()
        try:
            return gc(keep)
        finally:
            dt = time.perf_counter() - t0
            if keep is None:
                sink.append(sum(before) + dt)
                before.clear()
            else:
                before.append(dt)
    bus.gc = timed


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
        res: dict = {k: [] for k in PHASES}
        buses = {"bus": DiskBus(os.path.join(root, "bus"), keep=1),
                 "bus_sha256": DiskBus(os.path.join(root, "bus-sha256"), keep=1, checksum="sha256"),
                 "bus_fsync": DiskBus(os.path.join(root, "bus-fsync"), keep=1, fsync=True)}
        gc_s: dict = {k: [] for k in buses}  # per publication, the warm-up round's first
        for k, b in buses.items():
            _timed_gc(b, gc_s[k])
        version = 0
        for rep in range(args.reps + 1):  # round 0 warms the page cache and is not counted
            order = PHASES if rep % 2 else PHASES[::-1]
            for name in order:
                if name in ("xxh3_128", "sha256", "sha256_1t"):
                    algorithm = name.removesuffix("_1t")
                    with hash_pool(1 if name.endswith("_1t") else None) as pool:
                        dt = _timed(lambda pool=pool, algorithm=algorithm: [
                            r() for r in [submit_digest(t, pool, algorithm) for _, t in named]])
                elif name == "plain":
                    d = os.path.join(root, f"plain-{rep}")
                    dt = _timed(lambda d=d: _plain(named, bucket, d))
                    shutil.rmtree(d)
                else:
                    dt = _timed(lambda name=name, version=version: buses[name].publish(
                        version + 1, named, config=config, bucket_bytes=bucket))
                if rep:
                    res[name].append(dt)
            version += 1
        med = {k: statistics.median(v) for k, v in res.items()}
        # Apply: bus versions (verified with their manifest's algorithm) and the same shards without a
        # manifest (plain load).
        paths = {"xxh3_128": buses["bus"].path(version), "sha256": buses["bus_sha256"].path(version)}
        plain_dir = os.path.join(root, "plain-apply")
        _plain(named, bucket, plain_dir)
        cfg = RolloutConfig(engine="local", precision="fp32", base_port=0, model_path=model_dir, startup_timeout_s=600)
        launched = start_engines(cfg, log_dir=root)
        try:
            url = launched.urls[0]
            t_apply = {"xxh3_128": asyncio.run(_apply(url, paths["xxh3_128"], str(version), args.reps)),
                       "sha256": asyncio.run(_apply(url, paths["sha256"], str(version), args.reps)),
                       "plain": asyncio.run(_apply(url, plain_dir, str(version), args.reps))}
        finally:
            launched.stop()
        phases = bus_phases.run(named, config, root, bucket, 2, args.reps)  # the trainer's staged path
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    ratio = med["plain"] / med["bus"]
    paired = sorted(p / b for p, b in zip(res["plain"], res["bus"], strict=True))  # same round: similar machine load
    paired_sha = sorted(p / b for p, b in zip(res["plain"], res["bus_sha256"], strict=True))
    gc_bus = gc_s["bus"][1:]
    no_gc = sorted(p / (b - g) for p, b, g in zip(res["plain"], res["bus"], gc_bus, strict=True))
    cores = med["sha256_1t"] / med["sha256"]
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
    for k in PHASES:
        lines.append(f"| {LABELS[k]} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in res[k])} | {gbps[k]:.2f} | "
                     f"{med['plain'] / med[k]:.2f}x |")
    lines += [
        "",
        "| engine apply (`/update_weights_from_disk`, local engine) | seconds (median) | all | GB/s |",
        "| --- | ---: | --- | ---: |",
    ]
    for k, label in (("xxh3_128", "bus version, xxh3_128 of every tensor checked"),
                     ("sha256", "bus version, sha256 of every tensor checked"),
                     ("plain", "same shards, no manifest (no check)")):
        t = t_apply[k]
        lines.append(f"| {label} | {statistics.median(t):.3f} | {', '.join(f'{x:.3f}' for x in t)} | "
                     f"{nbytes / statistics.median(t) / 1e9:.2f} |")
    lines += [
        "",
        f"Publish throughput ratio bus / plain = **{ratio:.2f}** (ratio of medians; goal >= 0.8); per round "
        f"(plain and bus run back to back): {', '.join(f'{x:.2f}' for x in paired)}. With "
        f"`bus.checksum = sha256`: {med['plain'] / med['bus_sha256']:.2f} (per round "
        f"{', '.join(f'{x:.2f}' for x in paired_sha)}).",
        "",
        f"Where the time goes (medians): the plain save writes {nbytes / 1e6:.0f} MB into the page cache in "
        f"{med['plain']:.3f} s; the default bus publication takes {med['bus'] - med['plain']:+.3f} s more. Of "
        f"that, deleting the previous version (GC, `keep=1`, as every steady-state publication does) is "
        f"{statistics.median(gc_bus):.3f} s, which the baseline does not pay (its directory is removed outside "
        f"its timing): bus without its GC / plain, per round: {', '.join(f'{x:.2f}' for x in no_gc)}. "
        f"The rest ({med['bus'] - med['plain'] - statistics.median(gc_bus):.3f} s) is the checksums (xxh3_128 "
        f"alone: {med['xxh3_128']:.3f} s, {nbytes / med['xxh3_128'] / 1e9:.1f} GB/s, on the hash pool while "
        f"the writer writes) plus index, manifest and rename. The hash pool got {cores:.2f} cores' worth of "
        f"SHA-256 throughput ({nbytes / med['sha256_1t'] / 1e9:.2f} GB/s on one thread, "
        f"{nbytes / med['sha256'] / 1e9:.2f} GB/s on {os.cpu_count()} threads): where that is near 1, other "
        f"jobs held the second core and the hashing could not overlap the write.",
        "",
    ]
    lines += bus_phases.table(phases, nbytes, 2)
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
