"""Per-rank entry points of ``tools/convert.py`` (module-level, so a spawned world can import them).

``run_command(rank, world_size, opts)`` runs one command collectively: under torchrun the world
already exists; without it the CLI spawns a gloo world of TP x PP processes
(:func:`megatron_alp.runtime.spawn.run_world`). Returns the rank's report (verification included).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict

import torch

DTYPE_ARGS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _setup_logging(rank: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def run_command(rank: int, world_size: int, opts: Dict[str, Any]) -> Dict[str, Any]:
    """Run ``opts['command']`` ('hf-to-mcore' or 'mcore-to-hf') on this rank."""
    from ..runtime.distributed import destroy_parallel_state, init_distributed
    from .pipeline import hf_to_mcore, mcore_to_hf
    from .verify import verify

    _setup_logging(rank)
    init_distributed()
    tp, pp, dtype = opts["tp"], opts["pp"], DTYPE_ARGS[opts.get("dtype", "auto")]
    progress = opts.get("progress", True)
    if opts["command"] == "hf-to-mcore":
        report = hf_to_mcore(opts["hf"], opts["out"], tp, pp, dtype, progress=progress)
        mcore_dir, hf_dir = opts["out"], opts["hf"]
    elif opts["command"] == "mcore-to-hf":
        report = mcore_to_hf(opts["mcore"], opts["out"], tp, pp, dtype,
                             max_shard_bytes=opts.get("max_shard_bytes", 5 * 2**30), progress=progress)
        mcore_dir, hf_dir = opts["mcore"], opts["out"]
    else:
        raise ValueError(f"unknown command {opts['command']!r}")
    if opts.get("verify"):
        report["verify"] = verify(mcore_dir, hf_dir, tp, pp, tol=opts.get("tol", 1e-2))
    destroy_parallel_state()
    report["rank"] = rank
    report["pid"] = os.getpid()
    return report
