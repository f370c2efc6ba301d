"""A JSONL record of every trained GRPO group: its step, prompt and the weight versions behind it.

One line per group: ``{"step", "group_id", "prompt_index", "sample_versions", "version",
"issued_version"}`` (``version`` = the oldest weight version that produced any of its tokens,
``issued_version`` = the trainer's version when it was issued). It is what the staleness bound
and "a resumed run loses and repeats no sample" are checked against. A run that crashes after
logging a step but before checkpointing it trains that step again after the resume: the last
record of a step is the one that counts.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence, Tuple


class GroupLog:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, step: int, groups: Iterable[Tuple]) -> None:
        """``groups``: (group_id, prompt_index, sample_versions[, version, issued_version])."""
        with open(self.path, "a") as f:
            for g in groups:
                gid, pidx, versions = g[:3]
                ints = [int(v) for v in versions if _is_int(v)]
                version = g[3] if len(g) > 3 else (min(ints) if ints else None)
                issued = g[4] if len(g) > 4 else step
                f.write(json.dumps({"step": step, "group_id": gid, "prompt_index": pidx,
                                    "sample_versions": list(versions), "version": version,
                                    "issued_version": issued}) + "\n")


def _is_int(v) -> bool:
    try:
        int(v)
        return True
    except (TypeError, ValueError):
        return False


def read_group_log(path: str) -> dict:
    """{step: [records]}, the last occurrence of each step winning (see the module docstring)."""
    by_step: dict = {}
    order: Sequence = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            by_step.setdefault(r["step"], {})
            order = by_step[r["step"]]
            order[r["group_id"]] = r
    return {s: [g[k] for k in sorted(g)] for s, g in sorted(by_step.items())}
