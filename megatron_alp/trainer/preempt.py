"""Stopping the RL loop without losing progress: a stop signal, a lost rollout fleet, a failed reward.

The driver's rollout runs under :meth:`StopFlag.interruptible`: nothing is trained yet, so a stop
signal (or a stop requested on any rank before it) abandons it, rewinds the prompt stream and
the loop checkpoints the completed steps. A fleet with no live engine left
(:class:`rollout.fleet.FleetExhausted`) and a reward function failing under
``rollout.reward_on_error: stop`` end the same way, with a one-line error naming the cause.
The order is always: checkpoint, then stop the engines (``finally`` in ``train``), then exit
(143 = 128 + SIGTERM for a signal). docs/trainer.md "Preemption and faults".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from .setup import Preempted

logger = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """A stop signal ended the run after a checkpoint; the process exits with 128 + ``signum``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class RolloutFailure(RuntimeError):
    """The rollout cannot continue (no engine left, a failed reward); a checkpoint was written."""


@dataclass
class Abort:
    """Broadcast by the driver instead of a batch: why the step was not run."""

    kind: str  # "signal", "engine" or "reward"
    message: str
    signum: Optional[int] = None

    def error(self, step: int, ckpt: str) -> Exception:
        if self.kind == "signal":
            return TrainingStopped(self.signum or 15, f"stopped by signal {self.signum} before step {step + 1}; "
                                   f"checkpoint {ckpt}; resume with the same command")
        return RolloutFailure(f"{self.message} (step {step + 1} not run; checkpoint {ckpt})")


def rollout_or_abort(driver, stop, stopping: bool, step: int, version: int):
    """Rank 0: the step's ``(batch, metrics)``, or an :class:`Abort` (the prompt stream rewound)."""
    from rollout.fleet import FleetExhausted
    from rollout.generate import RewardError

    state = driver.state_dict()
    try:
        if stopping:
            raise Preempted(stop.signum)
        with stop.interruptible():
            return driver.rollout(step, version)
    except Preempted:
        abort = Abort("signal", "stop signal", stop.signum)
    except FleetExhausted as e:
        abort = Abort("engine", f"rollout engines lost: {e}")
    except RewardError as e:
        abort = Abort("reward", str(e))
    driver.load_state_dict(state)
    return abort
