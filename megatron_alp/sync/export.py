"""The bus's export: HF-named tensors (:mod:`megatron_alp.convert.hf_export`) in the rollout
precision, grouped in buckets of bounded size (see :mod:`megatron_alp.sync.publish`)."""

from __future__ import annotations

from typing import Iterable, Iterator, List, Tuple

import torch

# Rollout precision -> dtype of the exported tensors (fp8: bf16 plus FP8 linear weights).
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def buckets(named: Iterable[Tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """Group a stream of tensors into lists of at most ``bucket_bytes`` (a bigger tensor is alone)."""
    bucket: List[Tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket
