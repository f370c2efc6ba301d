"""Benchmark: vocab-parallel log-prob (+ entropy) against the naive log_softmax and Megatron's CE.

    python -m bench.logprob                      # 4096 tokens x 32768 vocab, fp32 + bf16, TP=1 and TP=2
    python -m bench.logprob --big --tokens 2048  # adds a 151936 vocabulary (Qwen2.5), padded as Megatron does
    python -m bench.logprob --methods naive,naive+H,megatron,ours,ours+H   # also the naive entropy
    python -m bench.logprob --help

Every configuration runs in a spawned world of TP processes (gloo on CPU, nccl on GPU), and all
methods are measured in the same run, interleaved rep by rep, on the same shard:

* ``naive``: gather the full vocabulary (at TP > 1, with Megatron's autograd-aware all-gather),
  slice off the padding, ``log_softmax`` in fp32, gather the target (``+H``: and the entropy);
* ``megatron``: ``tensor_parallel.vocab_parallel_cross_entropy`` (log-prob only, no padding or
  temperature support; on fp32 input it overwrites the logits, so every method gets a fresh copy
  made outside the timed region);
* ``megatron+H``: the same plus a separate entropy that keeps the fp32 softmax for backward (the
  way peers add entropy next to Megatron's CE);
* ``ours`` / ``ours+H``: :func:`megatron_alp.ops.logprob.vocab_parallel_logprobs`.

Time: forward + backward of ``sum(output)``, the minimum over the reps, the maximum over ranks.
Memory, two numbers per method, both relative to one fp32 buffer of the shard's size
(``tokens x V_shard x 4`` bytes):

* ``saved``: bytes saved for backward that are *new* memory (tensors not sharing the input's
  storage), counted exactly with ``torch.autograd.graph.saved_tensors_hooks``;
* ``peak``: on CPU the measured growth of the process's peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over forward + backward, above the RSS with the input in place; it
  includes the gradient (one shard in the input dtype, which every method must produce) and
  allocator noise of a few MiB (glibc's mmap threshold is fixed at 64 KiB for that rep so freed
  buffers leave the RSS; 32 MiB, glibc's steady state, for the timed reps). On a GPU
  ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the forward.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from megatron_alp.runtime.spawn import run_world

METHODS = ("naive", "naive+H", "megatron", "megatron+H", "ours", "ours+H")
# naive+H is the slowest by far (~5 s a rep at the default size on 2 cores): opt in with --methods.
DEFAULT_METHODS = ("naive", "megatron", "ours", "ours+H")
QWEN_VOCAB = 151936


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


class _Peak:
    """Peak memory growth of this process over a region, in bytes."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base


def _mmap_threshold(nbytes: int) -> None:
    """Fix glibc's mmap threshold: allocations >= nbytes get their own mmap (returned on free).

    glibc's default threshold grows up to 32 MiB after large frees, so later buffers come from a
    heap whose freed pages are still resident and RSS would miss them: the memory rep runs with
    64 KiB; the timed reps with 32 MiB (glibc's steady state). Applied to every method alike; a
    no-op where glibc is absent.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _methods(target, vocab_size, group, tp):
    from megatron.core import tensor_parallel

    from megatron_alp.ops.logprob import vocab_parallel_logprobs

    def naive(z, entropy):
        full = tensor_parallel.gather_from_tensor_model_parallel_region(z) if tp > 1 else z
        ls = torch.log_softmax(full[..., :vocab_size].float(), dim=-1)
        lp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return lp - (ls.exp() * ls).sum(-1) if entropy else lp

    def ours(z, entropy):
        out = vocab_parallel_logprobs(z, target, tp_group=group, vocab_size=vocab_size, with_entropy=entropy)
        return out[0] + out[1] if entropy else out

    def softmax_entropy(z):
        # The way peers add entropy next to Megatron's CE (e.g. verl's vocab-parallel entropy):
        # fp32 softmax of the shard kept for backward, sums all-reduced over TP.
        zf = z.float() if z.dtype != torch.float32 else z.clone()  # Megatron's CE edits fp32 logits in place
        m = zf.detach().max(-1, keepdim=True).values
        if tp > 1:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        e = (zf - m).exp()
        s = tensor_parallel.reduce_from_tensor_model_parallel_region(e.sum(-1, keepdim=True))
        p = e / s
        pz = tensor_parallel.reduce_from_tensor_model_parallel_region((p * zf).sum(-1))
        return (s.log() + m).squeeze(-1) - pz

    return {
        "megatron+H": lambda z: softmax_entropy(z) - tensor_parallel.vocab_parallel_cross_entropy(z, target),
        "naive": lambda z: naive(z, False),
        "naive+H": lambda z: naive(z, True),
        "megatron": lambda z: -tensor_parallel.vocab_parallel_cross_entropy(z, target),
        "ours": lambda z: ours(z, False),
        "ours+H": lambda z: ours(z, True),
    }


def _worker(rank, world_size, tokens, vocab, dtype_name, reps, methods):
    import warnings

    import torch.distributed as dist

    # Megatron's import-time notices (no TE/Apex) and its deprecated all-gather call in the naive path.
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megatron.core import parallel_state as ps

    from megatron_alp.config import ParallelConfig
    from megatron_alp.model.vocab import padded_vocab_size
    from megatron_alp.runtime.distributed import init_parallel_state

    init_parallel_state(ParallelConfig(tp=world_size))
    group = ps.get_tensor_model_parallel_group()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    padded = padded_vocab_size(vocab, 128, world_size)
    v_shard = padded // world_size
    g = torch.Generator().manual_seed(1234 + rank)
    shard = (torch.randn(tokens, v_shard, generator=g) * 2).to(dtype).to(device)
    target = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(99)).to(device)
    fns = _methods(target, vocab, group, world_size)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {m: [] for m in methods}
    mem = {}
    for rep in range(reps + 1):  # rep 0 warms up and measures memory
        if device.type == "cpu":
            _mmap_threshold(64 * 1024 if rep == 0 else 32 * 1024 * 1024)
        for m in methods:
            z = shard.clone().requires_grad_()
            gc.collect()
            sync()
            dist.barrier(group=group)
            if rep == 0:
                saved = {}  # storage -> bytes: a tensor saved twice (or views of one) counts once

                def pack(t, z=z, saved=saved):
                    st = t.untyped_storage()
                    if st.data_ptr() != z.untyped_storage().data_ptr():
                        saved[st.data_ptr()] = st.nbytes()
                    return t

                with _Peak(device) as peak:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        out = fns[m](z)
                    out.sum().backward()
                    del out
                mem[m] = (sum(saved.values()), peak.peak)
            else:
                t0 = time.perf_counter()
                out = fns[m](z)
                out.sum().backward()
                sync()
                times[m].append(time.perf_counter() - t0)
                del out
            del z
    best = torch.tensor([min(times[m]) for m in methods], dtype=torch.float64)
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    mem_t = torch.tensor([[mem[m][0], mem[m][1]] for m in methods], dtype=torch.float64)
    dist.all_reduce(mem_t, op=dist.ReduceOp.MAX, group=group)
    shard_fp32 = tokens * v_shard * 4
    return {
        m: {"time_s": float(best[i]), "saved": float(mem_t[i, 0]) / shard_fp32, "peak": float(mem_t[i, 1]) / shard_fp32}
        for i, m in enumerate(methods)
    } | {"_meta": {"v_shard": v_shard, "padded": padded, "device": str(device)}}


def _device_description() -> str:
    if torch.cuda.is_available():
        return f"GPU, {torch.cuda.get_device_name()}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return f"CPU, {os.cpu_count()} cores ({model})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768], help="real vocabulary sizes")
    ap.add_argument("--big", action="store_true", help=f"add a {QWEN_VOCAB} vocabulary (needs ~10 GB at 4096 tokens)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--reps", type=int, default=3, help="timed reps (after one warm-up/memory rep)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {','.join(METHODS)}")
    ap.add_argument("--out", default=None, help="markdown results file (default bench/results/logprob-{cpu,gpu}.md)")
    ap.add_argument("--append", action="store_true",
                    help="append a section to the results file instead of replacing it")
    args = ap.parse_args(argv)
    vocabs = list(args.vocab) + ([QWEN_VOCAB] if args.big else [])
    methods = tuple(args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    device = _device_description()
    command = "python -m bench.logprob" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:]))
    print(f"# {device}; torch {torch.__version__}; {command}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for vocab in vocabs:
        for dtype in args.dtypes.split(","):
            for tp in (int(x) for x in args.tp.split(",")):
                res = run_world(_worker, tp, args=(args.tokens, vocab, dtype, args.reps, methods), timeout=1800)[0]
                meta = res.pop("_meta")
                rows.append((vocab, meta["v_shard"], dtype, tp, res))
                meg = res.get("megatron", {}).get("time_s")
                nai = res.get("naive", {}).get("time_s")
                for m, r in res.items():
                    ratio_meg = f"{r['time_s'] / meg:5.2f}x" if meg else "  -  "
                    ratio_nai = f"{r['time_s'] / nai:5.2f}x" if nai else "  -  "
                    print(f"V={vocab:6d} {dtype:8s} TP={tp} {m:9s} {r['time_s'] * 1e3:8.1f} ms  vs megatron {ratio_meg}"
                          f"  vs naive {ratio_nai}  saved {r['saved']:5.2f}  peak {r['peak']:5.2f} (fp32 shards)",
                          flush=True)
    elapsed = time.perf_counter() - t_start
    out = Path(args.out or f"bench/results/logprob-{'gpu' if torch.cuda.is_available() else 'cpu'}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = _markdown(rows, device, command, args, elapsed)
    if args.append and out.exists():
        text = out.read_text() + "\n" + text.replace("# bench/logprob results", "## Additional run", 1)
    out.write_text(text)
    print(f"wrote {out} ({elapsed:.0f} s)")
    return 0


def _markdown(rows, device, command, args, elapsed) -> str:
    lines = [
        "# bench/logprob results",
        "",
        f"- Machine: {device}; torch {torch.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- Command: `{command}` ({elapsed:.0f} s)",
        f"- {args.tokens} tokens; time = forward + backward of `sum(output)`, min of {args.reps} reps, max over"
        " ranks; TP=2 runs two processes over gloo on the same machine.",
        "- `saved`: new bytes saved for backward (exact, saved-tensor hooks); `peak`: measured peak growth of"
        " the process RSS over forward + backward (includes the gradient, one shard in the input dtype,"
        " = 0.5 fp32 shard for bf16); both in units of one fp32 shard (tokens x V_shard x 4 bytes).",
        "- Ratios are against Megatron's `vocab_parallel_cross_entropy` and the naive full `log_softmax`"
        " measured in the same run.",
        "",
        "| vocab | V_shard | dtype | TP | method | time (ms) | vs Megatron CE | vs naive | saved | peak |",
        "| ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for vocab, v_shard, dtype, tp, res in rows:
        meg = res.get("megatron", {}).get("time_s")
        nai = res.get("naive", {}).get("time_s")
        for m, r in res.items():
            lines.append(
                f"| {vocab} | {v_shard} | {dtype} | {tp} | {m} | {r['time_s'] * 1e3:.1f} | "
                f"{r['time_s'] / meg:.2f}x | {r['time_s'] / nai:.2f}x | {r['saved']:.2f} | {r['peak']:.2f} |"
                if meg and nai else
                f"| {vocab} | {v_shard} | {dtype} | {tp} | {m} | {r['time_s'] * 1e3:.1f} | "
                f"- | - | {r['saved']:.2f} | {r['peak']:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
