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
from concurrent.futures import Executor
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
    pending = [] if streamed else [submit_digest(t, pool, checksum, chunk_bytes, v) for (_, t), v in zip(cpu, views)]
    header = _header(cpu)
    digests: Dict[str, str] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for (name, _), v in zip(cpu, views):
            if streamed:
                digests[name] = write_digest(f.write, v, checksum, chunk_bytes)
            elif len(v):
                f.write(v)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        size = f.tell()
    if not streamed:
        digests = {name: result() for (name, _), result in zip(cpu, pending)}
    return size, digests


class ShardWriter:
    """Bucketed shard files ``{prefix}-{i:05d}.safetensors`` in ``directory``.

    ``add(name, tensor)`` buffers; a full bucket is written out; ``close()`` writes the rest and
    returns the manifest entries and file sizes of everything written.
    """

    def __init__(self, directory: str, prefix: str, bucket_bytes: int, *, pool: Optional[Executor] = None,
                 fsync: bool = True, checksum: str = DEFAULT_CHECKSUM):
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
        fname = f"{self.prefix}-{len(self.files):05d}.safetensors"
        size, digests = write_shard(os.path.join(self.directory, fname), self._bucket, self.pool, self.fsync,
                                    self.checksum)
        for name, t in self._bucket:
            self.entries[name] = TensorEntry(file=fname, dtype=dtype_name(t.dtype), shape=list(t.shape),
                                             nbytes=t.numel() * t.element_size(), digest=digests[name])
        self.files[fname] = {"bytes": size}
        logger.debug("bus shard %s: %d tensors, %d bytes", fname, len(self._bucket), size)
        self._bucket, self._bytes = [], 0

    def close(self) -> Tuple[Dict[str, TensorEntry], Dict[str, Dict[str, int]]]:
        self.flush()
        self._closed = True
        return self.entries, self.files
