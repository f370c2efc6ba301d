"""A parallel layout checked against the world size and the model, with errors naming the field.

No torch here: ``tools/convert.py`` checks ``--tp``/``--pp`` with it before importing torch or
Megatron; :mod:`.distributed` validates with it before creating any group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """A resolved parallel layout: sizes of each dimension and the world size they multiply to."""

    tp: int
    pp: int
    cp: int
    dp: int
    sp: bool
    world_size: int


def validate_layout(parallel, world_size: int, model_cfg=None) -> Layout:
    """Check a parallel config section against the world size (and the model section, when given).

    ``parallel`` is a :class:`megatron_alp.config.schema.ParallelConfig` (or anything with the
    fields ``tp``, ``pp``, ``cp``, ``sequence_parallel`` and optionally ``dp``). Raises
    ``ValueError`` naming the offending field and numbers.
    """
    tp, pp, cp = parallel.tp, parallel.pp, parallel.cp
    for name, v in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    mp = tp * pp * cp
    if world_size % mp != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp x parallel.cp "
            f"= {tp} x {pp} x {cp} = {mp}"
        )
    dp = world_size // mp
    want_dp = getattr(parallel, "dp", None)
    if want_dp not in (None, 0) and want_dp != dp:
        raise ValueError(
            f"parallel.dp = {want_dp} but world size {world_size} / (tp {tp} x pp {pp} x cp {cp}) = {dp}"
        )
    if parallel.sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel needs parallel.tp > 1 (got tp = 1)")
    if model_cfg is not None:
        if model_cfg.num_attention_heads % tp:
            raise ValueError(
                f"model.num_attention_heads = {model_cfg.num_attention_heads} is not divisible by parallel.tp = {tp}"
            )
        groups = model_cfg.num_query_groups or model_cfg.num_attention_heads
        if groups % tp:
            raise ValueError(f"model.num_query_groups = {groups} is not divisible by parallel.tp = {tp}")
        if model_cfg.num_layers % pp:
            raise ValueError(f"model.num_layers = {model_cfg.num_layers} is not divisible by parallel.pp = {pp}")
        if model_cfg.ffn_hidden_size % tp:
            raise ValueError(f"model.ffn_hidden_size = {model_cfg.ffn_hidden_size} is not divisible by "
                             f"parallel.tp = {tp}")
    return Layout(tp=tp, pp=pp, cp=cp, dp=dp, sp=bool(parallel.sequence_parallel), world_size=world_size)
