"""What a command-line entry point says to its user (a report, a result path, a one-line refusal),
through logging like the rest of the library rather than ``print``.

``command_logger(name)`` returns the logger ``megatron_alp.cli.<name>``: bare ``%(message)s`` lines,
records below WARNING on stdout (the command's output, which scripts read) and WARNING and above on
stderr (its refusals), not propagated to the root logger, whose format (timestamps, logger names)
and level belong to the library's diagnostics. The streams are looked up when it is called, so a
caller (or a test) that swapped ``sys.stdout`` gets the output there; calling it again in the same
process (a test running ``main()`` twice) replaces the handlers instead of doubling every line.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["command_logger"]


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def command_logger(name: str) -> logging.Logger:
    log = logging.getLogger(f"megatron_alp.cli.{name}")
    log.propagate = False
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    return log
