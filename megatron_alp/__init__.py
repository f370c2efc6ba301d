"""megatron-alp: a Megatron-Core RL training backend for ALP and DRPO."""

__version__ = "0.1.0"
