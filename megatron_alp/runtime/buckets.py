"""Group a stream of named tensors into buckets of bounded bytes: the bus's send buckets
(:mod:`megatron_alp.sync.publish`) and the export's batched TP all-gathers
(:mod:`megatron_alp.convert.hf_export`)."""

from __future__ import annotations

from typing import Iterable, Iterator, List, Tuple

import torch

Named = Tuple[str, torch.Tensor]


def buckets(named: Iterable[Named], bucket_bytes: int, *, one_dtype: bool = False) -> Iterator[List[Named]]:
    """Consecutive lists of at most ``bucket_bytes`` (a bigger tensor is alone), in stream order.
    With ``one_dtype`` a bucket also ends where the dtype changes (its tensors can be flattened
    into one buffer)."""
    bucket: List[Named] = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and (size + n > bucket_bytes or (one_dtype and t.dtype != bucket[0][1].dtype)):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket
