"""The checkpoint bus: the only path by which trained weights reach the rollout engines.

- :mod:`.disk`: versioned directories of safetensors shards + manifest, renamed into place
  atomically, old versions collected; :func:`.disk.verify` names a corrupted tensor.
- :mod:`.sender` / :mod:`.distributed`: SGLang's ``/update_weights_from_distributed`` with
  flattened buckets over an NCCL (GPU) or gloo (CPU) group, one group per pipeline stage.
- :mod:`.tensor`: ``/update_weights_from_tensor`` for colocated engines (CUDA IPC; GPU only).
- :mod:`.commit`: pause -> apply -> verify (version, optional log-prob spot check) -> continue,
  all or nothing, with retries and the drop/stop policy.
- :mod:`.fp8`: blockwise e4m3 export for FP8 rollouts. :mod:`.versions`: staleness helpers.

This package never imports ``megatron_alp``: the trainer side that turns Megatron shards into
HF-named tensors lives in ``megatron_alp/sync/export.py`` and ``megatron_alp/sync/publish.py`` and passes
plain tensors and arguments here. See docs/bus.md.
"""

from .versions import parse_version, staleness, staleness_stats

_LAZY = {"DiskBus": "disk", "verify": "disk", "BusError": "manifest", "ChecksumError": "manifest",
         "Manifest": "manifest", "VersionError": "manifest", "read_manifest": "manifest"}


def __getattr__(name):
    """The torch-backed parts load on first use, so that ``rollout.bus.versions`` imports without
    torch (the SLURM supervisor on a container job's batch host)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BusError", "ChecksumError", "DiskBus", "Manifest", "VersionError", "parse_version", "read_manifest",
           "staleness", "staleness_stats", "verify"]
