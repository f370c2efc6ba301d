"""Streaming safetensors shards: tensors arrive one at a time, leave in buckets of bounded size.

A :class:`ShardWriter` keeps at most one bucket (``bucket_bytes``, plus the tensor that overflows
it) in memory. When a bucket is full it becomes one ``.safetensors`` file: the header, then each
tensor's bytes written straight from the tensor's memory (no serialisation copy), while a thread
pool hashes the same memoryview for the manifest (``hashlib`` and ``xxhash`` release the GIL).
The file format is safetensors' (an 8-byte little-endian header length, a JSON header padded to
8 bytes, then the data section without holes), so ``safetensors.torch.load_file``, transformers
and SGLang read the shards as usual.

Within a shard tensors are laid out by decreasing item size, so every tensor starts at an offset
aligned to its dtype (fp8 weights next to their fp32 ``weight_scale_inv``).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch

from .manifest import (
    CHUNK_BYTES,
    DEFAULT_CHECKSUM,
    ST_CODES,
    BusError,
    TensorEntry,
    check_checksum,
    dtype_name,
    raw_bytes,
    submit_digest,
    write_digest,
)

logger = logging.getLogger(__name__)


def _header(tensors: List[Tuple[str, torch.Tensor]]) -> bytes:
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        code = ST_CODES.get(dtype_name(t.dtype))
        if code is None:
            raise BusError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * ((-len(raw)) % 8)


def write_shard(path: str, tensors: List[Tuple[str, torch.Tensor]], pool: Optional[Executor] = None,
                fsync: bool = True, checksum: str = DEFAULT_CHECKSUM,
                chunk_bytes: int = CHUNK_BYTES) -> Tuple[int, Dict[str, str]]:
    """Write one safetensors file; returns (file bytes, {name: digest}) with ``checksum``.

    Both the write and the hash read the tensor's memory in place (no copy). The hashes run on
    ``pool`` (16 MiB chunks in parallel) while this thread writes; without a pool this thread hashes
    each piece right after writing it (:func:`write_digest`).
    """
    tensors = sorted(tensors, key=lambda nt: -nt[1].element_size())  # stable: alignment by dtype
    cpu = [(n, t.detach().cpu().contiguous()) for n, t in tensors]
    views = [raw_bytes(t) for _, t in cpu]
    streamed = pool is None
    # the pool hashes while we write
    pending = [] if streamed else [submit_digest(t, pool, checksum, chunk_bytes, v)
                                   for (_, t), v in zip(cpu, views, strict=True)]
    header = _header(cpu)
    digests: Dict[str, str] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for (name, _), v in zip(cpu, views, strict=True):
            if streamed:
                digests[name] = write_digest(f.write, v, checksum, chunk_bytes)
            elif len(v):
                f.write(v)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        size = f.tell()
    if not streamed:
        digests = {name: result() for (name, _), result in zip(cpu, pending, strict=True)}
    return size, digests


class ShardWriter:
    """Bucketed shard files ``{prefix}-{i:05d}.safetensors`` in ``directory``.

    ``add(name, tensor)`` buffers; a full bucket is written out; ``close()`` writes the rest and
    returns the manifest entries and file sizes of everything written.

    With ``background=True`` a full bucket is copied to host memory on the caller's thread and
    written (and hashed) on a writer thread, while the caller goes on producing the next bucket
    (gathering it across TP ranks, quantising it, copying it): the write overlaps the copy. At most
    two buckets are in memory (the one being written, the one being filled).
    """

    def __init__(self, directory: str, prefix: str, bucket_bytes: int, *, pool: Optional[Executor] = None,
                 fsync: bool = True, checksum: str = DEFAULT_CHECKSUM, background: bool = False):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.directory, self.prefix, self.bucket_bytes = directory, prefix, bucket_bytes
        self.pool, self.fsync, self.checksum = pool, fsync, check_checksum(checksum)
        self.entries: Dict[str, TensorEntry] = {}
        self.files: Dict[str, Dict[str, int]] = {}
        self._bucket: List[Tuple[str, torch.Tensor]] = []
        self._names: set = set()
        self._bytes = 0
        self._closed = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bus-write") if background else None
        self._pending: Optional[Tuple[str, List[Tuple[str, torch.Tensor]], Future]] = None
        self.seconds = {"copy_to_host": 0.0, "write_wait": 0.0}
        """Time the caller spent copying buckets to host memory, and waiting for the writer thread."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise BusError("ShardWriter.add after close")
        if name in self._names:
            raise BusError(f"tensor {name!r} published twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._bucket and self._bytes + nbytes > self.bucket_bytes:
            self.flush()
        self._bucket.append((name, tensor))
        self._bytes += nbytes

    def flush(self) -> None:
        if not self._bucket:
            return
        fname = f"{self.prefix}-{len(self.files) + (self._pending is not None):05d}.safetensors"
        path = os.path.join(self.directory, fname)
        t0 = time.perf_counter()
        bucket = [(n, t.detach().cpu().contiguous()) for n, t in self._bucket]
        self.seconds["copy_to_host"] += time.perf_counter() - t0
        self._bucket, self._bytes = [], 0
        if self._writer is None:
            self._record(fname, bucket, write_shard(path, bucket, self.pool, self.fsync, self.checksum))
            return
        self._wait()
        self._pending = (fname, bucket, self._writer.submit(write_shard, path, bucket, self.pool, self.fsync,
                                                            self.checksum))

    def _wait(self) -> None:
        if self._pending is None:
            return
        fname, bucket, fut = self._pending
        self._pending = None
        t0 = time.perf_counter()
        result = fut.result()
        self.seconds["write_wait"] += time.perf_counter() - t0
        self._record(fname, bucket, result)

    def _record(self, fname: str, bucket, result: Tuple[int, Dict[str, str]]) -> None:
        size, digests = result
        for name, t in bucket:
            self.entries[name] = TensorEntry(file=fname, dtype=dtype_name(t.dtype), shape=list(t.shape),
                                             nbytes=t.numel() * t.element_size(), digest=digests[name])
        self.files[fname] = {"bytes": size}
        logger.debug("bus shard %s: %d tensors, %d bytes", fname, len(bucket), size)

    def close(self) -> Tuple[Dict[str, TensorEntry], Dict[str, Dict[str, int]]]:
        try:
            self.flush()
            self._wait()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.shutdown(wait=True)
        return self.entries, self.files
