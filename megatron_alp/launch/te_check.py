"""Run on every trainer node before an FP8-training job starts (the supervisor's ``te-check`` step):

    python -m megatron_alp.launch.te_check RECIPE      # delayed | tensorwise | blockwise

Exits 0 when Transformer Engine imports and this node's GPUs support the recipe, else 1 with the
reason (TE's own ``check_fp8_support`` / ``check_fp8_block_scaling_support``: blockwise scaling needs
Hopper (sm_90) or newer and a TE that has it). The dry run on a login node cannot see the trainer
nodes' GPUs or image; this step does, before engines and trainer are started.
"""

from __future__ import annotations

import socket
import sys

from ..runtime.command_output import command_logger

CHECKS = {"delayed": "check_fp8_support", "tensorwise": "check_fp8_support",
          "blockwise": "check_fp8_block_scaling_support"}


def check(recipe: str) -> str:
    """'' when supported, else why not."""
    if recipe not in CHECKS:
        return f"precision.fp8_recipe = {recipe!r} is not one of {sorted(CHECKS)}"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible"
        from transformer_engine.pytorch import fp8
    except ImportError as e:
        return f"Transformer Engine is not importable: {e}"
    fn = getattr(fp8, CHECKS[recipe], None)
    if fn is None:
        return f"this Transformer Engine has no {CHECKS[recipe]} (too old for the {recipe} recipe)"
    ok, reason = fn()
    return "" if ok else f"the {recipe} recipe is not supported here: {reason}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    why = check(argv[0] if argv else "")
    node = socket.gethostname()
    command_logger("te_check").info("%s: FP8 training (%s): %s", node, argv[0] if argv else "?",
                                    why or "supported")  # the step's output, in its log
    return 1 if why else 0


if __name__ == "__main__":
    raise SystemExit(main())
