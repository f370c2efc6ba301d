"""Trainer side of the distributed backend: one sender per pipeline stage.

A :class:`DistributedSender` is rank 0 of a weight-update group whose other ranks are the engines'
GPUs. ``connect()`` asks every engine to join (``/init_weights_update_group``) while joining
itself; ``send_bucket(named)`` posts one bucket's names/dtypes/shapes to every engine and
broadcasts the flattened bytes meanwhile. It is synchronous: the HTTP calls run on the shared
background loop (:func:`rollout.aio.submit`) while this thread sits in the collective.

Failure model: a collective needs every member. An engine that refuses a bucket after receiving
it (the local engine always consumes the broadcast) is marked failed and the others go on; a
broadcast that fails (a dead engine, a timeout) breaks the group for everyone: every engine is
marked failed, nothing more is sent, and the group is rebuilt at the next publication. The commit
then drops the failed engines (or stops the run): they may hold half-loaded weights.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..aio import submit
from ..engines.processes import free_port
from .distributed import FLATTENED, UpdateGroup, flatten_bucket, join_update_group
from .manifest import BusError

logger = logging.getLogger(__name__)


class DistributedSender:
    """Rank 0 of the weight-update group ``group_name`` over ``clients`` (EngineClients)."""

    def __init__(self, clients: Sequence, *, group_name: str, engine_ranks: Optional[Sequence[int]] = None,
                 master_address: str = "127.0.0.1", master_port: Optional[int] = None,
                 backend: Optional[str] = None, timeout_s: float = 600.0):
        self.clients = list(clients)
        self.urls = [c.url for c in self.clients]
        self.engine_ranks = list(engine_ranks or [1] * len(self.clients))
        if len(self.engine_ranks) != len(self.clients):
            raise ValueError("one engine_ranks entry per engine")
        self.group_name, self.master_address = group_name, master_address
        self.master_port = master_port
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.timeout_s = timeout_s
        self.group: Optional[UpdateGroup] = None
        self.errors: Dict[str, str] = {}
        self.broken = False
        self.bytes_sent = 0

    @property
    def world_size(self) -> int:
        return 1 + sum(self.engine_ranks)

    def connect(self) -> None:
        """Form the group (blocks until every engine has joined or the timeout passes)."""
        port = self.master_port or free_port(self.master_address)
        offsets, offset = [], 1
        for n in self.engine_ranks:
            offsets.append(offset)
            offset += n
        futures = [submit(c.init_weights_update_group(self.master_address, port, off, self.world_size,
                                                      self.group_name, self.backend))
                   for c, off in zip(self.clients, offsets, strict=True)]
        try:
            self.group = join_update_group(self.master_address, port, 0, self.world_size, self.group_name,
                                           self.backend, self.timeout_s)
        except Exception as e:
            details = {}
            for c, f in zip(self.clients, futures, strict=True):
                try:
                    f.result(timeout=1.0)
                except Exception as err:  # the engine's own account of why it did not join
                    details[c.url] = f"{type(err).__name__}: {err}"
            raise BusError(f"weight-update group {self.group_name} did not form ({type(e).__name__}: {e}); "
                           f"engines: {details or 'no answer'}") from e
        for f in futures:
            f.result(timeout=self.timeout_s)
        logger.info("bus: group %s formed with %d engine(s) (%s, world %d)", self.group_name, len(self.clients),
                    self.backend, self.world_size)

    def send_bucket(self, named: List[Tuple[str, torch.Tensor]]) -> None:
        """Send one bucket to every engine that has not failed yet."""
        self.finish_bucket(self.start_bucket(named))

    def start_bucket(self, named: List[Tuple[str, torch.Tensor]]):
        """Post the bucket's metadata to every live engine and start its broadcast; returns the pending
        transfer for :meth:`finish_bucket` (gather the next bucket in between: the overlap)."""
        if self.group is None:
            raise BusError("DistributedSender.start_bucket before connect()")
        if self.broken:
            return None
        device = "cuda" if self.backend == "nccl" else "cpu"
        flat, names, dtypes, shapes = flatten_bucket([(n, t.to(device)) for n, t in named])
        live = [c for c in self.clients if c.url not in self.errors]
        futures = [submit(c.update_weights_from_distributed(names, dtypes, shapes, self.group_name,
                                                            load_format=FLATTENED)) for c in live]
        try:
            work = self.group.broadcast_async(flat)
        except Exception as e:
            work = e
        return flat, names, live, futures, work

    def finish_bucket(self, pending) -> None:
        """Wait for the broadcast and every engine's answer; record failures (see the module docstring)."""
        if pending is None:
            return
        flat, names, live, futures, work = pending
        try:
            if isinstance(work, Exception):
                raise work
            work.wait()
        except Exception as e:
            self.broken = True
            for c in self.clients:
                self.errors.setdefault(c.url, f"broadcast of {len(names)} tensors failed: {type(e).__name__}: {e}")
            logger.error("bus: group %s broken during a broadcast: %s", self.group_name, e)
        for c, f in zip(live, futures, strict=True):
            try:
                f.result(timeout=self.timeout_s)
            except Exception as e:
                self.errors.setdefault(c.url, f"{type(e).__name__}: {e}")
        self.bytes_sent += flat.numel()

    def close(self) -> None:
        """Leave the group (engines are asked to destroy it, best effort) and close the clients."""
        if self.group is not None:
            futures = [submit(c.destroy_weights_update_group(self.group_name)) for c in self.clients]
            self.group.close()
            for f in futures:
                try:
                    f.result(timeout=30)
                except Exception as e:
                    logger.debug("destroy_weights_update_group: %s", e)
            self.group = None
        for c in self.clients:
            submit(c.close()).result(timeout=30)
