"""The RL loop's use of the checkpoint bus (docs/bus.md): the only way weights reach the engines.

Version v = the number of completed RL steps. Before the engines start, the current weights are
published as the starting version and (disk backend) the engines are launched on that version's
directory, so the engines and the trainer agree from the first sample (FP8 engines must start on
a directory that declares the block-FP8 format). The nccl/tensor backends launch the engines on
the HF checkpoint and, after a resume, push the resumed weights before the first rollout.
"""

from __future__ import annotations

import logging
from typing import Dict

logger = logging.getLogger(__name__)


class WeightSync:
    def __init__(self, cfg, trainer, rank: int):
        from .publish import make_publisher

        self.cfg = cfg
        self.trainer = trainer
        self.rank = rank
        self.publisher = make_publisher(cfg)
        self.fleet = None
        self._pending_push = False
        self._commit_initial = False
        self._initial_pub = None
        self._resume_version = 0

    def initial(self, version: int, resumed: bool) -> str:
        """Collective: publish the starting weights; returns the path engines start from (rank 0)."""
        self._resume_version = version
        attached = bool(self.cfg.rollout.urls)  # engines already running: they must be sent the weights
        if self.cfg.bus.backend == "disk":
            pre = None if resumed else self.publisher.prepublished_v0()  # the launcher wrote it (FP8 engines)
            self._initial_pub = pre or self.publisher.publish(version, [self.trainer.ddp], rewind=resumed)
            self._commit_initial = attached
            return self._initial_pub.path
        self._pending_push = resumed or attached
        return self.cfg.model.hf_path

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
        pub = self.publisher.publish(version, [self.trainer.ddp], fleet=self.fleet if self.rank == 0 else None)
        metrics: Dict[str, float] = {}
        if self.rank == 0:
            report = self.publisher.commit(self.fleet, pub)
            metrics.update(pub.metrics())
            metrics.update(report.metrics())
            if report.dropped:
                logger.error("engines dropped while committing version %d: %s", version, report.dropped)
        return metrics

    def close(self) -> None:
        self.publisher.close()
