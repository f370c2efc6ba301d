"""The trainer's side of the checkpoint bus: ``publish`` on every rank, ``commit`` on the driver.

    publisher = Publisher(cfg.bus, cfg.model, precision=cfg.rollout.precision)  # every rank, once
    pub = publisher.publish(version, model_chunks,        # every rank (collective)
                            fleet=fleet if rank == 0 else None)
    if rank == 0:
        report = publisher.commit(fleet, pub)             # pause -> apply -> verify -> continue

disk: rank 0 stages a temporary version directory and broadcasts its path; each pipeline stage's
exporting TP-rank-0 streams its own layers into ``model-pp<stage>-NNNNN.safetensors`` shards there
(a full bucket is written on a writer thread while the next one is gathered) plus a part manifest,
then (``bus.verify``) re-reads and checks its own shards, every stage in parallel; after every
rank reported (an all-gather of errors), rank 0 merges the parts, requiring each stage's by name,
writes index/config.json/tokenizer/manifest, and renames the directory into place (atomic). The engines
load it in ``commit``. A failure anywhere aborts the staged directory on every rank.

nccl / tensor: rank 0 pauses the fleet and opens a weight-update session on each engine, then
broadcasts the engine list; each stage's exporting TP-rank-0 sends its buckets over its own group
(nccl; gloo on CPU) or by CUDA IPC (tensor). ``commit`` closes the sessions, stamps the version,
verifies and continues. Engines whose transfer failed are reported in ``Published.errors``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from rollout.bus.address import node_address
from rollout.bus.disk import DiskBus, hash_pool, verify_part
from rollout.bus.fp8 import QUANTIZATION_CONFIG, quantize_named
from rollout.bus.manifest import BusError, Manifest

from ..convert.hf_config import hf_config_for_export, read_hf_config
from ..convert.hf_export import export_role, iter_hf_tensors
from ..convert.mapping import WeightMap
from ..runtime.buckets import buckets
from .export import EXPORT_DTYPES
from .order import exporter_ranks, order_group, send_in_order

logger = logging.getLogger(__name__)


class PublishError(BusError):
    """A publication failed on some rank; nothing was published (raised on every rank)."""


@dataclass
class Published:
    version: int
    backend: str
    path: Optional[str] = None
    """disk: the version directory (every rank)."""
    manifest: Optional[Manifest] = None
    """disk: the manifest (rank 0)."""
    errors: Dict[str, str] = field(default_factory=dict)
    """nccl/tensor: engines whose transfer failed (rank 0)."""
    bytes: int = 0
    """Bytes exported by all stages (rank 0)."""
    seconds: float = 0.0

    def metrics(self) -> Dict[str, float]:
        return {"bus/publish_s": self.seconds, "bus/publish_bytes": float(self.bytes),
                "bus/publish_GBps": self.bytes / max(self.seconds, 1e-9) / 1e9}


def export_config(model, precision: str, hf_dir: Optional[str] = None) -> Dict[str, Any]:
    """config.json of a published version: the source checkpoint's (``hf_dir``, default
    ``model.hf_path``; else one built from the model section) with the export dtype and, for FP8,
    the block-FP8 ``quantization_config`` (the trainer's versions and version 0 of sync/v0.py)."""
    src = hf_dir or model.hf_path
    source = read_hf_config(src) if src and os.path.isfile(os.path.join(src, "config.json")) else None
    cfg = hf_config_for_export(model, EXPORT_DTYPES[precision], source)
    cfg.pop("quantization_config", None)
    if precision == "fp8":
        cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return cfg


def _bcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> List[Any]:
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Publisher:
    """Publishes a Megatron model's weights as bus versions (see the module docstring)."""

    def __init__(self, bus, model_cfg, *, precision: str = "fp32", hf_config: Optional[Dict[str, Any]] = None,
                 tokenizer_dir: Optional[str] = None, pause_mode: str = "abort"):
        if precision not in EXPORT_DTYPES:
            raise ValueError(f"rollout precision must be one of {sorted(EXPORT_DTYPES)}, got {precision!r}")
        self.bus, self.model_cfg = bus, model_cfg
        self.precision = precision
        self.dtype = EXPORT_DTYPES[precision]
        self.weight_map = WeightMap.for_model(model_cfg.family, model_cfg)
        self.bucket_bytes = int(bus.bucket_mb) * 2 ** 20
        self.tokenizer_dir = tokenizer_dir or model_cfg.hf_path
        self._hf_config = hf_config
        self.pause_mode = pause_mode  # how the fleet pauses generation for an update (rollout.span_policy)
        self.disk = (DiskBus(bus.dir, bus.keep, fsync=bus.fsync, checksum=bus.checksum)
                     if bus.backend == "disk" else None)
        if bus.backend == "tensor":
            from rollout.bus.tensor import require_cuda

            require_cuda()
        self._sender = None
        self._sender_key: Optional[Tuple] = None
        self._generation = 0
        self._cleaned = False
        self._order: Optional[Tuple] = None  # (the exporting ranks' gloo group or None,), made once

    # -- helpers -------------------------------------------------------------------------------
    def hf_config(self) -> Dict[str, Any]:
        """config.json of a published version: the source's (or one built from the model section),
        with the export dtype and, for FP8, the block-FP8 ``quantization_config``."""
        if self._hf_config is None:
            self._hf_config = export_config(self.model_cfg, self.precision)
        return dict(self._hf_config)

    def _tensors(self, model_chunks):
        named = iter_hf_tensors(model_chunks, self.weight_map, self.model_cfg.vocab_size)
        if self.precision == "fp8":
            return quantize_named(named, other_dtype=self.dtype)
        return ((n, t.to(self.dtype)) for n, t in named)

    @staticmethod
    def _stage_parts() -> List[str]:
        """The part every pipeline stage's writer leaves (finalize requires each by name)."""
        from megatron.core import parallel_state as ps

        return [f"pp{s}" for s in range(ps.get_pipeline_model_parallel_world_size())]

    @staticmethod
    def _stage() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_rank()

    def prepublished_v0(self) -> Optional[Published]:
        """Collective: version 0 as written before the engines started (:mod:`.v0`, the launcher's
        FP8 path), when the bus holds exactly that; None otherwise (then :meth:`publish` it)."""
        found = None
        if self.disk is not None and dist.get_rank() == 0:
            from .v0 import prepublished

            found = prepublished(self.disk, self.precision)
        if _bcast(found) is None:
            return None
        manifest = None
        if dist.get_rank() == 0:
            from rollout.bus.manifest import read_manifest

            manifest = read_manifest(self.disk.path(0))
            logger.info("bus: version 0 found published before the engines started (%s, %.1f MB): committing it",
                        self.precision, manifest.total_bytes / 1e6)
        return Published(0, "disk", path=self.disk.path(0), manifest=manifest,
                         bytes=manifest.total_bytes if manifest else 0)

    # -- publish -------------------------------------------------------------------------------
    def publish(self, version: int, model_chunks, *, fleet=None, rewind: bool = False) -> Published:
        """Collective on every trainer rank. ``fleet`` (rank 0) is needed by nccl/tensor.

        ``rewind=True`` (after resuming from a checkpoint) first removes disk versions >= ``version``.
        """
        t0 = time.perf_counter()
        if self.bus.backend == "disk":
            pub = self._publish_disk(int(version), model_chunks, rewind)
        else:
            pub = self._publish_stream(int(version), model_chunks, fleet)
        pub.seconds = time.perf_counter() - t0
        if dist.get_rank() == 0:
            logger.info("bus: version %d exported (%s, %.1f MB in %.2f s)", version, self.bus.backend,
                        pub.bytes / 1e6, pub.seconds)
        return pub

    def _write_stage(self, version: int, model_chunks, staged: str) -> Tuple[Optional[str], int]:
        """This rank's part of a disk publication: (error or None, bytes written). Every exporting rank
        takes part in the TP gathers; a stage's writer streams its shards and verifies them."""
        nbytes = 0
        try:
            tensors = self._tensors(model_chunks)
            if not export_role()[1]:
                for _ in tensors:  # take part in the TP gathers
                    pass
                return None, 0
            with hash_pool() as pool:
                writer = self.disk.writer(staged, f"pp{self._stage()}", self.bucket_bytes, pool)
                for name, t in tensors:
                    writer.add(name, t)
                    nbytes += t.numel() * t.element_size()
                entries, _ = writer.close()
                if self.bus.verify:  # each stage re-reads its own shards, all stages at once
                    verify_part(staged, entries, self.disk.checksum, pool)
            return None, nbytes
        except Exception as e:
            logger.exception("bus: export of version %d failed on this rank", version)
            return f"rank {dist.get_rank()}: {type(e).__name__}: {e}", nbytes

    def _publish_disk(self, version: int, model_chunks, rewind: bool) -> Published:
        head: Tuple[str, str] = ("error", "")
        if dist.get_rank() == 0:
            try:
                if not self._cleaned:  # a publication that crashed in an earlier run
                    self.disk.remove_stale()
                    self._cleaned = True
                if rewind:
                    self.disk.rewind(version)
                head = ("ok", self.disk.stage(version))
            except Exception as e:
                head = ("error", f"{type(e).__name__}: {e}")
        status, staged = _bcast(head)
        if status != "ok":
            raise PublishError(f"version {version}: {staged}")
        reports = _gather(self._write_stage(version, model_chunks, staged))
        errors = [e for e, _ in reports if e]
        manifest = None
        if dist.get_rank() == 0:
            try:
                if not errors:
                    manifest = self.disk.finalize(staged, version, config=self.hf_config(),
                                                  tokenizer_dir=self.tokenizer_dir, precision=self.precision,
                                                  quantization=QUANTIZATION_CONFIG if self.precision == "fp8" else None,
                                                  parts=self._stage_parts())
            except Exception as e:
                errors.append(f"rank 0 finalize: {type(e).__name__}: {e}")
            if errors:
                self.disk.abort(staged)
        errors = _bcast(errors)
        if errors:
            raise PublishError(f"version {version} not published: {'; '.join(errors)}")
        return Published(version, "disk", path=self.disk.path(version), manifest=manifest,
                         bytes=sum(n for _, n in reports))

    def _publish_stream(self, version: int, model_chunks, fleet) -> Published:
        head: Tuple = ("error", "")
        if dist.get_rank() == 0:
            head = self._open_sessions(fleet)
        head = _bcast(head)
        if head[0] != "ok":
            raise PublishError(f"version {version}: {head[1]}")
        _, urls, ranks, api_key, failed = head
        err, nbytes, send_errors = None, 0, {}
        if self._order is None:  # collective, once: the exporting ranks' own gloo group
            self._order = (order_group(exporter_ranks(export_role()[1])),)
        try:
            tensors = self._tensors(model_chunks)
            if export_role()[1]:
                sender = self._get_sender(urls, ranks, api_key)
                sent: List[int] = []

                begin = getattr(sender, "start_bucket", sender.send_bucket)  # tensor backend: synchronous

                def start(bucket):
                    sent.append(sum(t.numel() * t.element_size() for _, t in bucket))
                    return begin(bucket)

                # One global bucket order across stages; the next bucket gathered during a transfer.
                send_in_order(buckets(tensors, self.bucket_bytes), start,
                              getattr(sender, "finish_bucket", lambda _: None), self._order[0])
                nbytes = sum(sent)
                send_errors = dict(sender.errors)
                sender.errors.clear()
                if sender.broken:
                    self._drop_sender()
            else:
                for _ in tensors:
                    pass
        except Exception as e:
            logger.exception("bus: transfer of version %d failed on this rank", version)
            err = f"rank {dist.get_rank()}: {type(e).__name__}: {e}"
        reports = _gather((err, send_errors, nbytes))
        rank_errors = [e for e, _, _ in reports if e]
        if rank_errors:
            raise PublishError(f"version {version} transfer failed (engine sessions left open, fleet paused): "
                               f"{'; '.join(rank_errors)}")
        errors = dict(failed)
        for _, errs, _ in reports:
            for url, msg in errs.items():
                errors.setdefault(url, msg)
        return Published(version, self.bus.backend, errors=errors, bytes=sum(n for _, _, n in reports))

    def _open_sessions(self, fleet) -> Tuple:
        """Rank 0: pause the fleet, open a session on each engine, learn each engine's rank count."""
        from rollout.aio import run_sync
        from rollout.bus.commit import begin_session

        if fleet is None:
            return ("error", f"bus.backend = {self.bus.backend} needs the fleet on rank 0 (publish(..., fleet=fleet))")
        try:
            failed = run_sync(begin_session(fleet, self.pause_mode))
            clients = [c for c in fleet.live_clients if c.url not in failed]
            ranks = [run_sync(_engine_ranks(c)) for c in clients]
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}")
        api_key = clients[0].api_key if clients else None
        return ("ok", [c.url for c in clients], ranks, api_key, failed)

    def _get_sender(self, urls: List[str], ranks: List[int], api_key: Optional[str]):
        """This stage's sender; rebuilt (new group) whenever the engine set changes."""
        from rollout.bus.sender import DistributedSender
        from rollout.bus.tensor import TensorSender
        from rollout.config import ClientConfig
        from rollout.engines.client import EngineClient

        key = (tuple(urls), tuple(ranks))
        if self._sender is not None and self._sender_key == key:
            return self._sender
        self._drop_sender()
        client_cfg = ClientConfig(max_retries=0, control_timeout_s=self.bus.timeout_s)
        clients = [EngineClient(u, api_key=api_key, config=client_cfg) for u in urls]
        if self.bus.backend == "tensor":
            sender = TensorSender(clients, ranks)
        else:
            self._generation += 1
            # Per node: each stage's sender may run on another node (rollout/bus/address.py).
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            address = self.bus.master_address or node_address(urls, backend)
            sender = DistributedSender(clients, group_name=f"megatron-alp-pp{self._stage()}-g{self._generation}",
                                       engine_ranks=ranks, master_address=address, timeout_s=self.bus.timeout_s)
        sender.connect()
        self._sender, self._sender_key = sender, key
        return sender

    def _drop_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
        self._sender = self._sender_key = None

    # -- commit (driver) -----------------------------------------------------------------------
    def commit(self, fleet, published: Published, *, spot_check=None):
        """Rank 0: commit a published version to the fleet; returns a CommitReport (see
        :mod:`rollout.bus.commit`), raises CommitError per ``bus.on_engine_failure``."""
        from rollout.aio import run_sync
        from rollout.bus.commit import commit, disk_apply, session_apply

        common = dict(retries=self.bus.retries, on_failure=self.bus.on_engine_failure, spot_check=spot_check,
                      pause_mode=self.pause_mode)
        if published.backend == "disk":
            return run_sync(commit(fleet, published.version, disk_apply(published.path, published.version), **common))
        return run_sync(commit(fleet, published.version, session_apply(published.version), already_paused=True,
                               failed=published.errors, **common))

    def close(self) -> None:
        self._drop_sender()


async def _engine_ranks(client) -> int:
    """GPUs of one engine in a weight-update group (SGLang: tp_size; the local engine: 1)."""
    info = await client.server_info()
    tp, dp, pp = (int(info.get(k) or 1) for k in ("tp_size", "dp_size", "pp_size"))
    if dp > 1 or pp > 1:
        raise BusError(f"engine {client.url} runs dp_size={dp}, pp_size={pp}: SGLang's weight-update group "
                       f"ranks are rank_offset + tp_rank, so use one server per replica with the nccl backend")
    return tp
