"""Megatron shards -> HF-named full tensors, one parameter at a time: the one gather/name-map loop
used by the converter (:mod:`.pipeline`) and the checkpoint bus (:mod:`megatron_alp.sync.publish`).

Who does what (collective over each TP group; data-parallel replicas hold the same weights):

- ranks with DP rank 0 (context-parallel rank 0 included) *export*: for the parameters of their
  model chunks, in order and in batches of at most ``GATHER_BATCH_BYTES`` of shards, every TP
  rank takes part in :func:`gather_full_many` (one all-gather over TP per batch, which also strips
  the padded vocabulary rows); TP rank 0 then maps each full tensor to its HF
  tensors with the converter's :class:`~megatron_alp.convert.mapping.WeightMap` (QKV
  de-interleave, gate/up split, tied output layer and ALP's sigma left out) and yields them;
- other DP replicas export nothing.

So a rank holds at most one batch of shards and its full tensors, never the whole model of a
large model (a batch is bounded; a bigger parameter is gathered alone): each pipeline stage exports
its own layers (global layer indices) and the caller decides where they go.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch

from ..model.alp.params import is_alp_param
from ..model.sharding import gather_full_many, named_global_parameters, unwrap
from ..runtime.buckets import buckets
from .mapping import WeightMap


def export_role():
    """(exports, writes): whether this rank takes part in the TP gathers, and whether it yields."""
    from megatron.core import parallel_state as ps

    exports = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    return exports, exports and ps.get_tensor_model_parallel_rank() == 0


@torch.no_grad()
def iter_hf_tensors(model_chunks: Sequence, weight_map: WeightMap, vocab_size: int,
                    dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this pipeline stage's parameters (see module docstring).

    Must be iterated to the end on every rank that exports (the TP gathers are collective); it
    yields only on the writing rank. ``dtype`` casts the yielded tensors (None: as trained).
    """
    exports, writes = export_role()
    if not exports:
        return
    for batch in buckets(_exported_parameters(model_chunks, weight_map), GATHER_BATCH_BYTES, one_dtype=True):
        fulls = gather_full_many(batch, vocab_size)
        if not writes:
            continue
        for (full_name, p), full in zip(batch, fulls, strict=True):
            for hf_name, t in weight_map.megatron_to_hf(full_name, full, p):
                yield hf_name, (t.to(dtype) if dtype is not None and t.dtype != dtype else t)


# Shards all-gathered at once: a small model's whole export is one collective; a big model's
# parameters still go one (or a few) at a time, so a rank never holds much more than that.
GATHER_BATCH_BYTES = 32 << 20


def _exported_parameters(model_chunks: Sequence, weight_map: WeightMap):
    """(Megatron name, local parameter) of every parameter the export writes, in model order."""
    for chunk in model_chunks:
        for full_name, p in named_global_parameters(unwrap(chunk)):
            if is_alp_param(full_name, p):
                continue  # trainer-only, and identical on every TP rank: no gather needed
            if full_name == "output_layer.weight" and weight_map.model.tie_embeddings:
                continue  # the tied copy: HF reads the embedding (WeightMap maps it to nothing)
            yield full_name, p
