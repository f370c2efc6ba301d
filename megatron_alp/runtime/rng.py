"""Seeding helpers and a CPU RNG tracker with the interface of Megatron's CUDA tracker.

Megatron runs attention dropout (and TP-sharded weight init) inside
``get_cuda_rng_tracker().fork()``, which swaps the CUDA generator's state for a named one
("model-parallel-rng", different per TP rank). On a CPU there is no CUDA generator; the
:class:`CpuRNGStatesTracker` keeps named states of the CPU generator instead, so the same Megatron
code runs unchanged (PLATFORM.md, CPU item 4).
"""

from __future__ import annotations

import contextlib
import random
from typing import Dict

import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
DATA_PARALLEL_RNG = "data-parallel-rng"
EXPERT_PARALLEL_RNG = "expert-parallel-rng"


class CpuRNGStatesTracker:
    """Named CPU generator states; ``fork(name)`` runs a block with that state, then restores."""

    def __init__(self, *_, **__):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> Dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, where present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_parallel_seed(seed: int) -> None:
    """Megatron's ``model_parallel_cuda_manual_seed`` semantics, on GPU or CPU.

    The default generator gets ``seed`` (same on all TP ranks, so replicated tensors agree);
    the tracker's model-parallel state gets ``seed + 2718 + tp_rank`` (different per TP rank),
    as Megatron does.
    """
    from megatron.core import tensor_parallel

    if torch.cuda.is_available():
        # Python, NumPy and the CPU generator too: the CPU-side sampling (data order, ALP noise
        # seeds drawn on the host) must be reproducible on a GPU run as on a CPU one.
        seed_everything(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core import parallel_state as ps

    seed_everything(seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = ps.get_tensor_model_parallel_rank()
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)
    tracker.add(DATA_PARALLEL_RNG, seed)
    ep_rank = ps.get_expert_model_parallel_rank() if hasattr(ps, "get_expert_model_parallel_rank") else 0
    tracker.add(EXPERT_PARALLEL_RNG, seed + 2718 + 1024 + 100 * ep_rank + tp_rank)


def rng_state() -> dict:
    """Every RNG state this process uses (for checkpoints)."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
