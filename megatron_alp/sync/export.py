"""The bus's export: HF-named tensors (:mod:`megatron_alp.convert.hf_export`) in the rollout
precision, grouped by :func:`megatron_alp.runtime.buckets.buckets` (see :mod:`megatron_alp.sync.publish`)."""

from __future__ import annotations

import torch

# Rollout precision -> dtype of the exported tensors (fp8: bf16 plus FP8 linear weights).
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
