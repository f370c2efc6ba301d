"""The RL loop's use of the checkpoint bus (docs/bus.md): the only way weights reach the engines.

Version v = the number of completed RL steps. Before the engines start, the current weights are
published as the starting version and (disk backend) the engines are launched on that version's
directory, so the engines and the trainer agree from the first sample (FP8 engines must start on
a directory that declares the block-FP8 format). The nccl/tensor backends launch the engines on
the HF checkpoint and, after a resume, push the resumed weights before the first rollout.
"""

from __future__ import annotations

import logging
from typing import Dict, List

logger = logging.getLogger(__name__)


class CommitFailed(RuntimeError):
    """No engine (or not every engine, per ``bus.on_engine_failure``) took a published version."""

    def __init__(self, version: int, reason: str):
        super().__init__(f"rollout engines lost while committing weight version {version}: {reason}")
        self.version = version


def update_pause_mode(rollout) -> str:
    """How the fleet pauses generation for an update: synchronous rollout has nothing in flight
    (abort); asynchronous rollout follows ``rollout.span_policy`` (rollout/producer.py)."""
    from rollout.producer import SPAN_POLICIES

    return SPAN_POLICIES[rollout.span_policy] if rollout.max_staleness > 0 else "abort"


class WeightSync:
    """``bus``, ``rollout``, ``model_cfg``: the config sections; ``model_chunks``: what is published."""

    def __init__(self, bus, rollout, model_cfg, model_chunks: List, rank: int):
        from .publish import Publisher

        self.backend = bus.backend
        self.attached = bool(rollout.urls)  # engines already running: they must be sent the weights
        self.hf_path = model_cfg.hf_path
        self.chunks = model_chunks
        self.rank = rank
        self.publisher = Publisher(bus, model_cfg, precision=rollout.precision, tokenizer_dir=model_cfg.hf_path,
                                   pause_mode=update_pause_mode(rollout))
        self.fleet = None
        self._pending_push = False
        self._commit_initial = False
        self._initial_pub = None
        self._resume_version = 0
        self.engine_start_version = None
        """The bus version launched engines start on (disk backend), which they must report;
        None: they start on the HF checkpoint and report ``rollout.weight_version``."""

    def initial(self, version: int, resumed: bool) -> str:
        """Collective: publish the starting weights; returns the path engines start from (rank 0)."""
        self._resume_version = version
        if self.backend == "disk":
            pre = None if resumed else self.publisher.prepublished_v0()  # the launcher wrote it (FP8 engines)
            self._initial_pub = pre or self.publisher.publish(version, self.chunks, rewind=resumed)
            self._commit_initial = self.attached
            self.engine_start_version = version  # they start on this version's directory
            return self._initial_pub.path
        self._pending_push = resumed or self.attached
        return self.hf_path

    def attach(self, driver) -> None:
        """Collective: hand over the fleet (rank 0); push resumed weights on streaming backends."""
        self.fleet = driver.fleet if driver is not None else None
        if self._commit_initial and self.rank == 0:
            # Attached engines run whatever they were started with: commit the starting version.
            self._commit_initial = False
            self.publisher.commit(self.fleet, self._initial_pub)
        if self._pending_push:
            self._pending_push = False
            self.publish_and_commit(self._resume_version)

    def publish_and_commit(self, version: int) -> Dict[str, float]:
        """Collective: export + publish ``version`` on every rank; commit it to the fleet on rank 0."""
        import torch.distributed as dist

        from rollout.bus.commit import CommitError

        pub = self.publisher.publish(version, self.chunks, fleet=self.fleet if self.rank == 0 else None)
        metrics: Dict[str, float] = {}
        failed = None
        if self.rank == 0:
            try:
                report = self.publisher.commit(self.fleet, pub)
                metrics.update(pub.metrics())
                metrics.update(report.metrics())
                if report.dropped:
                    logger.error("engines dropped while committing version %d: %s", version, report.dropped)
            except CommitError as e:  # every rank must learn it, or the others wait in the next collective
                failed = str(e)
        box = [failed]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise CommitFailed(version, box[0])
        return metrics

    def close(self) -> None:
        self.publisher.close()
