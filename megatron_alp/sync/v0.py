"""Version 0 of the disk bus, written from the HF checkpoint before any engine starts.

    python -m megatron_alp.sync.v0 --config JOB.yaml [section.key=value ...]

An FP8 rollout engine (SGLang) must *start* on a checkpoint that declares block FP8, and the
trainer only publishes after it has started; so the SLURM launcher runs this first, as a one-task
step on the first trainer node (the trainer's container), and starts the engines on its output.
It streams ``model.hf_path`` (safetensors, one tensor at a time), quantizes with the bus's own
:func:`rollout.bus.fp8.quantize_named` (bf16/fp16/fp32: a cast), and publishes version 0 with
:meth:`rollout.bus.disk.DiskBus.publish` (manifest, checksums, atomic rename): the same format,
quantizer and config.json as every version the trainer publishes. The trainer then finds version 0
published (:func:`prepublished`) and commits it instead of exporting it again.

``model.hf_path`` must be the checkpoint ``checkpoint.load`` was converted from (tools/convert.py),
so that version 0 equals the trainer's initial weights.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Iterator, Optional, Tuple

logger = logging.getLogger(__name__)


def _hf_dir(path: str) -> str:
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download  # a hub id: the HF cache (HF_HOME, HF_HUB_OFFLINE)

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])


def _named(hf_dir: str) -> Iterator[Tuple[str, "object"]]:
    from ..convert.hf_io import HFReader

    reader = HFReader(hf_dir)
    try:
        for name in reader.names():
            yield name, reader.get(name)
    finally:
        reader.close()


def prepublished(bus, precision: str) -> Optional[int]:
    """0 when the bus holds exactly version 0, written for ``precision`` (by this module); else None."""
    if bus.versions() != [0]:
        return None
    from rollout.bus.manifest import read_manifest

    manifest = read_manifest(bus.path(0))
    return 0 if manifest.precision == precision else None


def publish_v0(cfg) -> str:
    """Publish version 0 from ``cfg.model.hf_path`` into ``cfg.bus.dir``; returns its directory.
    Reuses a version 0 already there for the same precision (a resubmitted job)."""
    from rollout.bus.disk import DiskBus
    from rollout.bus.fp8 import QUANTIZATION_CONFIG, quantize_named

    from .export import EXPORT_DTYPES
    from .publish import export_config

    b, precision = cfg.bus, cfg.rollout.precision
    bus = DiskBus(b.dir, b.keep, fsync=b.fsync, checksum=b.checksum)
    if prepublished(bus, precision) == 0:
        logger.info("bus: version 0 (%s) is already published in %s", precision, bus.path(0))
        return bus.path(0)
    if bus.versions():
        raise ValueError(f"bus.dir = {b.dir} already holds versions {bus.versions()}: a fresh run needs an empty "
                         f"bus directory (or resume from a checkpoint)")
    bus.remove_stale()
    hf = _hf_dir(cfg.model.hf_path)
    dtype = EXPORT_DTYPES[precision]
    named = _named(hf)
    tensors = quantize_named(named, other_dtype=dtype) if precision == "fp8" else ((n, t.to(dtype)) for n, t in named)
    manifest = bus.publish(0, tensors, config=export_config(cfg.model, precision, hf), tokenizer_dir=hf,
                           bucket_bytes=int(b.bucket_mb) * 2 ** 20, precision=precision,
                           quantization=QUANTIZATION_CONFIG if precision == "fp8" else None)
    logger.info("bus: version 0 (%s, %d tensors, %.1f MB) written from %s", precision, len(manifest.tensors),
                manifest.total_bytes / 1e6, hf)
    return bus.path(0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ..config import load_config
    from ..runtime.command_output import command_logger

    command_logger("v0").info("%s", publish_v0(load_config(a.config, a.overrides)))  # the step's output, in its log
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
