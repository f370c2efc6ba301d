"""Benchmark evaluation between RL steps (``eval.*``), on the driver's engines (global rank 0).

The same code as ``tools/eval.py`` (rollout/eval/): after the weights of version ``v`` are
committed to the fleet, ``n`` samples per problem are generated with the training chat template,
stop tokens, tool loop and reward function, scored, and logged as ``eval/<benchmark>/avg@n`` and
``eval/<benchmark>/pass@k`` at TensorBoard step ``v`` (the number of completed RL steps; 0 is
the starting model), with one terminal line and the tables under ``<run>/eval/step_<v>/``. The
other ranks wait at the next step's batch broadcast meanwhile.
"""

from __future__ import annotations

import logging
import os
from typing import Dict

from rollout.eval.config import EvalConfig

logger = logging.getLogger(__name__)


class Evaluator:
    """Runs the ``eval`` section on the driver's fleet when :meth:`due`."""

    def __init__(self, ev: EvalConfig, rollout, driver, monitor, run_dir: str):
        self.ev, self.rollout, self.driver, self.monitor = ev, rollout, driver, monitor
        self.out_dir = os.path.join(run_dir, "eval")
        if (ev.interval or ev.at_start) and not ev.datasets:
            logger.warning("eval.interval / eval.at_start are set but eval.datasets is empty: no evaluation")

    def due(self, done_steps: int, total_steps: int) -> bool:
        """Evaluate after ``done_steps`` completed steps? (0 = before training.)"""
        ev = self.ev
        if not ev.datasets:
            return False
        if done_steps == 0:
            return ev.at_start
        if done_steps == total_steps and ev.final:
            return True
        return ev.interval > 0 and done_steps % ev.interval == 0

    def run(self, done_steps: int) -> Dict[str, float]:
        from rollout.aio import run_sync
        from rollout.eval.runner import evaluate, scalars, summary_line, write_report

        gen = self.driver.generator
        runs = run_sync(evaluate(self.driver.fleet, self.driver.tokenizer, self.rollout, self.ev,
                                 reward_fn=gen.reward_fn, sandbox=gen.sandbox))
        write_report(runs, os.path.join(self.out_dir, f"step_{done_steps:06d}"),
                     title=f"Evaluation after {done_steps} RL steps", threshold=self.ev.correct_threshold)
        metrics = scalars(runs)
        self.monitor.log(metrics, done_steps, terminal=False)
        logger.info("step %5d  %s", done_steps, summary_line(runs))
        return metrics

    def maybe_run(self, done_steps: int, total_steps: int) -> Dict[str, float]:
        return self.run(done_steps) if self.due(done_steps, total_steps) else {}
