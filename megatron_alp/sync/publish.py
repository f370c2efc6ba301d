"""The trainer's side of the checkpoint bus: ``publish`` on every rank, ``commit`` on the driver.

    publisher = Publisher(cfg.bus, cfg.model, precision=cfg.rollout.precision)  # every rank, once
    pub = publisher.publish(version, model_chunks,        # every rank (collective)
                            fleet=fleet if rank == 0 else None)
    if rank == 0:
        report = publisher.commit(fleet, pub)             # pause -> apply -> verify -> continue

disk: rank 0 stages a temporary version directory and broadcasts its path; each pipeline stage's
exporting TP-rank-0 streams its own layers into ``model-pp<stage>-NNNNN.safetensors`` shards there
(one bucket in memory at a time) plus a part manifest; after every rank reported (an
all-gather of errors), rank 0 merges the parts, writes index/config.json/tokenizer/manifest,
optionally re-verifies every checksum, and renames the directory into place (atomic). The engines
load it in ``commit``. A failure anywhere aborts the staged directory on every rank.

nccl / tensor: rank 0 pauses the fleet and opens a weight-update session on each engine, then
broadcasts the engine list; each stage's exporting TP-rank-0 sends its buckets over its own group
(nccl; gloo on CPU) or by CUDA IPC (tensor). ``commit`` closes the sessions, stamps the version,
verifies and continues. Engines whose transfer failed are reported in ``Published.errors``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from rollout.bus.disk import DiskBus, hash_pool
from rollout.bus.fp8 import QUANTIZATION_CONFIG, quantize_named
from rollout.bus.manifest import BusError, Manifest

from ..convert.hf_config import hf_config_for_export, read_hf_config
from ..convert.hf_export import export_role, iter_hf_tensors
from ..convert.mapping import WeightMap
from .export import EXPORT_DTYPES, buckets

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
                 tokenizer_dir: Optional[str] = None):
        if precision not in EXPORT_DTYPES:
            raise ValueError(f"rollout precision must be one of {sorted(EXPORT_DTYPES)}, got {precision!r}")
        self.bus, self.model_cfg = bus, model_cfg
        self.precision = precision
        self.dtype = EXPORT_DTYPES[precision]
        self.weight_map = WeightMap.for_model(model_cfg.family, model_cfg)
        self.bucket_bytes = int(bus.bucket_mb) * 2 ** 20
        self.tokenizer_dir = tokenizer_dir or model_cfg.hf_path
        self._hf_config = hf_config
        self.disk = (DiskBus(bus.dir, bus.keep, fsync=bus.fsync, checksum=bus.checksum)
                     if bus.backend == "disk" else None)
        if bus.backend == "tensor":
            from rollout.bus.tensor import require_cuda

            require_cuda()
        self._sender = None
        self._sender_key: Optional[Tuple] = None
        self._generation = 0

    # -- helpers -------------------------------------------------------------------------------
    def hf_config(self) -> Dict[str, Any]:
        """config.json of a published version: the source's (or one built from the model section),
        with the export dtype and, for FP8, the block-FP8 ``quantization_config``."""
        if self._hf_config is None:
            src = self.model_cfg.hf_path
            source = read_hf_config(src) if src and os.path.isfile(os.path.join(src, "config.json")) else None
            self._hf_config = hf_config_for_export(self.model_cfg, self.dtype, source)
        cfg = dict(self._hf_config)
        cfg.pop("quantization_config", None)
        if self.precision == "fp8":
            cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
        return cfg

    def _tensors(self, model_chunks):
        named = iter_hf_tensors(model_chunks, self.weight_map, self.model_cfg.vocab_size)
        if self.precision == "fp8":
            return quantize_named(named, other_dtype=self.dtype)
        return ((n, t.to(self.dtype)) for n, t in named)

    @staticmethod
    def _stage() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_rank()

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

    def _publish_disk(self, version: int, model_chunks, rewind: bool) -> Published:
        head: Tuple[str, str] = ("error", "")
        if dist.get_rank() == 0:
            try:
                if rewind:
                    self.disk.rewind(version)
                head = ("ok", self.disk.stage(version))
            except Exception as e:
                head = ("error", f"{type(e).__name__}: {e}")
        status, staged = _bcast(head)
        if status != "ok":
            raise PublishError(f"version {version}: {staged}")
        err, nbytes = None, 0
        try:
            tensors = self._tensors(model_chunks)
            if export_role()[1]:
                with hash_pool() as pool:
                    writer = self.disk.writer(staged, f"pp{self._stage()}", self.bucket_bytes, pool)
                    for name, t in tensors:
                        writer.add(name, t)
                        nbytes += t.numel() * t.element_size()
                    writer.close()
            else:
                for _ in tensors:  # take part in the TP gathers
                    pass
        except Exception as e:
            logger.exception("bus: export of version %d failed on this rank", version)
            err = f"rank {dist.get_rank()}: {type(e).__name__}: {e}"
        reports = _gather((err, nbytes))
        errors = [e for e, _ in reports if e]
        manifest = None
        if dist.get_rank() == 0:
            try:
                if not errors:
                    manifest = self.disk.finalize(staged, version, config=self.hf_config(),
                                                  tokenizer_dir=self.tokenizer_dir, precision=self.precision,
                                                  quantization=QUANTIZATION_CONFIG if self.precision == "fp8" else None,
                                                  verify_first=self.bus.verify)
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
        try:
            tensors = self._tensors(model_chunks)
            if export_role()[1]:
                sender = self._get_sender(urls, ranks, api_key)
                for bucket in buckets(tensors, self.bucket_bytes):
                    sender.send_bucket(bucket)
                    nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
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
            failed = run_sync(begin_session(fleet))
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
            address = self.bus.master_address or socket.gethostbyname(socket.gethostname())
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

        common = dict(retries=self.bus.retries, on_failure=self.bus.on_engine_failure, spot_check=spot_check)
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
