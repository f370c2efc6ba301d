"""HF <-> Megatron checkpoint conversion (``tools/convert.py``; docs/convert.md).

- ``families.py``: one declarative name map per HF family, dispatched on the exact ``model_type``.
- ``reshape.py``: the named reshapes (GQA QKV interleave, gate/up fusion, vocabulary rows).
- ``mapping.py``: :class:`WeightMap`, the per-parameter ``megatron_to_hf`` / ``hf_to_megatron``
  shared with the checkpoint-bus export.
- ``hf_config.py``: config.json <-> our ``ModelConfig``; ``hf_io.py``: streaming safetensors I/O.
- ``mcore_ckpt.py``: Megatron-Core distributed checkpoints; ``load_megatron_checkpoint`` is how the
  trainer starts from a converted model at any TP/PP.
- ``pipeline.py``: the two conversions; ``verify.py``: logits/log-prob comparison with transformers.
"""

import importlib

# name -> submodule. Imported on first use (PEP 562), so that a light submodule (``meta``,
# ``hf_config``, ``families``) does not pull in torch and Megatron: tools/convert.py checks its
# input with those before importing either.
_EXPORTS = {
    "FAMILIES": "families", "UnsupportedModelError": "families", "get_family": "families",
    "model_config_from_hf": "hf_config", "read_hf_config": "hf_config",
    "ShapeMismatchError": "mapping", "WeightMap": "mapping", "megatron_to_hf": "mapping",
    "is_megatron_checkpoint": "meta", "read_meta": "meta",
    "load_megatron_checkpoint": "mcore_ckpt", "save_megatron_checkpoint": "mcore_ckpt",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
