"""`make demo`: the main job on an embedded default.

Foundation stage: a tiny GPT model with TP=2 over gloo on the CPU takes a few optimizer steps on a
fixed batch of random tokens (next-token cross-entropy) and logs the loss, which must fall. The RL
trainer issue turns this into a real ALP run.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from .runtime.spawn import run_world

logger = logging.getLogger("megatron_alp.demo")


def _smoke_worker(rank: int, world_size: int, steps: int, tp: int):
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from megatron.core import tensor_parallel

    from .config import load_config
    from .model.builder import build_gpt_model
    from .optim import Optimizer, wrap_ddp
    from .runtime.distributed import init_parallel_state

    from .config.loader import CONFIG_ROOT

    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml", [f"parallel.tp={tp}", "optimizer.lr=3e-3", "optimizer.clip_grad=1.0"])
    init_parallel_state(cfg.parallel, cfg.model, seed=cfg.run.seed)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel, cfg.precision))
    opt = Optimizer([model], cfg.optimizer)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (8, 33), generator=g)
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(inp.shape[1])[None].expand(inp.shape[0], -1)
    losses = []
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = model(inp, pos, None)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float().contiguous(), labels).mean()
        loss.backward()
        model.finish_grad_sync()
        ok, norm = opt.step()
        losses.append(loss.item())
        logger.info("step %d  loss %.4f  grad_norm %.3f  %.2fs", step, loss.item(), norm, time.perf_counter() - t0)
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logger.info("tiny GPT, TP=%d over gloo on CPU, %d optimizer steps", args.tp, args.steps)
    losses = run_world(_smoke_worker, args.tp, args=(args.steps, args.tp), timeout=600)[0]
    logger.info("loss %.4f -> %.4f", losses[0], losses[-1])
    if not losses[-1] < losses[0]:
        logger.error("the loss did not fall")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
