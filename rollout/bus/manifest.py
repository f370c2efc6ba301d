"""The manifest of one published weight version, and the checksum that guards every tensor.

A version directory holds safetensors shards, ``config.json``, ``model.safetensors.index.json``
and ``bus-manifest.json``::

    {"format": "megatron-alp-bus/1", "version": 7, "created": 1732262400.0,
     "checksum": "sha256-tree/16777216", "total_bytes": 123456, "precision": "fp32",
     "quantization": null | {"quant_method": "fp8", ...},
     "tensors": {"model.embed_tokens.weight": {"file": "model-pp0-00000.safetensors",
                 "dtype": "float32", "shape": [250, 64], "nbytes": 64000, "sha256": "..."}, ...},
     "files": {"model-pp0-00000.safetensors": {"bytes": 64128}, ...}}

The checksum of a tensor is SHA-256 over its raw little-endian bytes (exactly the bytes of the
safetensors data section). Tensors larger than one chunk (16 MiB) are hashed chunk by chunk and the
digest is SHA-256 of the concatenated chunk digests, so big tensors hash on several cores; a
thread pool does it (``hashlib`` releases the GIL). Writer and verifier share :func:`tensor_digest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

FORMAT = "megatron-alp-bus/1"
MANIFEST = "bus-manifest.json"
INDEX = "model.safetensors.index.json"
CHUNK_BYTES = 16 * 1024 * 1024
CHECKSUM = f"sha256-tree/{CHUNK_BYTES}"

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


def _sha(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def submit_digest(t: torch.Tensor, pool: Optional[Executor] = None) -> Callable[[], str]:
    """Start hashing ``t`` on ``pool``; the returned function waits and gives the hex digest.

    Chunks are submitted individually (never a task that waits on the pool), so many tensors can
    be in flight at once while the caller writes them to disk.
    """
    data = raw_bytes(t)
    if pool is None:
        digest = tensor_digest(t)
        return lambda: digest
    if len(data) <= CHUNK_BYTES:
        fut = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        return fut.result
    futs = [pool.submit(_sha, data[i:i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)]
    return lambda: hashlib.sha256(b"".join(f.result() for f in futs)).hexdigest()


def tensor_digest(t: torch.Tensor, pool: Optional[Executor] = None) -> str:
    """SHA-256 (chunk tree above :data:`CHUNK_BYTES`) of ``t``'s raw bytes; see module docstring."""
    if pool is not None:
        return submit_digest(t, pool)()
    data = raw_bytes(t)
    if len(data) <= CHUNK_BYTES:
        return hashlib.sha256(data).hexdigest()
    parts = [_sha(data[i:i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)]
    return hashlib.sha256(b"".join(parts)).hexdigest()


@dataclass
class TensorEntry:
    file: str
    dtype: str
    shape: List[int]
    nbytes: int
    sha256: str


@dataclass
class Manifest:
    version: int
    tensors: Dict[str, TensorEntry] = field(default_factory=dict)
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    precision: Optional[str] = None
    quantization: Optional[Dict[str, Any]] = None
    created: float = field(default_factory=time.time)
    checksum: str = CHECKSUM
    format: str = FORMAT

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
        if obj.get("checksum") != CHECKSUM:
            raise BusError(f"unknown checksum scheme {obj.get('checksum')!r} (expected {CHECKSUM})")
        tensors = {n: TensorEntry(**e) for n, e in obj["tensors"].items()}
        m = cls(version=int(obj["version"]), tensors=tensors, files=dict(obj.get("files", {})),
                precision=obj.get("precision"), quantization=obj.get("quantization"),
                created=float(obj.get("created", 0.0)))
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
        pending = [(name, submit_digest(t, pool)) for name, t in tensors.items()]
        for name, result in pending:
            digest, e = result(), self.tensors[name]
            if digest != e.sha256:
                raise ChecksumError(name, f"sha256 {digest[:16]}... != manifest {e.sha256[:16]}... "
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
