"""Streaming HF safetensors I/O: read one tensor at a time, write size-bounded shards + index.

Reading goes through ``safetensors.safe_open`` (memory-mapped): a tensor is materialised only
when asked for, so the converter holds one layer's worth of HF tensors at a time. Writing buffers
tensors up to ``max_shard_bytes`` and then writes one ``.safetensors`` file; several writers (one per
pipeline stage) write under temporary names and :func:`finalize_shards` renames them to the
``model-0000k-of-0000n.safetensors`` scheme and writes ``model.safetensors.index.json``, which is
what transformers and SGLang load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Dict, Iterable, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files copied next to an exported model: tokenizer, chat template, generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def check_safetensors_file(path: str) -> None:
    """Refuse (ValueError naming the file) a safetensors file that is empty, has no parseable
    header, or is shorter than its header says (truncated copy). Reads the header only."""
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file ({size} bytes; empty or truncated)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{path}: truncated (its header alone needs {n + 8} bytes, the file has {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ValueError(f"{path}: truncated ({size} bytes, its header describes {need})")


class HFReader:
    """Tensors of an HF checkpoint directory, by name, read lazily from its safetensors files."""

    def __init__(self, hf_dir: str) -> None:
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of: Dict[str, str] = dict(json.load(f)["weight_map"])
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            from safetensors import safe_open

            check_safetensors_file(os.path.join(hf_dir, SINGLE))
            with safe_open(os.path.join(hf_dir, SINGLE), "pt") as f:
                self.file_of = {k: SINGLE for k in f.keys()}
        else:
            found = sorted(n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth")))
            raise FileNotFoundError(
                f"{hf_dir}: no {SINGLE} or {INDEX}" + (f" (found {found}: only safetensors checkpoints are "
                                                       f"read; re-save with save_pretrained(safe_serialization=True))"
                                                       if found else "")
            )
        self._handles: Dict[str, object] = {}
        for file in sorted(set(self.file_of.values())):
            check_safetensors_file(os.path.join(hf_dir, file))

    def names(self) -> List[str]:
        return list(self.file_of)

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            h = self._handles[file] = safe_open(os.path.join(self.dir, file), "pt")
        return h

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name}")
        return self._handle(self.file_of[name]).get_tensor(name)

    def shape(self, name: str) -> Tuple[int, ...]:
        """Shape from the file header only (no tensor data is read)."""
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def get_many(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        return {n: self.get(n) for n in names}

    def dtype(self) -> torch.dtype:
        """dtype of the checkpoint's floating-point tensors (that of the first one)."""
        for name in self.file_of:
            t = self._handle(self.file_of[name]).get_slice(name)
            dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
            if dt is not None:
                return dt
        raise ValueError(f"{self.dir}: no floating-point tensors")

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in set(self.file_of.values()))

    def close(self) -> None:
        self._handles.clear()


class ShardWriter:
    """Buffers (name, tensor) pairs and writes a safetensors file every ``max_shard_bytes``."""

    def __init__(self, out_dir: str, tag: str, max_shard_bytes: int) -> None:
        self.out_dir, self.tag, self.max_bytes = out_dir, tag, max_shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: List[Tuple[str, List[str], int]] = []  # (temporary file name, tensor names, bytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.detach().to("cpu").contiguous()
        self.buffered += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        file = f".tmp-{self.tag}-{len(self.files):05d}.safetensors"
        save_file(self.buffer, os.path.join(self.out_dir, file), metadata={"format": "pt"})
        self.files.append((file, list(self.buffer), self.buffered))
        self.buffer, self.buffered = {}, 0


def remove_stale_weights(out_dir: str, keep: Iterable[str] = ()) -> List[str]:
    """Delete the weight files this converter owns (``model.safetensors``, ``model-*-of-*.safetensors``
    and the index) from an earlier export in ``out_dir``, except ``keep``: transformers loads a
    ``model.safetensors`` in preference to an index, so a stale one would shadow the new shards."""
    import re

    removed = []
    for name in sorted(os.listdir(out_dir)):
        if name in keep:
            continue
        if name in (SINGLE, INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    if removed:
        logger.warning("removed the weight files of an earlier export from %s: %s", out_dir, ", ".join(removed))
    return removed


def finalize_shards(out_dir: str, files: List[Tuple[str, List[str], int]]) -> str:
    """Rename the writers' files (in the given order) to model-k-of-n and write the index, after
    removing an earlier export's weight files (:func:`remove_stale_weights`)."""
    n = len(files)
    remove_stale_weights(out_dir)
    weight_map, total = {}, 0
    for k, (tmp, names, nbytes) in enumerate(files, start=1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        weight_map.update({name: final for name in names})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path = os.path.join(out_dir, INDEX)
    with open(path, "w") as f:
        json.dump(index, f, indent=2)
    logger.info("wrote %d safetensors shard(s), %.3f GB, and %s in %s", n, total / 1e9, INDEX, out_dir)
    return path


def copy_tokenizer_files(src_dir: Optional[str], out_dir: str) -> List[str]:
    """Copy the tokenizer / generation files that exist in ``src_dir``; returns their names."""
    if not src_dir or not os.path.isdir(src_dir):
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied
