"""The local engine's prefix cache: KV of recent prompts, reused by prompts that share a prefix.

A small stand-in for SGLang's radix cache, with its semantics where they matter to us:
- a new sequence reuses the KV of the longest cached prefix, at most ``len(seq) - 1`` tokens (the
  last token is always computed: its logits sample the next token) and, when the request wants
  prompt log-probs from ``logprob_start_len``, at most that many (cached positions have no logits;
  SGLang caps the match the same way);
- the hit is reported as ``meta_info.cached_tokens``;
- it is emptied only by a flush (``/flush_cache``, or a weight update with ``flush_cache: true``),
  and a flush only happens when no request is running (``Scheduler.flush_cache``). A weight update
  that does not flush leaves KV of the old weights in the cache, exactly as SGLang does: that is
  what the fleet's update sequence must prevent, and what ``stale_hits`` counts (hits on KV computed
  with other weights than the current ones), so tests can prove it never happens.

Entries are whole prompts (one per distinct prefilled sequence), evicted least-recently-used when
more than ``max_tokens`` are held; lookup is a linear scan (a CPU test double, not a radix tree).
"""

from __future__ import annotations

import collections
from typing import Any, List, Optional, Sequence, Tuple

import torch

KV = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [1, heads, len, dim]


class PrefixCache:
    def __init__(self, max_tokens: int = 1 << 16):
        self.max_tokens = max_tokens
        self._entries: "collections.OrderedDict[Tuple[int, ...], Tuple[KV, int]]" = collections.OrderedDict()
        self._tokens = 0
        self.stats = {"hits": 0, "hit_tokens": 0, "lookups": 0, "stale_hits": 0, "flushes": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq: Sequence[int]) -> bool:
        return tuple(seq) in self._entries

    def match(self, seq: Sequence[int], limit: int, epoch: int) -> Tuple[int, Optional[KV]]:
        """The longest cached prefix of ``seq`` of at most ``limit`` tokens: (length, KV sliced to it)."""
        self.stats["lookups"] += 1
        best, best_key = 0, None
        for key in self._entries:
            n = min(len(key), limit)
            if n <= best:
                continue
            m = _common(key, seq, n)
            if m > best:
                best, best_key = m, key
        if best_key is None:
            return 0, None
        kv, entry_epoch = self._entries[best_key]
        self._entries.move_to_end(best_key)
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += best
        if entry_epoch != epoch:
            self.stats["stale_hits"] += 1
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in kv]

    def insert(self, seq: Sequence[int], kv: KV, epoch: int) -> None:
        key = tuple(seq)
        if key in self._entries or len(key) > self.max_tokens:
            return
        self._entries[key] = ([(k.clone(), v.clone()) for k, v in kv], epoch)
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)

    def flush(self) -> None:
        self._entries.clear()
        self._tokens = 0
        self.stats["flushes"] += 1

    def epochs(self) -> List[Any]:
        return sorted({e for _, e in self._entries.values()})


def _common(a: Sequence[int], b: Sequence[int], n: int) -> int:
    n = min(n, len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
