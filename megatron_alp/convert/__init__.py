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

from .families import FAMILIES, UnsupportedModelError, get_family
from .hf_config import model_config_from_hf, read_hf_config
from .mapping import ShapeMismatchError, WeightMap, megatron_to_hf
from .mcore_ckpt import is_megatron_checkpoint, load_megatron_checkpoint, read_meta, save_megatron_checkpoint

__all__ = [
    "FAMILIES", "ShapeMismatchError", "UnsupportedModelError", "WeightMap", "get_family",
    "is_megatron_checkpoint", "load_megatron_checkpoint", "megatron_to_hf", "model_config_from_hf",
    "read_hf_config", "read_meta", "save_megatron_checkpoint",
]
