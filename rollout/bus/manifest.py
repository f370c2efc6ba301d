"""The manifest of one published weight version, and the checksum that guards every tensor.

A version directory holds safetensors shards, ``config.json``, ``model.safetensors.index.json``
and ``bus-manifest.json``::

    {"format": "megatron-alp-bus/1", "version": 7, "created": 1732262400.0,
     "checksum": "xxh3_128", "checksum_chunk_bytes": 16777216, "total_bytes": 123456,
     "precision": "fp32", "quantization": null | {"quant_method": "fp8", ...},
     "tensors": {"model.embed_tokens.weight": {"file": "model-pp0-00000.safetensors",
                 "dtype": "float32", "shape": [250, 64], "nbytes": 64000, "digest": "..."}, ...},
     "files": {"model-pp0-00000.safetensors": {"bytes": 64128}, ...}}

The checksum of a tensor is a hash of its raw little-endian bytes (exactly the bytes of the
safetensors data section), with the algorithm the manifest names in ``checksum``:

- ``xxh3_128`` (the default, ``bus.checksum``): XXH3 128-bit from the ``xxhash`` package, about
  10 GB/s per core. It detects torn, truncated and corrupted files (the failures a bus has to
  catch), not deliberate tampering: it is not a cryptographic hash.
- ``sha256``: SHA-256 from ``hashlib`` (about 1.1 GB/s per core), for a bus that must resist a
  writer that crafts collisions.

Tensors larger than one chunk (``checksum_chunk_bytes``, 16 MiB) are hashed chunk by chunk and the
digest is the same hash of the concatenated chunk digests, so big tensors hash on several cores: a
writer and a verifier hash chunks on a thread pool (``hashlib`` and ``xxhash`` release the GIL on
large buffers), the writer while it writes the same bytes; a writer without a pool hashes each
piece right after writing it (:func:`write_digest`, same digests). The bytes are always hashed in
place (a memoryview of the tensor's memory, no copy). A verifier always uses the manifest's algorithm and chunk size,
whatever the reader's configuration. Manifests written before the algorithm was configurable carry
``"checksum": "sha256-tree/16777216"`` and per-tensor ``"sha256"`` keys; a manifest without
``checksum`` is SHA-256 too. Both still verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

try:
    import xxhash
except ImportError:  # reported when an xxh3_128 manifest is written or checked
    xxhash = None

FORMAT = "megatron-alp-bus/1"
MANIFEST = "bus-manifest.json"
INDEX = "model.safetensors.index.json"
CHUNK_BYTES = 16 * 1024 * 1024
CHECKSUMS = ("xxh3_128", "sha256")
DEFAULT_CHECKSUM = "xxh3_128"
LEGACY_CHECKSUM = "sha256"  # a manifest without the field
INLINE_BYTES = 64 * 1024  # smaller tensors are hashed by the caller: cheaper than a pool task
PIECE_BYTES = 256 * 1024  # write_digest: written, then hashed while still in the core's L2 cache
_LEGACY_TREE = re.compile(r"^sha256-tree/(\d+)$")  # the pre-configurable spelling

# torch dtype <-> the name on the wire (SGLang does getattr(torch, name)) <-> safetensors code.
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
ST_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
            "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32",
            "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class BusError(RuntimeError):
    """Any failure of the checkpoint bus."""


class ChecksumError(BusError):
    """A tensor's bytes, shape or dtype differ from the manifest; ``tensor`` names it."""

    def __init__(self, tensor: str, message: str):
        super().__init__(f"tensor {tensor!r}: {message}")
        self.tensor = tensor


class VersionError(BusError):
    """A version older than (or equal to) one already published or applied."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise BusError(f"unsupported dtype {name!r}; known: {sorted(DTYPES)}") from None


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is contiguous (CPU tensors only)."""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


def check_checksum(algorithm: str) -> str:
    """``algorithm`` if the bus knows it (and its library is installed), else :class:`BusError`."""
    if algorithm not in CHECKSUMS:
        raise BusError(f"unknown checksum algorithm {algorithm!r}; known: {list(CHECKSUMS)}")
    if algorithm == "xxh3_128" and xxhash is None:
        raise BusError("checksum xxh3_128 needs the xxhash package (pip install 'xxhash>=3.4'), "
                       "or set bus.checksum = sha256")
    return algorithm


def _hasher(algorithm: str):
    """The hash constructor of ``algorithm`` (``hashlib``-like: ``h(data).digest()``)."""
    check_checksum(algorithm)
    return xxhash.xxh3_128 if algorithm == "xxh3_128" else hashlib.sha256


def submit_digest(t: torch.Tensor, pool: Optional[Executor] = None, algorithm: str = DEFAULT_CHECKSUM,
                  chunk_bytes: int = CHUNK_BYTES, data: Optional[memoryview] = None) -> Callable[[], str]:
    """Start hashing ``t`` on ``pool``; the returned function waits and gives the hex digest.

    ``data`` is ``raw_bytes(t)`` when the caller already has it (the shard writer writes the same
    view). Chunks are submitted individually (never a task that waits on the pool), so many tensors
    can be in flight at once while the caller writes them to disk.
    """
    h = _hasher(algorithm)
    if data is None:
        data = raw_bytes(t)
    n = len(data)
    if n <= chunk_bytes:
        if pool is None or n <= INLINE_BYTES:
            digest = h(data).hexdigest()
            return lambda: digest
        return pool.submit(lambda: h(data).hexdigest()).result
    chunks = [data[i:i + chunk_bytes] for i in range(0, n, chunk_bytes)]
    if pool is None:
        digest = h(b"".join(h(c).digest() for c in chunks)).hexdigest()
        return lambda: digest
    futs = [pool.submit(lambda c=c: h(c).digest()) for c in chunks]
    return lambda: h(b"".join(f.result() for f in futs)).hexdigest()


def _stream(write: Optional[Callable[[memoryview], Any]], data: memoryview, hasher, piece_bytes: int):
    for i in range(0, len(data), piece_bytes):
        piece = data[i:i + piece_bytes]
        if write is not None:
            write(piece)
        hasher.update(piece)
    return hasher


def write_digest(write: Optional[Callable[[memoryview], Any]], data: memoryview, algorithm: str = DEFAULT_CHECKSUM,
                 chunk_bytes: int = CHUNK_BYTES, piece_bytes: int = PIECE_BYTES) -> str:
    """Pass ``data`` to ``write`` in pieces of ``piece_bytes`` and hash each piece right after it
    is written (still in this core's cache); the digest is :func:`tensor_digest`'s (streaming and
    one-shot hashes agree). The shard writer uses it when it has no hash pool: one pass over the
    tensor's memory instead of two.
    """
    h = _hasher(algorithm)
    if len(data) <= chunk_bytes:
        return _stream(write, data, h(), piece_bytes).hexdigest()
    parts = [_stream(write, data[i:i + chunk_bytes], h(), piece_bytes).digest()
             for i in range(0, len(data), chunk_bytes)]
    return h(b"".join(parts)).hexdigest()


def tensor_digest(t: torch.Tensor, pool: Optional[Executor] = None, algorithm: str = DEFAULT_CHECKSUM,
                  chunk_bytes: int = CHUNK_BYTES) -> str:
    """The checksum of ``t``'s raw bytes (chunk tree above ``chunk_bytes``); see the module docstring."""
    return submit_digest(t, pool, algorithm, chunk_bytes)()


def parse_checksum(value: Optional[str], chunk_bytes: Optional[int] = None) -> Tuple[str, int]:
    """(algorithm, chunk bytes) of a manifest's ``checksum`` and ``checksum_chunk_bytes`` fields."""
    if value is None:
        return LEGACY_CHECKSUM, int(chunk_bytes or CHUNK_BYTES)
    m = _LEGACY_TREE.match(str(value))
    if m:
        return "sha256", int(m.group(1))
    if value not in CHECKSUMS:
        raise BusError(f"unknown checksum algorithm {value!r} (known: {list(CHECKSUMS)})")
    chunk = int(CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    if chunk < 1:
        raise BusError(f"checksum_chunk_bytes must be >= 1, got {chunk_bytes!r}")
    return value, chunk


@dataclass
class TensorEntry:
    file: str
    dtype: str
    shape: List[int]
    nbytes: int
    digest: str
    """Hex digest of the tensor's bytes with the manifest's ``checksum`` algorithm."""

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "TensorEntry":
        obj = dict(obj)
        if "digest" not in obj and "sha256" in obj:  # manifests from before the algorithm was configurable
            obj["digest"] = obj.pop("sha256")
        return cls(**obj)


@dataclass
class Manifest:
    version: int
    tensors: Dict[str, TensorEntry] = field(default_factory=dict)
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    precision: Optional[str] = None
    quantization: Optional[Dict[str, Any]] = None
    created: float = field(default_factory=time.time)
    checksum: str = DEFAULT_CHECKSUM
    """The digest algorithm of every tensor (:data:`CHECKSUMS`)."""
    checksum_chunk_bytes: int = CHUNK_BYTES
    """Tensors above this size are hashed as a tree of chunks of this size."""
    format: str = FORMAT

    def __post_init__(self):
        check_checksum(self.checksum)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        return out

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "Manifest":
        if obj.get("format") != FORMAT:
            raise BusError(f"unknown manifest format {obj.get('format')!r} (expected {FORMAT})")
        algorithm, chunk_bytes = parse_checksum(obj.get("checksum"), obj.get("checksum_chunk_bytes"))
        tensors = {n: TensorEntry.from_json(e) for n, e in obj["tensors"].items()}
        m = cls(version=int(obj["version"]), tensors=tensors, files=dict(obj.get("files", {})),
                precision=obj.get("precision"), quantization=obj.get("quantization"),
                created=float(obj.get("created", 0.0)), checksum=algorithm, checksum_chunk_bytes=chunk_bytes)
        if int(obj.get("total_bytes", m.total_bytes)) != m.total_bytes:
            raise BusError(f"manifest total_bytes {obj['total_bytes']} != sum of tensors {m.total_bytes}")
        return m

    def check_tensors(self, tensors: Dict[str, torch.Tensor], pool: Optional[Executor] = None) -> None:
        """Raise :class:`ChecksumError` (naming the tensor) unless every tensor is exactly the one
        the manifest describes: same dtype, shape and bytes."""
        for name, t in tensors.items():
            e = self.tensors.get(name)
            if e is None:
                raise ChecksumError(name, "not in the manifest")
            if dtype_name(t.dtype) != e.dtype:
                raise ChecksumError(name, f"dtype {dtype_name(t.dtype)} != manifest {e.dtype}")
            if list(t.shape) != list(e.shape):
                raise ChecksumError(name, f"shape {list(t.shape)} != manifest {e.shape}")
        pending = [(name, submit_digest(t, pool, self.checksum, self.checksum_chunk_bytes))
                   for name, t in tensors.items()]
        for name, result in pending:
            digest, e = result(), self.tensors[name]
            if digest != e.digest:
                raise ChecksumError(name, f"{self.checksum} checksum {digest[:16]}... != manifest {e.digest[:16]}... "
                                          f"(file {e.file} is corrupted or partially written)")


def write_json_atomic(path: str, obj: Any, fsync: bool = True) -> None:
    """Write JSON to ``path`` via a temporary file and a rename (readers never see half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(version_dir: str) -> Manifest:
    path = os.path.join(version_dir, MANIFEST)
    try:
        with open(path) as f:
            return Manifest.from_json(json.load(f))
    except FileNotFoundError:
        raise BusError(f"{version_dir} has no {MANIFEST}: not a published bus version") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BusError(f"{path} is unreadable: {type(e).__name__}: {e}") from None


def has_manifest(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))
