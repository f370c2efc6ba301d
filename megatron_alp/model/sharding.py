"""Full (TP=1, PP=1, real-vocabulary) tensors <-> this rank's Megatron shards.

The one place that knows how Megatron lays a parameter out across ranks, read from the
attributes Megatron puts on each parameter:

- ``tensor_model_parallel`` / ``partition_dim``: split along that dim, contiguous by TP rank.
- ``partition_stride`` > 1 (SwiGLU's fused ``linear_fc1``): the full tensor is ``stride`` blocks
  ([gate; up]) and each rank holds its slice of every block, concatenated.
- The word embedding and the output layer have ``padded_vocab`` rows; the full form has the real
  ``vocab_size`` rows (rollout engines and HF never see padding), so rows are zero-padded on the
  way in and stripped on the way out.
- Pipeline stages hold ``decoder.layers.<local>``; full names use the global layer index
  (``TransformerLayer.layer_number - 1``).

Used by the invariance tests, the converter and the weight export.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _layer_offsets(model) -> Dict[int, int]:
    """local layer index -> global (0-based) layer index for this pipeline chunk."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    return {i: layer.layer_number - 1 for i, layer in enumerate(layers)}


# Wrappers that ALP's logits-only variant puts around a stock module are transparent in full names,
# so weights load into (and export from) both variants under the stock names.
_TRANSPARENT = (("decoder.final_layernorm.norm.", "decoder.final_layernorm."),)


def global_name(local_name: str, offsets: Dict[int, int]) -> str:
    for wrapped, stock in _TRANSPARENT:
        if local_name.startswith(wrapped):
            local_name = stock + local_name[len(wrapped):]
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    return f"{m.group(1)}{offsets[int(m.group(2))]}{m.group(3)}"


def named_global_parameters(model) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(full name, local parameter) for every parameter of this rank's model chunk."""
    offsets = _layer_offsets(model)
    for name, p in model.named_parameters():
        yield global_name(name, offsets), p


def _is_tp_sharded(p) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def shard_of(full: torch.Tensor, p, tp_rank: int, tp_size: int, vocab: bool = False) -> torch.Tensor:
    """This rank's slice of ``full`` for local parameter ``p`` (see module docstring)."""
    if not _is_tp_sharded(p):
        return full
    dim = p.partition_dim
    if vocab and full.shape[dim] != p.shape[dim] * tp_size:
        padded = p.shape[dim] * tp_size
        if full.shape[dim] > padded:
            raise ValueError(f"vocabulary of {full.shape[dim]} rows does not fit the padded {padded}")
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    stride = getattr(p, "partition_stride", 1)
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def unshard(shards, p, stride: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`shard_of` over the list of all TP ranks' shards (vocab rows kept padded)."""
    dim = p.partition_dim
    stride = stride or getattr(p, "partition_stride", 1)
    per_rank_blocks = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([rb[b] for rb in per_rank_blocks], dim=dim) for b in range(stride)], dim=dim)


def unshard_gathered(buf: torch.Tensor, p) -> torch.Tensor:
    """:func:`unshard` of the TP ranks' shards stacked in one buffer ``[tp, *shard]`` (what
    :func:`gather_full` all-gathers into), with at most one copy: the peak is the buffer plus the
    full tensor (2x the parameter), and for row-parallel-in-dim-0 weights without stride the buffer
    *is* the full tensor (1x). Stacking the shards in a list and concatenating block by block, as
    :func:`unshard` does, holds three copies at its peak."""
    size, shape = buf.shape[0], buf.shape[1:]
    dim = p.partition_dim
    stride = getattr(p, "partition_stride", 1)
    if dim == 0 and stride == 1:
        return buf.view(size * shape[0], *shape[1:])
    chunk = shape[dim] // stride
    # [tp, pre..., stride, chunk, post...] -> [pre..., stride, tp, chunk, post...]: block b of every rank
    x = buf.view(size, *shape[:dim], stride, chunk, *shape[dim + 1:])
    order = [*range(1, dim + 1), dim + 1, 0, *range(dim + 2, x.dim())]
    return x.permute(order).reshape(*shape[:dim], stride * size * chunk, *shape[dim + 1:])


@torch.no_grad()
def load_full_state_dict(model, full: Dict[str, torch.Tensor], strict: bool = True):
    """Copy full tensors into this rank's shards. Names are full names (global layer indices)."""
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    from .alp.params import is_alp_param

    missing = []
    for name, p in named_global_parameters(model):
        if is_alp_param(name, p) and name not in full:
            continue  # a state without sigma (an HF model, an export) leaves sigma at its init
        src_name = name
        if name == "output_layer.weight" and name not in full and getattr(p, "shared_embedding", False):
            src_name = "embedding.word_embeddings.weight"  # tied embeddings on the last PP stage
        if src_name not in full:
            missing.append(name)
            continue
        local = shard_of(full[src_name].to(p.dtype), p, tp_rank, tp_size, vocab=name in _VOCAB_PARAMS)
        if local.shape != p.shape:
            raise ValueError(f"{name}: full tensor gives a shard of shape {tuple(local.shape)}, "
                             f"model has {tuple(p.shape)}")
        p.copy_(local)
    if strict and missing:
        raise KeyError(f"full state dict lacks {missing}")


def gather_full(name: str, p: torch.Tensor, vocab_size: Optional[int] = None, tp_group=None, like=None) -> torch.Tensor:
    """All-gather one parameter (or a tensor shaped like it, e.g. its grad) over TP into full form.

    ``like`` is the parameter whose sharding attributes apply when ``p`` is a gradient.
    """
    from megatron.core import parallel_state as ps

    meta = like if like is not None else p
    t = p.detach()
    if _is_tp_sharded(meta):
        group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
        size = dist.get_world_size(group)
        if size > 1:
            buf = torch.empty((size, *t.shape), dtype=t.dtype, device=t.device)
            dist.all_gather(list(buf.unbind(0)), t.contiguous(), group=group)  # into one buffer
            t = unshard_gathered(buf, meta)
    if name in _VOCAB_PARAMS and vocab_size is not None:
        t = t.narrow(getattr(meta, "partition_dim", 0), 0, vocab_size)
    return t


def gather_full_many(named: List[Tuple[str, torch.Tensor]], vocab_size: Optional[int] = None,
                     tp_group=None) -> List[torch.Tensor]:
    """:func:`gather_full` of several parameters (one dtype) in one all-gather over TP: their
    shards laid end to end in one buffer (the caller bounds its size). The same tensors, one
    collective instead of one per parameter (what a small model's export is bound by)."""
    from megatron.core import parallel_state as ps

    sharded = [p for _, p in named if _is_tp_sharded(p)]
    group = tp_group if tp_group is not None else (ps.get_tensor_model_parallel_group() if sharded else None)
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1 or len(sharded) < 2:
        return [gather_full(name, p, vocab_size, tp_group=tp_group) for name, p in named]
    flat = torch.cat([p.detach().reshape(-1) for p in sharded])
    buf = torch.empty((size, flat.numel()), dtype=flat.dtype, device=flat.device)
    dist.all_gather(list(buf.unbind(0)), flat, group=group)
    out, offset = [], 0
    for name, p in named:
        t = p.detach()
        if _is_tp_sharded(p):
            t = unshard_gathered(buf[:, offset:offset + p.numel()].reshape(size, *p.shape).contiguous(), p)
            offset += p.numel()
        if name in _VOCAB_PARAMS and vocab_size is not None:
            t = t.narrow(getattr(p, "partition_dim", 0), 0, vocab_size)
        out.append(t)
    return out


def full_state_dict(model, vocab_size: Optional[int] = None, grads: bool = False,
                    include_alp: bool = False) -> Dict[str, torch.Tensor]:
    """Every parameter of this PP stage gathered over TP (or its gradient, with ``grads=True``).

    Gradients are read from ``main_grad`` (Megatron DDP) when present, else ``.grad``. ALP's
    log-sigma parameters are trainer-only and left out unless ``include_alp`` (checkpoints).
    """
    from .alp.params import is_alp_param

    out = {}
    for name, p in named_global_parameters(model):
        if not include_alp and is_alp_param(name, p):
            continue
        if grads:
            g = getattr(p, "main_grad", None)
            g = g if g is not None else p.grad
            if g is None:
                continue
            out[name] = gather_full(name, g, vocab_size, like=p).clone()
        else:
            out[name] = gather_full(name, p, vocab_size).clone()
    return out
