"""The non-finite guard: how many steps in a row skipped their update, and when to give up."""

from __future__ import annotations

from typing import Dict, List


class NonFiniteGuard:
    """Counts consecutive steps whose updates were skipped (non-finite loss or gradient norm).

    ``run.max_nonfinite_steps`` in a row means training has diverged: the loop checkpoints and raises
    :meth:`error`. One finite step resets the count.
    """

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.consecutive = 0

    def update(self, per_update: List[Dict]) -> None:
        """Record one step from its mini-batch updates' metrics (``train/skipped_step``)."""
        skipped = any(m.get("train/skipped_step", 0) > 0 for m in per_update)
        self.consecutive = self.consecutive + 1 if skipped else 0

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_steps

    def error(self, checkpoint_dir: str) -> RuntimeError:
        return RuntimeError(f"{self.consecutive} consecutive non-finite losses (run.max_nonfinite_steps = "
                            f"{self.max_steps}); checkpoint saved in {checkpoint_dir}")
