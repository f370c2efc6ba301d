"""The disk backend: one directory per version, published atomically, old versions collected.

Layout under ``root`` (a shared filesystem on a cluster)::

    root/v00000007/                      a published version (never modified after the rename)
        model-pp0-00000.safetensors ...  shards written by pipeline stage 0, 1, ...
        model.safetensors.index.json     HF index (weight_map), so every HF loader reads it
        config.json [+ tokenizer files]  an HF checkpoint: an engine can also *start* on it
        bus-manifest.json                version, names, shapes, dtypes, a checksum per tensor, bytes
    root/.tmp-v00000008-<pid>-<nonce>/   being written: invisible to readers

Publishing = :meth:`DiskBus.stage` (a temporary directory; refuses a version not newer than the
latest), one :meth:`DiskBus.writer` per writer process (pipeline stage) streaming bucketed shards
plus a ``part-*.json`` of their manifest entries, then :meth:`DiskBus.finalize` on one process:
merge the parts, write index/config/manifest, fsync, and ``rename`` the directory to its final
name, which is atomic on POSIX filesystems (a crash before it leaves only a ``.tmp-*`` directory,
which the next publication's garbage collection removes). :meth:`DiskBus.publish` does all of it
in one process. The write-then-rename commit is the standard one (slime and verl write HF
checkpoints the same way); the code is ours.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .manifest import (
    DEFAULT_CHECKSUM,
    INDEX,
    MANIFEST,
    BusError,
    ChecksumError,
    Manifest,
    TensorEntry,
    VersionError,
    check_checksum,
    read_manifest,
    write_json_atomic,
)
from .shards import ShardWriter
from .versions import version_dirname

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^v(\d{8})$")
_TMP_RE = re.compile(r"^\.tmp-v(\d{8})-")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024


def looks_like_version_dir(path: str) -> bool:
    """Whether ``path`` is named as a bus version directory (published ``v00000012`` or staged
    ``.tmp-v00000012-...``): such a directory must carry its manifest to be loaded."""
    name = os.path.basename(os.path.normpath(path))
    name = name[len(".tmp-"):] if name.startswith(".tmp-") else name
    return len(name) >= 9 and name[0] == "v" and name[1:9].isdigit() and (len(name) == 9 or name[9] == "-")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_pool(threads: Optional[int] = None) -> ThreadPoolExecutor:
    """The thread pool that hashes tensors (default: one thread per CPU, at most 8)."""
    return ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1),
                              thread_name_prefix="bus-hash")


class PartWriter(ShardWriter):
    """A :class:`ShardWriter` whose ``close`` also records its entries in ``part-<prefix>.json``."""

    def close(self):
        entries, files = super().close()
        write_json_atomic(os.path.join(self.directory, f"part-{self.prefix}.json"),
                          {"checksum": self.checksum, "tensors": {n: vars(e) for n, e in entries.items()},
                           "files": files}, self.fsync)
        return entries, files


class DiskBus:
    """Versioned weight directories under ``root``; ``keep`` newest versions survive collection.

    ``fsync`` flushes every file and directory to stable storage before the rename (durability
    across a *host* crash). Without it a process crash still never exposes a partial version (the
    rename is the commit), and a version torn by a host crash fails its checksums when read;
    a resumed run rewinds the bus anyway. Shared filesystems make fsync expensive, so it is off
    by default (``bus.fsync``).

    ``checksum`` is the digest algorithm written into new manifests (``xxh3_128`` or ``sha256``,
    ``bus.checksum``); reading and verifying always use the algorithm a manifest names.
    """

    def __init__(self, root: str, keep: int = 3, *, fsync: bool = False, hash_threads: Optional[int] = None,
                 checksum: str = DEFAULT_CHECKSUM):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the version the engines run), got {keep}")
        self.root, self.keep, self.fsync = os.path.abspath(root), keep, fsync
        self.hash_threads = hash_threads
        self.checksum = check_checksum(checksum)
        os.makedirs(self.root, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------
    def versions(self) -> List[int]:
        """Published versions, oldest first (temporary directories are never listed)."""
        out = []
        for name in os.listdir(self.root):
            m = _VERSION_RE.match(name)
            if m and os.path.isfile(os.path.join(self.root, name, MANIFEST)):
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> Optional[int]:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: int) -> str:
        return os.path.join(self.root, version_dirname(version))

    # -- writing -------------------------------------------------------------------------------
    def check_newer(self, version: int) -> None:
        latest = self.latest()
        if latest is not None and int(version) <= latest:
            raise VersionError(f"version {version} is not newer than the latest published version {latest} "
                               f"in {self.root}: versions must increase")

    def stage(self, version: int) -> str:
        """A fresh temporary directory for ``version`` (refused unless newer than the latest).

        Versions beyond the ``keep - 1`` newest (never the latest) are removed first, so that with the
        one being written at most ``max(keep, 2)`` versions are on disk, not ``keep + 1``."""
        self.check_newer(version)
        self.gc(max(self.keep - 1, 1))
        staged = os.path.join(self.root, f".tmp-{version_dirname(version)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(staged)
        return staged

    def writer(self, staged: str, part: str = "pp0", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               pool: Optional[Executor] = None, background: bool = True) -> PartWriter:
        """Shard writer of one writer process; files are named ``model-<part>-NNNNN.safetensors``.
        Full buckets are written on a writer thread while the caller fills the next one."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", part):
            raise ValueError(f"part name {part!r} must be alphanumeric")
        return PartWriter(staged, f"model-{part}", bucket_bytes, pool=pool, fsync=self.fsync,
                          checksum=self.checksum, background=background)

    def finalize(self, staged: str, version: int, *, config: Optional[Dict[str, Any]] = None,
                 tokenizer_dir: Optional[str] = None, precision: Optional[str] = None,
                 quantization: Optional[Dict[str, Any]] = None, verify_first: bool = False,
                 parts: Optional[Sequence[str]] = None) -> Manifest:
        """Merge the parts, write index, config and manifest, and rename into place (atomic).

        ``parts`` names the writers that must have finished (``["pp0", "pp1", ...]``: one per
        pipeline stage); each one's ``part-model-<name>.json`` is opened by name, so a stale
        directory listing on a shared filesystem cannot publish a version with a stage missing.
        Without it every ``part-*.json`` found is merged (one-process publishing).
        ``verify_first`` re-reads every shard and checks it against the manifest before the
        rename (what a reader on a shared filesystem will see), so a bad write is never published;
        a pipeline-parallel publisher verifies each stage's part in its writer instead
        (:func:`verify_part`, all stages in parallel).
        """
        manifest = Manifest(version=int(version), precision=precision, quantization=quantization,
                            checksum=self.checksum)
        parts = self._part_files(staged, parts)
        for part in parts:
            _merge_part(manifest, part)
        for fname, meta in manifest.files.items():
            size = os.path.getsize(os.path.join(staged, fname))
            if size != meta["bytes"]:
                raise BusError(f"{fname}: {size} bytes on disk, the writer reported {meta['bytes']}")
        weight_map = {n: e.file for n, e in sorted(manifest.tensors.items())}
        write_json_atomic(os.path.join(staged, INDEX),
                          {"metadata": {"total_size": manifest.total_bytes}, "weight_map": weight_map}, self.fsync)
        if config is not None:
            write_json_atomic(os.path.join(staged, "config.json"), config, self.fsync)
        if tokenizer_dir:
            _copy_tokenizer(tokenizer_dir, staged)
        write_json_atomic(os.path.join(staged, MANIFEST), manifest.to_json(), self.fsync)
        for part in parts:
            os.remove(part)
        if verify_first:
            verify(staged)
        if self.fsync:
            _fsync_dir(staged)
        self.check_newer(version)  # another publisher may have won meanwhile
        os.rename(staged, self.path(version))  # the commit point
        if self.fsync:
            _fsync_dir(self.root)
        logger.info("bus: published version %d (%d tensors, %.1f MB) in %s", version, len(manifest.tensors),
                    manifest.total_bytes / 1e6, self.path(version))
        self.gc()
        return manifest

    @staticmethod
    def _part_files(staged: str, names: Optional[Sequence[str]]) -> List[str]:
        if names is None:
            found = sorted(glob.glob(os.path.join(staged, "part-*.json")))
            if not found:
                raise BusError(f"{staged}: no writer finished (no part-*.json)")
            return found
        if not names:
            raise BusError(f"{staged}: finalize needs at least one part")
        files = [os.path.join(staged, f"part-model-{n}.json") for n in names]
        missing = [n for n, f in zip(names, files, strict=True) if not os.path.isfile(f)]
        if missing:
            raise BusError(f"{staged}: the part of {', '.join(missing)} is missing (no "
                           f"{', '.join(f'part-model-{n}.json' for n in missing)}): refusing to publish a "
                           f"version without every stage's weights")
        return files

    def remove_stale(self) -> List[str]:
        """Remove every ``.tmp-*`` directory: a publication that crashed in an earlier run. Call it
        once at the start of a run, before this run stages anything (one publisher per bus)."""
        stale = [n for n in os.listdir(self.root) if _TMP_RE.match(n)]
        for name in stale:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if stale:
            logger.warning("bus: removed %d unfinished publication(s) of an earlier run: %s", len(stale), stale)
        return stale

    def abort(self, staged: str) -> None:
        """Remove a staged directory after a failed publication (best effort)."""
        shutil.rmtree(staged, ignore_errors=True)

    def publish(self, version: int, named_tensors: Iterable[Tuple[str, torch.Tensor]], *,
                config: Optional[Dict[str, Any]] = None, tokenizer_dir: Optional[str] = None,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, precision: Optional[str] = None,
                quantization: Optional[Dict[str, Any]] = None) -> Manifest:
        """Everything in one process: stage, stream ``named_tensors`` into shards, finalize."""
        staged = self.stage(version)
        try:
            with hash_pool(self.hash_threads) as pool:
                w = self.writer(staged, "pp0", bucket_bytes, pool)
                for name, t in named_tensors:
                    w.add(name, t)
                w.close()
            return self.finalize(staged, version, config=config, tokenizer_dir=tokenizer_dir,
                                 precision=precision, quantization=quantization)
        except BaseException:
            self.abort(staged)
            raise

    def rewind(self, version: int) -> List[int]:
        """Remove versions >= ``version`` (a run resumed from the checkpoint of ``version`` redoes them)."""
        doomed = [v for v in self.versions() if v >= int(version)]
        for v in doomed:
            shutil.rmtree(self.path(v), ignore_errors=True)
        if doomed:
            logger.warning("bus: rewound to before version %d: removed %s", version, doomed)
        return doomed

    def gc(self, keep: Optional[int] = None) -> List[int]:
        """Remove all but the ``keep`` (default: ``self.keep``) newest versions, and dead temporary
        directories."""
        keep = max(1, self.keep if keep is None else keep)
        versions = self.versions()
        doomed = versions[:-keep] if len(versions) > keep else []
        for v in doomed:
            shutil.rmtree(self.path(v), ignore_errors=True)
        latest = versions[-1] if versions else -1
        for name in os.listdir(self.root):
            m = _TMP_RE.match(name)
            if m and int(m.group(1)) <= latest:  # a crashed or superseded attempt
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if doomed:
            logger.info("bus: removed versions %s (keeping %d)", doomed, keep)
        return doomed


def iter_verified_files(version_dir: str, manifest: Optional[Manifest] = None,
                        pool: Optional[Executor] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Load the version's shards one file at a time, each checked against the manifest."""
    from safetensors.torch import load_file

    manifest = manifest or read_manifest(version_dir)
    by_file: Dict[str, List[str]] = {}
    for name, e in manifest.tensors.items():
        by_file.setdefault(e.file, []).append(name)
    for fname in sorted(by_file):
        path = os.path.join(version_dir, fname)
        try:
            tensors = load_file(path)
        except FileNotFoundError:
            raise ChecksumError(by_file[fname][0], f"its file {fname} is missing") from None
        except Exception as e:  # a truncated or garbled header
            raise ChecksumError(by_file[fname][0], f"its file {fname} is unreadable: {e}") from None
        for name in by_file[fname]:
            if name not in tensors:
                raise ChecksumError(name, f"missing from {fname}")
        extra = sorted(set(tensors) - set(by_file[fname]))
        if extra:
            raise ChecksumError(extra[0], f"in {fname} but not in the manifest")
        manifest.check_tensors(tensors, pool)
        yield tensors


def verify_part(staged: str, entries: Dict[str, TensorEntry], checksum: str,
                pool: Optional[Executor] = None) -> None:
    """Re-read the shards of one writer (a pipeline stage) and check them against its entries.

    Every stage's writer verifies its own files right after writing them, in parallel with the
    other stages, instead of rank 0 re-reading the whole version in :meth:`DiskBus.finalize`."""
    part = Manifest(version=0, tensors=dict(entries), checksum=checksum)
    for _ in iter_verified_files(staged, part, pool):
        pass


def verify(version_dir: str, pool: Optional[Executor] = None) -> Manifest:
    """Check every tensor of a version directory against its manifest; raise naming the bad one."""
    manifest = read_manifest(version_dir)
    own = pool is None
    pool = pool or hash_pool()
    try:
        for _ in iter_verified_files(version_dir, manifest, pool):
            pass
    finally:
        if own:
            pool.shutdown()
    return manifest


def _merge_part(manifest: Manifest, part: str) -> None:
    """Add one writer's part manifest (``part-*.json``) to ``manifest``."""
    with open(part) as f:
        obj = json.load(f)
    if obj.get("checksum") != manifest.checksum:
        raise BusError(f"{os.path.basename(part)} was hashed with {obj.get('checksum')!r}, the manifest "
                       f"is {manifest.checksum!r}: every rank must use the same bus.checksum")
    for name, e in obj["tensors"].items():
        if name in manifest.tensors:
            raise BusError(f"tensor {name!r} written by two parts ({manifest.tensors[name].file}, {e['file']})")
        manifest.tensors[name] = TensorEntry(**e)
    manifest.files.update(obj["files"])


def _copy_tokenizer(tokenizer_dir: str, staged: str) -> None:
    for fname in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, fname)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(staged, fname))
