"""Monitoring behind one small interface: ``log(metrics, step)`` and ``close()``.

One place decides who writes (:func:`make_monitor`: global rank 0, which receives the trainer's
reduced metrics from the last pipeline stage). Metric names are namespaced (``ratio/``,
``mismatch/``, ``alp/``, ``drpo/``, ``rollout/``, ``train/``, ``policy/``, ``perf/``). A value that
is a list (or a name ending in ``_hist``) becomes a TensorBoard histogram; everything else a scalar.
The terminal gets one line per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Optional

logger = logging.getLogger(__name__)

TERMINAL_KEYS = (
    ("reward", "rollout/reward_mean", "{:.3f}"),
    ("tools", "rollout/tool_calls_mean", "{:.2f}"),
    ("kl_k3", "mismatch/k3", "{:.2e}"),
    ("ratio_p99.9", "ratio/token_p99.9", "{:.3f}"),
    ("loss", "train/loss", "{:.4f}"),
    ("sigma", "alp/sigma_mean", "{:.3g}"),
    ("s", "perf/step_seconds", "{:.1f}"),
)


class Monitor:
    """No-op base: every rank but the writer holds one of these."""

    def log(self, metrics: Dict[str, object], step: int, terminal: bool = True) -> None:
        pass

    def text(self, tag: str, value: str, step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardMonitor(Monitor):
    def __init__(self, log_dir: str, log_interval: int = 1, histograms: bool = True,
                 samples_path: Optional[str] = None):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)
        self.log_interval = max(1, log_interval)
        self.histograms = histograms
        self.samples_path = samples_path  # logging.raw_samples: the histograms' values, unbucketed
        self._layout_written = False

    def log(self, metrics: Dict[str, object], step: int, terminal: bool = True) -> None:
        import numpy as np

        if not self._layout_written and any(k.startswith(("ratio/", "rollout/")) for k in metrics):
            # The custom-scalars layout, from the first training step's metric names (an eval at
            # the start logs eval/ only, before it).
            from .tb_layout import layout_for

            self.writer.add_custom_scalars(layout_for(
                k for k, v in metrics.items() if not isinstance(v, (list, tuple)) and not k.endswith("_hist")))
            self._layout_written = True
        if self.samples_path:
            self._write_samples(metrics, step)

        for name, value in sorted(metrics.items()):
            if isinstance(value, (list, tuple)) or name.endswith("_hist"):
                if self.histograms and len(value):
                    arr = np.asarray(value, dtype=np.float64)
                    arr = arr[np.isfinite(arr)]
                    if arr.size:
                        self.writer.add_histogram(name, arr, step)
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            self.writer.add_scalar(name, v, step)
        self.writer.flush()
        if terminal and step % self.log_interval == 0:
            logger.info(terminal_line(metrics, step))

    def _write_samples(self, metrics: Dict[str, object], step: int) -> None:
        """One JSON line per step: every histogram metric's finite values as logged (TensorBoard keeps
        only bucket counts), so statistics pooled over steps and runs can be computed exactly."""
        rows = {}
        for name, value in metrics.items():
            if isinstance(value, (list, tuple)) or name.endswith("_hist"):
                vals = [float(x) for x in value]
                rows[name] = [x for x in vals if math.isfinite(x)]
        if rows:
            with open(self.samples_path, "a") as f:
                f.write(json.dumps({"step": step, **rows}) + "\n")

    def text(self, tag: str, value: str, step: int = 0) -> None:
        self.writer.add_text(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def terminal_line(metrics: Dict[str, object], step: int) -> str:
    parts = [f"step {step:>5d}"]
    for label, key, fmt in TERMINAL_KEYS:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append(f"{label} " + fmt.format(v))
    return "  ".join(parts)


def make_monitor(cfg, run_dir: str, rank: int) -> Monitor:
    """The writer on global rank 0 (when TensorBoard is on), a no-op elsewhere."""
    if rank != 0 or not cfg.logging.tensorboard:
        return Monitor()
    samples = os.path.join(run_dir, "hist_samples.jsonl") if cfg.logging.raw_samples else None
    mon = TensorBoardMonitor(os.path.join(run_dir, "tensorboard"), cfg.logging.log_interval, cfg.logging.histograms,
                             samples)
    return mon


def tensorboard_hint(run_dir: Optional[str]) -> str:
    return f"tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}" if run_dir else ""
