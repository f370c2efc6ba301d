"""The two conversions, run collectively on every rank of a TP x PP (x DP) world.

- :func:`hf_to_mcore`: each rank builds its Megatron chunk (no random init), then streams the HF
  tensors of *its* layers one layer at a time (``safe_open``), maps them to full Megatron tensors
  (``WeightMap``) and copies its shards in (``sharding.load_full_state_dict``); then
  ``dist_checkpointing`` writes the checkpoint. Peak memory per rank: its model chunk plus one
  layer of full tensors.
- :func:`mcore_to_hf`: each rank loads its chunk from the checkpoint (any TP/PP), gathers each
  parameter over TP (``sharding.gather_full``), maps it to HF names and writes size-bounded
  safetensors shards (TP rank 0 of each stage); rank 0 writes the index, config.json, tokenizer.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from ..model.alp.params import is_alp_param
from ..model.sharding import load_full_state_dict, named_global_parameters
from .hf_config import hf_config_for_export, model_config_from_hf, read_hf_config
from .hf_io import HFReader, ShardWriter, copy_tokenizer_files, finalize_shards
from .mapping import WeightMap, canonical_name
from .mcore_ckpt import (
    HF_SUBDIR,
    load_megatron_checkpoint,
    meta_for,
    model_config_from_meta,
    read_meta,
    save_megatron_checkpoint,
)

logger = logging.getLogger(__name__)

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _progress(iterable, desc: str, unit: str, enabled: bool = True):
    from tqdm import tqdm

    show = enabled and dist.get_rank() == 0
    return tqdm(iterable, desc=desc, disable=not show, unit=unit, leave=False)


def _no_init(tensor: torch.Tensor) -> None:
    """An init method that leaves the (about to be overwritten) tensor as allocated."""


def build_for_conversion(model_cfg: ModelConfig, tp: int, pp: int, dtype: torch.dtype):
    """(Re)initialise Megatron's groups for TP x PP and build this rank's chunk, uninitialised."""
    from ..config.megatron import to_transformer_config
    from ..model.builder import build_gpt_model
    from ..runtime.distributed import init_parallel_state

    if dtype not in _PRECISION:
        raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(str(d) for d in _PRECISION)}")
    parallel, precision = ParallelConfig(tp=tp, pp=pp), PrecisionConfig(train=_PRECISION[dtype])
    init_parallel_state(parallel, model_cfg, seed=0)
    config = to_transformer_config(model_cfg, parallel, precision)
    # Every weight is overwritten, so skip the random draw. Not perform_initialization=False: on the
    # CPU-init path Megatron then also skips setting the TP attributes the sharding map reads. And
    # allocate each shard directly (on the GPU where there is one) instead of building every full
    # master weight on the CPU and splitting it (use_cpu_initialization): a third of the time here.
    config.init_method = config.output_layer_init_method = config.embedding_init_method = _no_init
    config.use_cpu_initialization = False
    return build_gpt_model(model_cfg, parallel, precision, transformer_config=config)


def check_hf_names(reader: HFReader, wmap: WeightMap) -> None:
    """Every mapped tensor is present and every present tensor is mapped (or known to be inert)."""
    have = set(reader.names())
    need = wmap.all_hf_names()
    missing = [n for n in need if n not in have]
    unknown = sorted(n for n in have - set(need) if not wmap.is_ignored_hf(n))
    if missing:
        raise KeyError(f"{reader.dir}: {len(missing)} tensor(s) missing for model_type "
                       f"{wmap.family.model_type}, e.g. {missing[:5]}")
    if unknown:
        raise ValueError(f"{reader.dir}: {len(unknown)} tensor(s) the {wmap.family.model_type} map does not "
                         f"know (a feature config.json does not declare?), e.g. {unknown[:5]}")


def preflight(hf_dir: str):
    """Everything checkable without loading weights: family, config, tensor names and shapes.

    Cheap (reads config.json and the safetensors headers), so the CLI runs it before starting a
    world. Returns (hf config dict, ModelConfig, WeightMap, HFReader).
    """
    hf = read_hf_config(hf_dir)
    model_cfg = model_config_from_hf(hf, hf_dir)
    wmap = WeightMap.for_model(hf["model_type"], model_cfg)
    reader = HFReader(hf_dir)
    check_hf_names(reader, wmap)
    for name, symbolic in wmap.hf_shapes().items():
        wmap.check_hf_shape(name, reader.shape(name), symbolic)
    return hf, model_cfg, wmap, reader


@torch.no_grad()
def load_hf_weights(model, wmap: WeightMap, reader: HFReader, progress: bool = True) -> int:
    """Stream this rank's HF tensors into its Megatron chunk, one layer at a time; returns #tensors."""
    from megatron.core import parallel_state as ps

    params = {name: p for name, p in named_global_parameters(model)}
    actual = {canonical_name(n): n for n in params}  # local-spec name -> this model's (TE) name
    layers = sorted({int(n.split(".")[2]) for n in params if n.startswith("decoder.layers.")})
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    groups: List[List[str]] = []
    if first:
        groups.append(wmap.megatron_names(layers=[], first_stage=True, last_stage=False))
    groups += [wmap.megatron_names(layers=[i], first_stage=False, last_stage=False) for i in layers]
    if last:
        tail = wmap.megatron_names(layers=[], first_stage=False, last_stage=True)
        if wmap.model.tie_embeddings and "output_layer.weight" in params:
            tail.append("embedding.word_embeddings.weight")  # the last stage's copy of a tied embedding
        groups.append(tail)
    loaded = set()
    for group in _progress(groups, "hf -> megatron", "layer", enabled=progress):
        full = {}
        for name in group:
            tensor = wmap.hf_to_megatron(name, reader.get_many(wmap.hf_names(name)))
            full[actual.get(name, name)] = tensor
        load_full_state_dict(model, full, strict=False)
        loaded.update(full)
        if wmap.model.tie_embeddings and "embedding.word_embeddings.weight" in full and "output_layer.weight" in params:
            loaded.add("output_layer.weight")  # tied: load_full_state_dict fed it from the embedding
        del full
    left = [n for n, p in params.items() if n not in loaded and not is_alp_param(n, p)]
    if left:
        raise KeyError(f"no HF tensor was mapped to {left}")
    return len(loaded)


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None,
                progress: bool = True) -> Dict[str, Any]:
    """Convert an HF checkpoint directory into a Megatron distributed checkpoint (collective)."""
    t0 = time.perf_counter()
    hf, model_cfg, wmap, reader = preflight(hf_dir)
    dtype = dtype or reader.dtype()
    model = build_for_conversion(model_cfg, tp, pp, dtype)
    n = load_hf_weights(model, wmap, reader, progress)
    reader.close()
    save_megatron_checkpoint(model, out_dir, meta_for(model_cfg, hf, dtype, tp, pp, hf_dir))
    if dist.get_rank() == 0:
        side = os.path.join(out_dir, HF_SUBDIR)
        os.makedirs(side, exist_ok=True)
        shutil.copy2(os.path.join(hf_dir, "config.json"), os.path.join(side, "config.json"))
        copy_tokenizer_files(hf_dir, side)
    dist.barrier()
    del model
    return {"out": out_dir, "tensors_loaded_rank": n, "dtype": str(dtype), "seconds": time.perf_counter() - t0,
            "model_type": hf["model_type"]}


@torch.no_grad()
def export_hf_weights(model, wmap: WeightMap, out_dir: str, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Optional[str]:
    """Gather this stage's parameters over TP and write them as HF safetensors shards (collective).

    Every TP rank takes part in each gather; TP rank 0 (DP rank 0) of each stage writes. Rank 0
    writes the index at the end and returns its path.
    """
    from megatron.core import parallel_state as ps

    from .hf_export import export_role, iter_hf_tensors  # shared with the bus: one gather/name-map loop

    _, writes = export_role()
    stage = ps.get_pipeline_model_parallel_rank()
    writer = ShardWriter(out_dir, f"pp{stage:04d}", max_shard_bytes) if writes else None
    named = iter_hf_tensors([model], wmap, wmap.model.vocab_size, dtype=dtype)
    for hf_name, t in _progress(named, "megatron -> hf", "tensor", enabled=progress and writes):
        writer.add(hf_name, t)
    if writer is not None:
        writer.flush()
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (stage, writer.files if writer else []))
    index = None
    if dist.get_rank() == 0:
        files = [f for _, fs in sorted(gathered, key=lambda x: x[0]) for f in fs]
        index = finalize_shards(out_dir, files)
    dist.barrier()
    return index


def mcore_to_hf(mcore_dir: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None,
                max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Dict[str, Any]:
    """Convert a Megatron checkpoint written by :func:`hf_to_mcore` back to an HF directory (collective)."""
    from .hf_config import torch_dtype

    t0 = time.perf_counter()
    meta = read_meta(mcore_dir)
    model_cfg = model_config_from_meta(meta)
    wmap = WeightMap.for_model(model_cfg.family, model_cfg)
    saved = torch_dtype(meta["dtype"])
    dtype = dtype or saved
    model = build_for_conversion(model_cfg, tp, pp, saved)
    load_megatron_checkpoint(model, mcore_dir)
    if dist.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    export_hf_weights(model, wmap, out_dir, dtype if dtype != saved else None, max_shard_bytes, progress)
    if dist.get_rank() == 0:
        import json

        side = os.path.join(mcore_dir, HF_SUBDIR)
        source = meta.get("hf_config")
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config_for_export(model_cfg, dtype, source), f, indent=2)
        copied = copy_tokenizer_files(side, out_dir) or copy_tokenizer_files(meta.get("hf_path"), out_dir)
        if not copied:
            logger.warning("no tokenizer files found (in %s or %s): copy them by hand", side, meta.get("hf_path"))
    dist.barrier()
    del model
    return {"out": out_dir, "dtype": str(dtype), "seconds": time.perf_counter() - t0, "model_type": model_cfg.family}
