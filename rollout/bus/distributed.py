"""The distributed backend: broadcast flattened buckets from the trainer to the engines.

SGLang 0.5.23's protocol (``/init_weights_update_group``, ``/begin_weight_update``,
``/update_weights_from_distributed`` with ``load_format: "flattened_bucket"``,
``/end_weight_update``): the trainer is rank 0 of a separate process group whose other ranks are
the engines' GPUs (engine ``i`` holds ranks ``rank_offset_i + tp_rank``). For each bucket the
trainer posts the names/dtypes/shapes to every engine and broadcasts one flat ``uint8`` buffer;
each engine cuts it back into tensors. Each pipeline stage of the trainer owns one such group
(its own layers' tensors), so stages send in parallel.

The group is formed the way SGLang forms it (``init_custom_process_group``: a TCP store at the
trainer, prefixed by the group name, then ``<group>/`` and ``<device>/`` prefixes as torch's
process-group helper adds them), but from public constructors (``TCPStore``, ``PrefixStore``,
``ProcessGroupGloo`` / ``ProcessGroupNCCL``), without touching the default process group. With
``backend="gloo"`` everything runs on CPU: the local engine implements the same endpoints over
gloo, which is how the CPU tests exercise this path; ``nccl`` needs GPUs on both sides.
(slime's and verl's ``update_weights_from_distributed`` drivers were read; the code is ours.)
"""

from __future__ import annotations

import datetime
import logging
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from .manifest import BusError, dtype_name, to_dtype

logger = logging.getLogger(__name__)

FLATTENED = "flattened_bucket"


def flatten_bucket(named: Sequence[Tuple[str, torch.Tensor]]):
    """One ``uint8`` buffer for a bucket: (buffer, names, dtypes, shapes).

    Tensors are ordered by decreasing item size so every one starts at an offset aligned to its
    dtype (SGLang's receiver refuses unaligned offsets).
    """
    if not named:
        raise BusError("cannot send an empty bucket")
    ordered = sorted(named, key=lambda nt: -nt[1].element_size())
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in ordered])
    return (flat, [n for n, _ in ordered], [dtype_name(t.dtype) for _, t in ordered],
            [list(t.shape) for _, t in ordered])


def unflatten_bucket(flat: torch.Tensor, names: Sequence[str], dtypes: Sequence[str],
                     shapes: Sequence[Sequence[int]]) -> List[Tuple[str, torch.Tensor]]:
    """Inverse of :func:`flatten_bucket` (views into ``flat``)."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise BusError(f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes")
    out, offset = [], 0
    for name, dt, shape in zip(names, dtypes, shapes, strict=True):
        dtype = to_dtype(dt)
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        if offset % dtype.itemsize:
            raise BusError(f"{name}: unaligned offset {offset} for {dt}")
        out.append((name, flat[offset:offset + size].view(dtype).reshape(shape)))
        offset += size
    if offset != flat.numel():
        raise BusError(f"bucket of {flat.numel()} bytes, the metadata describes {offset}")
    return out


class UpdateGroup:
    """A joined weight-update group: the c10d backend and the TCP store it lives on."""

    def __init__(self, name: str, rank: int, world_size: int, backend: str, pg, store):
        self.name, self.rank, self.world_size, self.backend = name, rank, world_size, backend
        self.pg, self._store = pg, store

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        """Broadcast ``tensor`` in place from ``root``."""
        self.broadcast_async(tensor, root).wait()

    def broadcast_async(self, tensor: torch.Tensor, root: int = 0):
        """Start the broadcast; ``.wait()`` on the returned work completes it (the caller may gather
        the next bucket meanwhile: a different communicator)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception as e:  # a peer may be gone already
            logger.debug("weight-update group %s shutdown: %s", self.name, e)
        self.pg = self._store = None


def join_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                      backend: str = "nccl", timeout_s: float = 600.0) -> UpdateGroup:
    """Join (rank 0: create) the weight-update group.

    Rank 0 hosts the TCP store, as in SGLang's rendezvous. Blocks until every rank has joined.
    """
    if backend not in ("gloo", "nccl"):
        raise BusError(f"weight-update group backend must be gloo or nccl, got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    # Every non-master rank registers as a worker (``wait_for_workers``; it does not block a client):
    # a rank 0 formed by torch's tcp:// rendezvous, as SGLang's init_custom_process_group and slime
    # form it, waits for world_size registrations before anything else. Our own rank 0 does not wait.
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                          timeout=timeout, wait_for_workers=(rank != 0), multi_tenant=True)
    # The prefixes SGLang's init_custom_process_group and torch's _new_process_group_helper add.
    prefixed = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))
    if backend == "gloo":
        group = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", prefixed), rank, world_size, timeout)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", prefixed), rank, world_size, opts)
    logger.info("weight-update group %s: rank %d of %d (%s) at %s:%d", group_name, rank, world_size, backend,
                master_address, master_port)
    return UpdateGroup(group_name, rank, world_size, backend, group, store)
