"""Shared pieces of the layout-invariance tests: a small model, a batch, each layout's forward."""

from __future__ import annotations

import contextlib

import torch

V = 250  # real vocabulary: padded to 256 at TP=1 and TP=2


def make_cfg(tie: bool = False, extra=()):
    from megatron_alp.config import load_config

    return load_config(None, [
        "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=96", f"model.vocab_size={V}",
        f"model.tie_embeddings={str(tie).lower()}", *extra,
    ])


def batch(b: int = 4, s: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (b, s), generator=g), torch.randint(0, V, (b, s), generator=g)


def positions(tokens):
    return torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)


def ce_loss(logits, labels):
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(logits.float().contiguous(), labels).mean()


def build(cfg, block_spec=None, **parallel):
    """(Re)initialise the parallel state for ``parallel`` and build this rank's model chunk."""
    from megatron_alp.config import ParallelConfig
    from megatron_alp.model.builder import build_gpt_model
    from megatron_alp.runtime.distributed import init_parallel_state

    cfg.parallel = ParallelConfig(**parallel)
    init_parallel_state(cfg.parallel, cfg.model, seed=11)
    spec = (lambda c: block_spec(cfg, c)) if block_spec is not None else None
    return build_gpt_model(cfg.model, cfg.parallel, cfg.precision, block_spec=spec)


def gather_tp_logits(logits):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    g = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(g))]
    dist.all_gather(parts, logits.contiguous(), group=g)
    return torch.cat(parts, dim=-1)


def wrap_ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
    ddp.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def schedule_loss(ddp, tokens, labels, micro_batch_size: int, forward_ctx=None):
    """Megatron's forward-backward schedule (1F1B under PP) over micro-batches; the mean loss on
    the last stage (None elsewhere). ``forward_ctx(i)`` wraps micro-batch i's forward."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = [(tokens[i:i + micro_batch_size], labels[i:i + micro_batch_size])
             for i in range(0, tokens.shape[0], micro_batch_size)]
    counter = iter(range(len(micro)))

    def step(data_iter, m):
        t, lab = next(data_iter)
        i = next(counter)
        with (forward_ctx(i) if forward_ctx else contextlib.nullcontext()):
            out = m(t, positions(t), None)

        def loss_func(logits):
            loss = ce_loss(logits, lab)
            return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

        return out, loss_func

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro), model=[ddp], num_microbatches=len(micro),
        seq_length=tokens.shape[1], micro_batch_size=micro_batch_size, forward_only=False,
    )
    return torch.stack([d["loss"] for d in losses]).mean() if ps.is_pipeline_last_stage() else None
