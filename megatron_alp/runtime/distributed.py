"""torch.distributed and Megatron parallel-state initialisation.

nccl where CUDA exists, gloo otherwise (then the CPU support of :mod:`.cpu_support` is applied).
The parallel layout is validated before any group is created, with errors naming the field.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from .layout import Layout, validate_layout

logger = logging.getLogger(__name__)


DEFAULT_PG_TIMEOUT_MINUTES = 30.0
"""Timeout of the trainer's collectives when no config says otherwise (``parallel.pg_timeout_minutes``)."""


def init_distributed(timeout_minutes: float = DEFAULT_PG_TIMEOUT_MINUTES) -> None:
    """Initialise the default process group from the torchrun environment (idempotent).

    Without ``WORLD_SIZE`` in the environment a single-process group is created (its store on a
    port the OS picks at bind time), so library code can always assume torch.distributed is
    initialised.
    """
    if dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        from .cpu_support import apply_cpu_support

        apply_cpu_support()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = None
    if "WORLD_SIZE" not in os.environ:
        # The store binds port 0 (the OS picks a free one as it binds): a port chosen first and bound
        # later can be taken in between by another process (a parallel run starting its engines).
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timeout)
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "RANK": "0", "WORLD_SIZE": "1"})
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    logger.info("torch.distributed up: backend=%s rank=%d world=%d", backend, dist.get_rank(), dist.get_world_size())


_HANDOVER: dict = {}


def handover_group(timeout_minutes: float):
    """A gloo group of all ranks with its own (long) timeout, for waits on rank 0's rollout.

    Every rank but 0 waits in ``broadcast_object_list`` while rank 0 rolls out; a long-CoT or
    multi-turn rollout takes longer than a collective should ever take inside a training step, so the
    wait runs on this group (``run.rollout_timeout_minutes``, CPU only: no NCCL watchdog) while the
    default group keeps ``parallel.pg_timeout_minutes`` to catch real hangs. slime-based scripts
    raise the one global timeout to 60-120 min instead; a separate group keeps both checks.
    Created once per process (every rank must call this the same number of times).
    """
    if "group" not in _HANDOVER:
        timeout = datetime.timedelta(minutes=timeout_minutes)
        _HANDOVER["group"] = dist.new_group(backend="gloo", timeout=timeout)
    return _HANDOVER["group"]


def init_parallel_state(parallel, model_cfg=None, seed: Optional[int] = None) -> Layout:
    """Validate the layout, then create Megatron's parallel groups (and seed the RNG tracker).

    Re-initialising with another layout in the same process is allowed (the groups are destroyed
    first); tests use this to compare layouts inside one spawned world.
    """
    from megatron.core import parallel_state as ps

    timeout = getattr(parallel, "pg_timeout_minutes", DEFAULT_PG_TIMEOUT_MINUTES)
    init_distributed(timeout)
    layout = validate_layout(parallel, dist.get_world_size(), model_cfg)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        # On CPU every group is gloo already; on GPU the extra gloo groups serve the distributed optimizer.
        create_gloo_process_groups=torch.cuda.is_available(),
        distributed_timeout_minutes=timeout,  # Megatron only builds a timedelta from it
    )
    if seed is not None:
        from .rng import model_parallel_seed

        model_parallel_seed(seed)
    return layout


def destroy_parallel_state() -> None:
    """Tear down Megatron's groups (the default process group stays)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
