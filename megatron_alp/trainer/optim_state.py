"""Saving and loading the Megatron optimizer's state, per sub-optimizer, on GPU and CPU.

Two defects of the straightforward ``state_dict()`` / ``load_parameter_state_from_dp_reshardable``
pair in Megatron-Core 0.16.1 (optimizer/distrib_optimizer.py) are avoided here:

- ``DistributedOptimizer.state_dict()`` without Apex or Transformer Engine (the torch Adam
  fallback) collects the Adam ``step`` of every state entry and asserts there is exactly one
  value; before the first successful step (or on a rank whose shard of a sub-optimizer is empty)
  there is none and it asserts. A sub-optimizer that holds no state is saved as ``None`` and left
  fresh on load, which is the same state.
- ``get_parameter_state_dp_reshardable()`` writes per-parameter dicts without a ``'padding'``
  key, while ``load_parameter_state_from_dp_reshardable`` filters on ``elem['padding']``
  (KeyError). :func:`load_dp_reshardable` is the inverse of the getter as written: the same walk
  over ``gbuf_ranges``, checking that each saved entry covers the same buffer range.
"""

from __future__ import annotations

from typing import Any, Dict, List


def _is_distributed(o) -> bool:
    return hasattr(o, "get_parameter_state_dp_reshardable") and hasattr(o, "gbuf_ranges")


def _has_state(o) -> bool:
    inner = getattr(o, "optimizer", None)
    return inner is not None and len(getattr(inner, "state", {})) > 0


def save_sub(o) -> Dict[str, Any]:
    """One sub-optimizer's state (see module docstring)."""
    scaler = getattr(o, "grad_scaler", None)
    entry: Dict[str, Any] = {"grad_scaler": scaler.state_dict() if scaler is not None else None,
                             "state": None, "param_state": None}
    if _has_state(o):
        entry["state"] = o.state_dict()
        if _is_distributed(o):
            entry["param_state"] = o.get_parameter_state_dp_reshardable()
    return entry


def load_sub(o, entry: Dict[str, Any]) -> None:
    """Inverse of :func:`save_sub` on a freshly built sub-optimizer of the same layout."""
    if entry["state"] is not None:
        o.load_state_dict(entry["state"])  # restores the grad scaler too
        if entry["param_state"] is not None:
            load_dp_reshardable(o, entry["param_state"])
    elif entry["grad_scaler"] is not None and getattr(o, "grad_scaler", None) is not None:
        o.grad_scaler.load_state_dict(entry["grad_scaler"])  # overflow steps before the first success


def load_dp_reshardable(o, state: Dict) -> None:
    """Set main params and Adam states from ``get_parameter_state_dp_reshardable()``'s output."""
    want = o.per_bucket_numel_unpadded
    have = state.get("per_bucket_numel_unpadded")
    if have is not None and have != want:
        raise ValueError(f"optimizer state: buckets of {have} elements in the checkpoint, {want} in this run "
                         f"(a different model or layout)")
    for gbuf_idx, gbuf_range_maps in enumerate(o.gbuf_ranges):
        for dtype, buckets in gbuf_range_maps.items():
            for bucket_idx, range_map in enumerate(buckets):
                saved: List[Dict] = state[gbuf_idx][dtype][bucket_idx]
                params = list(range_map["param_map"].items())
                if len(saved) != len(params):
                    raise ValueError(f"optimizer state: bucket {bucket_idx} of buffer {gbuf_idx} has {len(saved)} "
                                     f"parameters in the checkpoint, {len(params)} in this run")
                for src, (model_param, prange) in zip(saved, params, strict=True):
                    local = prange["gbuf_local"]
                    if (src["gbuf_local_start"], src["gbuf_local_end"]) != (local.start, local.end):
                        raise ValueError("optimizer state: a parameter's shard range differs from the checkpoint's")
                    tensors = {k: v for k, v in src.items() if not k.startswith("gbuf_local_")}
                    o._set_main_param_and_optimizer_states(model_param, tensors)
