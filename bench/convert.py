"""Benchmark: HF <-> Megatron conversion time against copying the same safetensors bytes.

    python -m bench.convert                          # ~400 MB bf16 Qwen2-style model, TP x PP = 1x1, 2x1, 1x2
    python -m bench.convert --hidden 1024 --layers 16 --layouts 1x1
    python -m bench.convert --help

The baseline is the I/O floor of any converter: read every tensor of the HF checkpoint
(``safe_open``, one tensor at a time) and write the same tensors into safetensors files of the same
sharding, in one process. Measured in the same run, interleaved rep by rep inside one spawned
world per layout (process start and imports excluded; the CLI adds those once per command):

* ``hf->mcore``: :func:`megatron_alp.convert.pipeline.hf_to_mcore` (build the chunk, stream the HF
  tensors in, ``dist_checkpointing`` save);
* ``mcore->hf``: :func:`megatron_alp.convert.pipeline.mcore_to_hf` (load with resharding, gather
  over TP, write HF shards + index).

Time: the minimum over the reps (files are in the page cache after the first rep, for every
method alike); ratio = conversion / copy.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_alp.runtime.spawn import run_world


def make_model(path: str, hidden: int, layers: int, vocab: int, ffn: int, dtype: torch.dtype) -> int:
    """A random Qwen2 checkpoint (5 shards or so); returns its size in bytes."""
    import transformers

    cfg = transformers.Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=max(2, hidden // 256), intermediate_size=ffn,
                                   vocab_size=vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=f"{max(1, size // 5 // 2**20)}MB")
    return size


def copy_safetensors(src: str, dst: str) -> None:
    """Read every tensor one at a time and write them with the same file layout (the baseline)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    index = os.path.join(src, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    for file in files:
        with safe_open(os.path.join(src, file), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, os.path.join(dst, file), metadata={"format": "pt"})
        del tensors


def _world(rank, world_size, src, work, tp, pp, reps):
    import torch.distributed as dist

    from megatron_alp.convert.pipeline import hf_to_mcore, mcore_to_hf
    from megatron_alp.runtime.distributed import init_distributed

    init_distributed()
    times = {"copy": [], "hf->mcore": [], "mcore->hf": []}
    for rep in range(reps):
        dirs = {k: os.path.join(work, f"{k}-{rep}") for k in ("copy", "mcore", "hf")}

        def timed(name, fn):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)

        timed("copy", lambda dirs=dirs: copy_safetensors(src, dirs["copy"]) if rank == 0 else None)
        timed("hf->mcore", lambda dirs=dirs: hf_to_mcore(src, dirs["mcore"], tp, pp, progress=False))
        timed("mcore->hf", lambda dirs=dirs: mcore_to_hf(dirs["mcore"], dirs["hf"], tp, pp, progress=False))
        dist.barrier()
        if rank == 0:
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--layouts", default="1x1,2x1,1x2", help="comma-separated TPxPP")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown results file (default bench/results/convert-{cpu,gpu}.md)")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="bench-convert-")
    rows = []
    try:
        src = os.path.join(work, "src")
        size = make_model(src, args.hidden, args.layers, args.vocab, args.ffn, dtype)
        for layout in args.layouts.split(","):
            tp, pp = (int(x) for x in layout.lower().split("x"))
            results = run_world(_world, tp * pp, args=(src, work, tp, pp, args.reps), timeout=3600)
            t = {k: max(min(r[k]) for r in results) for k in results[0]}  # min over reps, max over ranks
            for name in ("hf->mcore", "mcore->hf"):
                rows.append((tp, pp, name, t["copy"], t[name], t[name] / t["copy"]))
                print(f"TP={tp} PP={pp} {name}: {t[name]:.2f} s vs copy {t['copy']:.2f} s "
                      f"-> ratio {t[name] / t['copy']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cmd = "python -m bench.convert" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    lines = [
        "# bench/convert results", "",
        f"- Machine: {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}); torch {torch.__version__}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- Command: `{cmd}` ({time.perf_counter() - t_start:.0f} s)",
        f"- Model: random Qwen2, hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}, "
        f"{args.dtype}: {size / 2**20:.0f} MiB in 5 safetensors shards",
        "- copy = read every tensor (safe_open) and write the same bytes as safetensors, one process (the I/O "
        "floor); conversion times inside a spawned world (process start and imports excluded); min of "
        f"{args.reps} reps, max over ranks; ratio = conversion / copy.", "",
        "| TP | PP | direction | copy (s) | conversion (s) | ratio |", "| ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {tp} | {pp} | {name} | {c:.2f} | {v:.2f} | {r:.2f}x |" for tp, pp, name, c, v, r in rows]
    out = Path(args.out or f"bench/results/convert-{'gpu' if torch.cuda.is_available() else 'cpu'}.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
