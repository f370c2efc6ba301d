"""The Megatron side: Megatron-Core distributed checkpoints (``torch_dist``), loadable at any TP/PP.

``save_megatron_checkpoint`` writes ``model.sharded_state_dict()`` with ``dist_checkpointing``
(through an in-process synchronous writer, ``runtime/dcp_save.py``: PLATFORM.md item 6) plus
``megatron_alp_convert.json`` (our model section, the source HF config.json and path, dtype, the
layout it was written at) and ``hf/`` (the source's config.json and tokenizer files, so the
checkpoint is self-contained). ``load_megatron_checkpoint`` loads it into a model of any TP/PP:
each ``ShardedTensor`` carries global offsets, and Megatron marks the vocabulary tensors
``allow_shape_mismatch`` so a different vocabulary padding (it depends on TP) loads too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..config.schema import ModelConfig
from ..model.alp.params import is_alp_param
from ..model.sharding import unwrap
from .meta import FORMAT, META, is_megatron_checkpoint, model_config_from_meta, read_meta  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

HF_SUBDIR = "hf"
# Wrappers that ALP's logits-only variant puts around stock modules (cf. sharding._TRANSPARENT).
_TRANSPARENT_KEYS = (("decoder.final_layernorm.norm.", "decoder.final_layernorm."),)


def save_megatron_checkpoint(model, out_dir: str, meta: Dict[str, Any]) -> None:
    """Collective over the world: every rank saves its shards; rank 0 writes the metadata."""
    from megatron.core import dist_checkpointing

    from ..runtime.cpu_support import sync_save_strategy

    model = unwrap(model)
    if dist.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), out_dir, sharded_strategy=sync_save_strategy())
    if dist.get_rank() == 0:
        full = dict(meta, format=FORMAT)
        with open(os.path.join(out_dir, META + ".tmp"), "w") as f:
            json.dump(full, f, indent=2, default=str)
        os.replace(os.path.join(out_dir, META + ".tmp"), os.path.join(out_dir, META))
    dist.barrier()
    logger.info("Megatron checkpoint written: %s", out_dir)


def _check_architecture(model, meta: Dict[str, Any], path: str) -> None:
    """A readable error when the model and the checkpoint differ in shape-defining fields."""
    want = meta["model"]
    cfg = model.config
    have = {
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups or cfg.num_attention_heads,
        "qk_layernorm": bool(cfg.qk_layernorm), "qkv_bias": bool(cfg.add_qkv_bias),
    }
    want = dict(want, num_query_groups=want.get("num_query_groups") or want["num_attention_heads"])
    bad = [f"model.{k}: checkpoint {want[k]!r}, model {v!r}" for k, v in have.items() if want.get(k) != v]
    if bad:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(bad))


def load_tolerating_extra_state(sharded, path: str):
    """``dist_checkpointing.load`` that lets the model ask for ``_extra_state`` objects the checkpoint
    lacks (a checkpoint written with the local spec, loaded into the Transformer Engine spec: TE
    modules keep their FP8 metadata in ``_extra_state``; the local spec maps its weight names to
    TE's through ``sharded_state_dict_keys_map`` but has no such objects). As Megatron-LM's own
    loader does with its ``dist_ckpt_strictness`` option, the mismatch is returned
    (``StrictHandling.RETURN_UNEXPECTED``: requested keys not in the checkpoint are dropped from
    the request) and judged here: anything other than ``_extra_state`` still fails."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, _missing, unexpected = dist_checkpointing.load(sharded, path, strict=StrictHandling.RETURN_UNEXPECTED)
    bad = sorted(k for k in unexpected if not k.endswith("_extra_state"))
    if bad:
        raise KeyError(f"{path}: the checkpoint lacks {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return loaded


def load_megatron_checkpoint(model, path: str, strict: bool = True) -> Dict[str, Any]:
    """Load a converted checkpoint into this rank's model chunk, at any TP/PP (collective).

    ALP's log-sigma parameters are not in a converted checkpoint and keep their initial value;
    ALP's logits-only wrapper around the final norm loads the stock norm's weight. Returns the
    checkpoint's metadata.
    """

    model = unwrap(model)
    meta = read_meta(path)
    _check_architecture(model, meta, path)
    sharded = model.sharded_state_dict()
    skipped = [k for k in sharded if is_alp_param(k)]
    for k in skipped:
        del sharded[k]
    for v in sharded.values():
        key = getattr(v, "key", None)
        for wrapped, stock in _TRANSPARENT_KEYS:
            if isinstance(key, str) and key.startswith(wrapped):
                v.key = stock + key[len(wrapped):]
    loaded = load_tolerating_extra_state(sharded, path)
    result = model.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not is_alp_param(k) and not k.endswith("_extra_state")]
    if strict and (missing or result.unexpected_keys):
        raise KeyError(f"{path}: missing {missing}, unexpected {list(result.unexpected_keys)}")
    logger.info("loaded Megatron checkpoint %s (%d ALP tensors left at init)", path, len(skipped))
    return meta


def meta_for(model_cfg: ModelConfig, hf_config: Optional[Dict[str, Any]], dtype: torch.dtype, tp: int, pp: int,
             source: Optional[str]) -> Dict[str, Any]:
    """The metadata ``save_megatron_checkpoint`` stores next to the shards."""
    return {
        "model": dataclasses.asdict(model_cfg),
        "hf_config": hf_config,
        "hf_path": os.path.abspath(source) if source else None,
        "dtype": str(dtype).replace("torch.", ""),
        "written_at": {"tp": tp, "pp": pp},
    }
