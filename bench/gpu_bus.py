"""Bus publication of a ~1.5B-parameter model from GPU memory vs a plain safetensors save (a step of
`make gpu-check`).

    python -m bench.gpu_bus --out gpu_bus.json [--layers 28] [--reps 2] [--dir /fast/disk]

Tensors with Qwen2.5-1.5B's shapes (hidden 1536, 28 layers, FFN 8960, 12/2 heads, 151936
vocabulary; ~1.54B parameters, bf16, random) live on the GPU, as the trainer's export does. Phases,
alternated (forward then reversed) for ``--reps`` rounds after a warm-up round, medians reported:

- ``d2h``: copying every tensor to host memory (the part of either save that the GPU sets);
- ``plain``: ``.cpu()`` + ``safetensors.torch.save_file`` in 512 MiB shards (the baseline);
- ``bus``: ``.cpu()`` + ``DiskBus.publish`` with the trainer's defaults (xxh3_128 per tensor,
  manifest, atomic rename, GC of the previous version).
GB/s counts the bf16 bytes of the tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch


def qwen15b_tensors(layers: int, device) -> list:
    h, ffn, vocab, kv = 1536, 8960, 151936, 256
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    named = [("model.embed_tokens.weight", r(vocab, h)), ("model.norm.weight", r(h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        named += [(p + "self_attn.q_proj.weight", r(h, h)), (p + "self_attn.q_proj.bias", r(h)),
                  (p + "self_attn.k_proj.weight", r(kv, h)), (p + "self_attn.k_proj.bias", r(kv)),
                  (p + "self_attn.v_proj.weight", r(kv, h)), (p + "self_attn.v_proj.bias", r(kv)),
                  (p + "self_attn.o_proj.weight", r(h, h)), (p + "mlp.gate_proj.weight", r(ffn, h)),
                  (p + "mlp.up_proj.weight", r(ffn, h)), (p + "mlp.down_proj.weight", r(h, ffn)),
                  (p + "input_layernorm.weight", r(h)), (p + "post_attention_layernorm.weight", r(h))]
    return named


def main(argv=None) -> int:
    from bench.bus import _plain
    from rollout.bus.disk import DiskBus

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dir", default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    named = qwen15b_tensors(a.layers, dev)
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    params = sum(t.numel() for _, t in named)
    root = tempfile.mkdtemp(prefix="gpu-bus-", dir=a.dir)
    bucket = 512 * 2 ** 20
    bus = DiskBus(os.path.join(root, "bus"), keep=1)
    times = {"d2h": [], "plain": [], "bus": []}
    try:
        for rep in range(a.reps + 1):
            for name in (("d2h", "plain", "bus") if rep % 2 else ("bus", "plain", "d2h")):
                t0 = time.perf_counter()
                host = [(n, t.cpu()) for n, t in named]
                if name == "plain":
                    _plain(host, bucket, os.path.join(root, f"plain-{rep}"))
                elif name == "bus":
                    bus.publish(rep + 1, host, config={"architectures": ["Qwen2ForCausalLM"]}, bucket_bytes=bucket)
                dt = time.perf_counter() - t0
                if name == "plain":
                    shutil.rmtree(os.path.join(root, f"plain-{rep}"))
                if rep:
                    times[name].append(dt)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU", "params": params,
           "bytes": nbytes, "reps": a.reps, "seconds_median": med, "all_rounds": times,
           "gb_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
           "bus_throughput_vs_plain": med["plain"] / med["bus"], "dir": a.dir or tempfile.gettempdir()}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
