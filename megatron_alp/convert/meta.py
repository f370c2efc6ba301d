"""The metadata file of a checkpoint written by ``tools/convert.py`` (``megatron_alp_convert.json``).

Plain JSON and our config schema, no torch: ``tools/convert.py`` reads it to refuse a bad
``--mcore`` or layout before it imports torch or Megatron (``mcore_ckpt.py`` writes it).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from ..config.schema import ModelConfig

META = "megatron_alp_convert.json"
FORMAT = "megatron_alp.torch_dist.v1"


def is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META)) and os.path.isfile(os.path.join(path, "metadata.json"))


def read_meta(path: str) -> Dict[str, Any]:
    """Our metadata of a converted checkpoint (raises a clear error for anything else)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not a checkpoint written by tools/convert.py (no {META})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this reader knows {FORMAT!r}")
    return meta


def model_config_from_meta(meta: Dict[str, Any]) -> ModelConfig:
    return ModelConfig(**meta["model"])
