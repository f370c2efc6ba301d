"""Configurations the trainer accepts in the config but cannot run yet: refused at load time.

- ``parallel.cp > 1``: Megatron builds context-parallel groups, but the actor feeds every CP rank
  the whole sequence (no per-rank split of tokens, positions and the loss), so gradients would be
  wrong. Refused until the split is implemented.
- ``bus.backend = tensor``: the engine maps the trainer's weights through CUDA IPC handles. SGLang
  0.5.23 rebuilds them with its UUID-keyed reduction patch (srt/utils/patch_torch.py): the handle
  names the GPU by UUID and the engine process must see that GPU. That holds only when the
  engines are started by the trainer on the trainer's own node and GPUs ("truly colocated"):
  engine ``i`` takes GPUs ``[i*tp*dp, (i+1)*tp*dp)`` of the trainer's visible devices
  (rollout/engines/sglang.py ``--base-gpu-id``), so every engine GPU must be one the trainer's
  ranks hold. Attached engines (``rollout.urls``, which the SLURM launcher uses, on GPUs disjoint
  from the trainer's), several nodes, or more engine GPUs than trainer GPUs are refused.
"""

from __future__ import annotations


def check_gpu_placement(cfg, world: int, local_world: int) -> None:
    """Raise ``ValueError`` naming the field for the configurations above."""
    if cfg.parallel.cp > 1:
        raise ValueError(f"parallel.cp = {cfg.parallel.cp}: context parallelism is not implemented in the actor "
                         f"(sequences are not split per CP rank); use parallel.cp = 1")
    if cfg.bus.backend == "tensor":
        _check_tensor_bus(cfg, world, local_world)


def _check_tensor_bus(cfg, world: int, local_world: int) -> None:
    r = cfg.rollout
    why = None
    if r.urls:
        why = ("rollout.urls attaches engines the trainer did not start (the SLURM launcher's placement, on GPUs "
               "disjoint from the trainer's)")
    elif r.engine != "sglang":
        why = f"rollout.engine = {r.engine} has no /update_weights_from_tensor"
    elif world != local_world:
        why = f"the trainer spans {world // max(local_world, 1)} nodes; IPC handles do not cross nodes"
    else:
        engine_gpus = r.num_engines * r.sglang.tp_size * r.sglang.dp_size
        if engine_gpus > local_world:
            why = (f"rollout.num_engines x sglang.tp_size x sglang.dp_size = {engine_gpus} engine GPUs, but the "
                   f"trainer holds {local_world}: engines would run on GPUs the trainer does not share")
    if why:
        raise ValueError(f"bus.backend = tensor needs engines colocated on the trainer's GPUs: {why}; "
                         f"use bus.backend = nccl or disk")
