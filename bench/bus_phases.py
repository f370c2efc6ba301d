"""The disk bus's publication phase by phase, as the trainer runs it with pipeline stages (issue 21).

    python -m bench.bus_phases [--hidden 1024 --layers 8 --stages 2 --reps 5 --dir /shared/fs/tmp]

(also run by ``python -m bench.bus``, which appends this table to its results). The tensors of a
random Qwen2 are split into ``--stages`` pipeline stages; each round publishes them the trainer's
way: ``DiskBus.stage`` (GC of old versions first), one ``PartWriter`` per stage (buckets copied to
host memory on the caller's thread, written and hashed on the writer thread), each stage verifying
its own shards (``verify_part``), then ``finalize`` requiring every stage's part by name (merge the
parts, index, config, manifest), the atomic rename, and GC. The stages run one after another here
(one process); on a cluster they run in parallel on their own nodes, which the 70B estimate in
docs/bus.md accounts for. Baseline in the same rounds: ``safetensors.save_file`` of the same shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Dict, List

from rollout.bus import DiskBus
from rollout.bus import disk as disk_mod
from rollout.bus.disk import hash_pool, verify_part

PHASES = ("copy_to_host", "write_wait", "write", "verify", "merge", "rename", "gc", "publish_verify",
          "publish_noverify", "plain")
LABELS = {"copy_to_host": "copy to host (caller thread; CPU tensors here: a no-op copy)",
          "write_wait": "waiting for the writer thread (write + hash not hidden behind the next bucket)",
          "write": "all stage writers, add to close (copy, write, hash; stages in sequence here)",
          "verify": "each stage re-reads and checks its own shards (`verify_part`, stages in sequence here)",
          "merge": "finalize without rename and GC: parts by name, index, config, manifest",
          "rename": "atomic rename of the version directory",
          "gc": "GC (before staging and after the rename)",
          "publish_verify": "whole publication, `bus.verify` on (default)",
          "publish_noverify": "whole publication, `bus.verify` off",
          "plain": "plain `safetensors.save_file` of the same shards (baseline)"}


def _split(named, stages: int):
    per = -(-len(named) // stages)
    return [named[i * per:(i + 1) * per] for i in range(stages)]


def _timed_attr(obj, name: str, sink: List[float]):
    real = getattr(obj, name)

    def wrapped(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            sink.append(time.perf_counter() - t0)
    setattr(obj, name, wrapped)
    return real


def publish_once(bus: DiskBus, version: int, parts, config, bucket: int, verify: bool) -> Dict[str, float]:
    t: Dict[str, float] = {}
    gc_s: List[float] = []
    rename_s: List[float] = []
    real_gc = _timed_attr(bus, "gc", gc_s)
    real_rename = _timed_attr(disk_mod.os, "rename", rename_s)
    try:
        t0 = time.perf_counter()
        staged = bus.stage(version)
        t["copy_to_host"] = t["write_wait"] = t["write"] = t["verify"] = 0.0
        with hash_pool() as pool:
            for s, named in enumerate(parts):
                t1 = time.perf_counter()
                w = bus.writer(staged, f"pp{s}", bucket, pool)
                for n, x in named:
                    w.add(n, x)
                entries, _ = w.close()
                t["write"] += time.perf_counter() - t1
                t["copy_to_host"] += w.seconds["copy_to_host"]
                t["write_wait"] += w.seconds["write_wait"]
                if verify:
                    t2 = time.perf_counter()
                    verify_part(staged, entries, bus.checksum, pool)
                    t["verify"] += time.perf_counter() - t2
        t3 = time.perf_counter()
        bus.finalize(staged, version, config=config, parts=[f"pp{s}" for s in range(len(parts))])
        fin = time.perf_counter() - t3
        t["total"] = time.perf_counter() - t0
    finally:
        bus.gc = real_gc
        disk_mod.os.rename = real_rename
    t["gc"], t["rename"] = sum(gc_s), sum(rename_s)
    t["merge"] = fin - t["rename"] - gc_s[-1]
    return t


def run(named, config, root: str, bucket: int, stages: int, reps: int) -> Dict[str, List[float]]:
    from safetensors.torch import save_file

    parts = _split(named, stages)
    res: Dict[str, List[float]] = {k: [] for k in PHASES}
    buses = {True: DiskBus(os.path.join(root, "bus-v"), keep=2), False: DiskBus(os.path.join(root, "bus-nv"), keep=2)}
    for rep in range(reps + 1):  # round 0 warms up
        for verify in ((True, False) if rep % 2 else (False, True)):
            t = publish_once(buses[verify], rep, parts, config, bucket, verify)
            if rep and verify:
                for k in ("copy_to_host", "write_wait", "write", "verify", "merge", "rename", "gc"):
                    res[k].append(t[k])
            if rep:
                res["publish_verify" if verify else "publish_noverify"].append(t["total"])
        d = os.path.join(root, f"plain-{rep}")
        os.makedirs(d)
        t0 = time.perf_counter()
        for s, named_s in enumerate(parts):
            shard: dict = {}
            size, i = 0, 0
            for n, x in named_s:
                if shard and size + x.numel() * x.element_size() > bucket:
                    save_file(shard, os.path.join(d, f"m{s}-{i}.safetensors"))
                    shard, size, i = {}, 0, i + 1
                shard[n] = x
                size += x.numel() * x.element_size()
            if shard:
                save_file(shard, os.path.join(d, f"m{s}-{i}.safetensors"))
        if rep:
            res["plain"].append(time.perf_counter() - t0)
        shutil.rmtree(d)
    return res


def table(res: Dict[str, List[float]], nbytes: int, stages: int) -> List[str]:
    med = {k: statistics.median(v) for k, v in res.items()}
    lines = [f"### Publication phase by phase ({stages} stage writers, `bus.keep = 2`; bench/bus_phases.py)", "",
             "| phase | seconds (median) | all rounds | GB/s of the version |", "| --- | ---: | --- | ---: |"]
    for k in PHASES:
        rate = f"{nbytes / med[k] / 1e9:.2f}" if med[k] > 1e-4 else "-"
        lines.append(f"| {LABELS[k]} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in res[k])} | {rate} |")
    lines += ["", f"Publication / plain save: **{med['publish_verify'] / med['plain']:.2f}x** with verification, "
                  f"**{med['publish_noverify'] / med['plain']:.2f}x** without (time ratios of medians); verification "
                  f"re-reads at {nbytes / max(med['verify'], 1e-9) / 1e9:.2f} GB/s, the writers write at "
                  f"{nbytes / max(med['write'], 1e-9) / 1e9:.2f} GB/s (page cache here).", ""]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bus_phases", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--bucket-mb", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None)
    a = p.parse_args(argv)
    from safetensors.torch import load_file

    from rollout.tiny_model import make_tiny_model

    root = tempfile.mkdtemp(prefix="bench-bus-phases-", dir=a.dir)
    try:
        model = make_tiny_model(os.path.join(root, "model"), hidden_size=a.hidden, num_layers=a.layers,
                                num_attention_heads=8, num_key_value_heads=8, intermediate_size=int(2.75 * a.hidden))
        named = sorted(load_file(os.path.join(model, "model.safetensors")).items())
        config = json.load(open(os.path.join(model, "config.json")))
        res = run(named, config, root, a.bucket_mb * 2 ** 20, a.stages, a.reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(table(res, sum(t.numel() * t.element_size() for _, t in named), a.stages)))


if __name__ == "__main__":
    main()
