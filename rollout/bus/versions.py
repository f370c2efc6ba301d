"""Weight versions: integers on the bus, strings on the wire (SGLang's ``weight_version``).

Version ``v`` is the policy after ``v`` optimizer steps of publication (the trainer publishes
``0`` for the initial weights). Every sample records the version that generated it
(``Sample.weight_version``, from ``meta_info.weight_version``); its *staleness* is how many
versions the trainer has moved on since: ``trainer_version - sample_version``.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

Version = Union[int, str, None]


def version_dirname(version: int) -> str:
    """The directory of a disk-bus version: ``v00000007``."""
    if int(version) < 0:
        from .manifest import VersionError

        raise VersionError(f"versions are non-negative integers, got {version}")
    return f"v{int(version):08d}"


def parse_version(v: Version) -> Optional[int]:
    """The integer of a bus version ("7" -> 7); None for non-bus versions ("default", None)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    s = str(v).strip()
    return int(s) if s.isdigit() else None


def is_older(candidate: Version, current: Version) -> bool:
    """True when both are bus versions and ``candidate`` < ``current`` (an update going back)."""
    c, cur = parse_version(candidate), parse_version(current)
    return c is not None and cur is not None and c < cur


def staleness(trainer_version: Version, sample_version: Version) -> Optional[int]:
    """``trainer_version - sample_version`` (None when either is not a bus version)."""
    t, s = parse_version(trainer_version), parse_version(sample_version)
    return None if t is None or s is None else t - s


def staleness_stats(trainer_version: Version, sample_versions: Iterable[Version]) -> Dict[str, float]:
    """``rollout/staleness_{mean,max,min}`` and the count of samples with an unknown version."""
    vals, unknown = [], 0
    for v in sample_versions:
        s = staleness(trainer_version, v)
        if s is None:
            unknown += 1
        else:
            vals.append(s)
    out: Dict[str, float] = {"rollout/staleness_unknown": float(unknown)}
    if vals:
        out.update({"rollout/staleness_mean": sum(vals) / len(vals), "rollout/staleness_max": float(max(vals)),
                    "rollout/staleness_min": float(min(vals))})
    return out
