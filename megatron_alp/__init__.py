"""megatron-alp: a Megatron-Core RL training backend for ALP and DRPO."""

from .runtime import jit_fuser as _jit_fuser

__version__ = "0.1.0"

# Before anything imports Megatron-Core: its torch.compile'd fusions become plain functions where CUDA
# is absent (they are never called there), which keeps torch._dynamo out of CPU processes (2.4 s each).
_jit_fuser.install()
