"""ALP's cost: forward+backward time and activation memory with the perturbation on vs off.

Same model, same weights, same batch, measured in the same run with the two settings interleaved
(machines here are noisy); prints the ratios. Memory: bytes saved for backward (counted with
``torch.autograd.graph.saved_tensors_hooks``) on any device, plus peak allocated memory on a GPU.

    python -m bench.alp_overhead                 # CPU default: hidden 512, 4 layers, 2 x 512 tokens
    python -m bench.alp_overhead --hidden 1024 --layers 8 --seq 1024 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def run(args):
    from megatron_alp.config import load_config
    from megatron_alp.model.alp import alp_block_spec, alp_forward
    from megatron_alp.model.builder import build_gpt_model
    from megatron_alp.model.sharding import full_state_dict, load_full_state_dict
    from megatron_alp.runtime.distributed import init_parallel_state

    heads = args.heads or args.hidden // 64
    overrides = [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.ffn or args.hidden * 8 // 3 // 64 * 64}", f"model.num_attention_heads={heads}",
        f"model.num_query_groups={args.groups or max(1, args.hidden // 256)}", f"model.vocab_size={args.vocab}",
        f"model.max_position_embeddings={args.seq}", "alp.enabled=true", "alp.sigma_init=0.02",
        f"precision.train={args.precision}",
    ]
    cfg = load_config(None, overrides)
    init_parallel_state(cfg.parallel, cfg.model, seed=1)
    model = build_gpt_model(cfg.model, cfg.parallel, cfg.precision,
                            block_spec=lambda c: alp_block_spec(cfg.model, cfg.alp, c))
    load_full_state_dict(model, full_state_dict(model, cfg.model.vocab_size, include_alp=True))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    pos = torch.arange(args.seq, device=dev)[None].expand(args.batch, -1)

    def step(on: bool, i: int):
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()

        def fwd():
            if on:
                with alp_forward(step=i, micro_batch=0):
                    return model(tokens, pos, None)
            return model(tokens, pos, None)

        logits, saved = _saved_bytes(fwd)
        logits.float().mean().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
        return dt, saved, peak

    for i in range(2):  # warm-up
        step(False, i)
        step(True, i)
    times = {False: [], True: []}
    saved = {}
    peak = {}
    for i in range(args.reps):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            dt, s, p = step(on, i)
            times[on].append(dt)
            saved[on], peak[on] = s, p
    t_off, t_on = statistics.median(times[False]), statistics.median(times[True])
    hidden_bytes = args.batch * args.seq * args.hidden * 4
    res = {
        "device": (torch.cuda.get_device_name() if dev == "cuda"
                   else f"CPU ({os.cpu_count()} cores, {platform.machine()})"),
        "shape": {"layers": args.layers, "hidden": args.hidden, "batch": args.batch, "seq": args.seq,
                  "vocab": args.vocab,
                  "heads": cfg.model.num_attention_heads, "groups": cfg.model.num_query_groups,
                  "ffn": cfg.model.ffn_hidden_size, "precision": args.precision},
        "fwd_bwd_s_off": t_off, "fwd_bwd_s_on": t_on, "time_ratio_on_over_off": t_on / t_off,
        "saved_bytes_off": saved[False], "saved_bytes_on": saved[True],
        "saved_extra_bytes": saved[True] - saved[False],
        "one_hidden_state_bytes": hidden_bytes,
        "peak_bytes_off": peak[False], "peak_bytes_on": peak[True],
    }
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    parser.add_argument("--groups", type=int, default=None, help="KV groups (default hidden / 256)")
    parser.add_argument("--ffn", type=int, default=None, help="FFN width (default 8/3 hidden, rounded to 64)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 needs a GPU")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = run(args)
    print(f"device: {res['device']}  shape: {res['shape']}")
    print(f"fwd+bwd  off {res['fwd_bwd_s_off'] * 1e3:.1f} ms   on {res['fwd_bwd_s_on'] * 1e3:.1f} ms   "
          f"ratio on/off {res['time_ratio_on_over_off']:.3f}")
    print(f"saved for backward  off {res['saved_bytes_off'] / 2**20:.2f} MiB   "
          f"on {res['saved_bytes_on'] / 2**20:.2f} MiB   "
          f"extra {res['saved_extra_bytes'] / 2**10:.1f} KiB "
          f"(one hidden state = {res['one_hidden_state_bytes'] / 2**20:.2f} MiB)")
    if res["peak_bytes_on"] is not None:
        print(f"peak allocated  off {res['peak_bytes_off'] / 2**20:.1f} MiB   "
              f"on {res['peak_bytes_on'] / 2**20:.1f} MiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
