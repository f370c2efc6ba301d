"""Sequence packing vs padding: tokens/s of one policy update on a long-tailed rollout batch.

A batch of ``--samples`` sequences whose lengths are lognormal (median ``--median`` tokens, capped
at 8x the median, as issue 23 asks), one actor update (Token-ALP objective, ALP on) padded in
micro-batches of ``--micro`` rows vs packed under ``--budget`` tokens, same weights, same batch,
interleaved repetitions, at TP=1 and TP=2 (gloo, CPU processes). tokens/s counts the samples' own
tokens (padding excluded); the padding fraction is the share of forward positions that are
padding. The ratio packed / padded is printed per TP size.

    python -m bench.pack [--samples 32] [--median 48] [--budget 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _batch(n: int, median: int, seed: int = 0):
    from megatron_alp.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(seed)
    lengths = (torch.exp(torch.randn(n, generator=g) * 0.8) * median).round().clamp(8, 8 * median).long()
    L = int(lengths.max())
    tokens = torch.randint(0, 250, (n, L), generator=g)
    mask = torch.zeros(n, L)
    for i, m in enumerate(lengths.tolist()):
        mask[i, 4:m] = 1  # a 4-token prompt, then the response
    return RLBatch(tokens=tokens, loss_mask=mask, rollout_logp=-torch.rand(n, L, generator=g) - 1.0 * mask,
                   advantages=torch.randn(n, generator=g), sample_ids=torch.arange(n)), lengths


def _world(rank, world_size, args):
    from megatron_alp.config import load_config
    from megatron_alp.model.alp import alp_block_spec
    from megatron_alp.model.builder import build_gpt_model
    from megatron_alp.runtime.distributed import init_parallel_state
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.packing import make_packs, packs_needed
    from megatron_alp.trainer.setup import make_actor

    torch.set_num_threads(1)
    cfg = load_config(None, ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
                             "model.num_query_groups=2", "model.ffn_hidden_size=256", "model.vocab_size=250",
                             f"model.max_position_embeddings={8 * args.median}", "alp.enabled=true",
                             f"parallel.tp={world_size}", f"run.micro_batch_size={args.micro}",
                             "optimizer.lr=0.0", "algorithm.objective=bypass_token"])
    init_parallel_state(cfg.parallel, cfg.model, seed=3)
    model = build_gpt_model(cfg.model, cfg.parallel, cfg.precision,
                            block_spec=lambda c: alp_block_spec(cfg.model, cfg.alp, c))
    ddp = wrap_ddp(model)
    actor = make_actor(cfg, [ddp], Optimizer([ddp], cfg.optimizer, alp=cfg.alp))
    batch, lengths = _batch(args.samples, args.median)
    real = int(lengths.sum())
    times = {"padded": [], "packed": []}
    for rep in range(args.reps + 1):  # rep 0: warm-up
        for mode, budget in (("padded", 0), ("packed", args.budget)):
            actor.max_tokens = budget  # the packing budget the actor reads (run.max_tokens_per_micro_batch)
            t0 = time.perf_counter()
            actor.train_step(batch, step=rep)
            if rep:
                times[mode].append(time.perf_counter() - t0)
    n_micro = -(-args.samples // args.micro)
    padded_positions = n_micro * args.micro * batch.tokens.shape[1]
    packs = make_packs(batch, args.budget, packs_needed(batch, args.budget))
    packed_positions = sum(p.total for p in packs)
    return {"real": real, "times": times, "pad_frac": {"padded": 1 - real / padded_positions,
                                                        "packed": 1 - real / packed_positions},
            "micro": {"padded": n_micro, "packed": len(packs)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--median", type=int, default=48)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from megatron_alp.runtime.spawn import run_world

    lines = [f"{args.samples} samples, lognormal lengths (median {args.median}, max 8x), padded micro-batches of "
             f"{args.micro} rows vs packed under {args.budget} tokens; median of {args.reps} updates; "
             f"CPU ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}", "",
             "| TP | micro-batches padded / packed | padding padded / packed | tokens/s padded | tokens/s packed "
             "| packed / padded |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for tp in (1, 2):
        r = run_world(_world, tp, args=(args,), timeout=1800)[0]
        tps = {m: r["real"] / statistics.median(t) for m, t in r["times"].items()}
        lines.append(f"| {tp} | {r['micro']['padded']} / {r['micro']['packed']} | "
                     f"{r['pad_frac']['padded']:.0%} / {r['pad_frac']['packed']:.0%} | {tps['padded']:.0f} | "
                     f"{tps['packed']:.0f} | {tps['packed'] / tps['padded']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# bench/pack\n\nCommand: `python -m bench.pack --samples {args.samples} --median {args.median} "
                    f"--budget {args.budget} --reps {args.reps}`\n\n{text}\n")


if __name__ == "__main__":
    main()
