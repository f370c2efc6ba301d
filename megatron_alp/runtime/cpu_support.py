"""Megatron-Core on a CPU (gloo): every CUDA assumption we work around, in one place.

Applied by :func:`apply_cpu_support` only when CUDA is unavailable (``init_distributed`` calls it);
on a GPU nothing here runs. Each item below names what Megatron-Core 0.16 does and why we change
it (the list is PLATFORM.md's "Megatron-Core on a CPU"). Nothing in Megatron's source is edited:
we replace a few module-level names at import time, idempotently.
"""

from __future__ import annotations

import importlib
import logging
import types

import torch

logger = logging.getLogger(__name__)

_APPLIED = False


class _CpuTorch(types.ModuleType):
    """A stand-in for the ``torch`` name inside one Megatron module.

    It forwards everything to torch, except that tensor factories called with a literal
    ``device="cuda"`` allocate on the CPU. Only the modules listed in ``_CUDA_LITERAL_MODULES``
    see it; the rest of the process uses the real torch.
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args, __f=attr, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and str(dev).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return __f(*args, **kwargs)

            return factory
        return attr


# Item 2: modules that allocate with a literal device="cuda".
_CUDA_LITERAL_MODULES = (
    # get_default_causal_mask / get_sliding_window_causal_mask build the causal mask on "cuda"
    # when no attention mask is passed.
    "megatron.core.transformer.utils",
    # forward_backward_no_pipelining / _with_interleaving / _without_interleaving keep a token
    # counter in torch.zeros(..., device="cuda").
    "megatron.core.pipeline_parallel.schedules",
    # The plain (non-distributed) optimizers keep found_inf / scale scalars on "cuda".
    "megatron.core.optimizer.optimizer",
    # get_grad_norm_fp32 (always called by ChainedOptimizer.step for its return value) keeps its
    # overflow buffer and norm on "cuda".
    "megatron.core.optimizer.clip_grads",
    # ... through the Apex-less fallback local_multi_tensor_l2_norm, which returns its norm on "cuda".
    "megatron.core.utils",
)


def _cpu_device_index():
    return torch.device("cpu")


def apply_cpu_support() -> None:
    """Make Megatron-Core 0.16 run on CPU tensors over gloo. Idempotent; no-op with CUDA."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return

    # Item 1: torch.cuda.current_device() picks the allocation device in the rotary embedding,
    # the tensor-parallel layers and mappings, attention and the schedules
    # (``torch.empty(..., device=torch.cuda.current_device())``). Without CUDA it raises; it must
    # resolve to the CPU.
    torch.cuda.current_device = _cpu_device_index  # type: ignore[assignment]

    # Item 2: literal device="cuda" allocations (see _CUDA_LITERAL_MODULES).
    cpu_torch = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        mod.torch = cpu_torch  # type: ignore[attr-defined]

    # Item 3: p2p_communication calls torch.cuda.synchronize() after batched isend/irecv (a guard
    # against a CUDA-stream race). gloo ops are synchronous once waited on: a no-op is exact.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    # Item 4: the CUDA RNG tracker. Attention dropout runs inside get_cuda_rng_tracker().fork(),
    # and activation recomputation (CheckpointFunction) saves/restores the CUDA generator state.
    # We install a CPU tracker with the same interface and make the CUDA-state helpers no-ops
    # (the CPU generator state is saved/restored by CheckpointFunction itself).
    from megatron.core.tensor_parallel import random as mrandom

    from .rng import CpuRNGStatesTracker

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None

    # Item 7 (found here, not in PLATFORM.md's list): with tied embeddings and PP > 1,
    # LanguageModule.setup_embeddings_and_output_layer moves the shared weight with
    # ``weight.data.cuda()`` before all-reducing it between the first and last stage. In a process
    # without CUDA every tensor lives on the CPU, so ``Tensor.cuda`` becomes the identity.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

    # Item 5: DistributedOptimizer refuses CPU parameters and clip_grad_by_total_norm_fp32 asserts
    # CUDA gradients. We do not patch these: on CPU the actor builds the plain optimizer
    # (use_distributed_optimizer=False, clip_grad=0.0) and clips with
    # megatron_alp.runtime.grad_clip.clip_grad_norm, a CPU-safe equivalent.

    # Item 6: dist_checkpointing's torch_dist save writes through FileSystemWriterAsync (a
    # multiprocessing Manager and forked writers, even with thread_count=1): it hangs on CPU and
    # fails inside daemonic workers. Checkpoint code passes :func:`sync_save_strategy` instead.

    _APPLIED = True
    logger.info("Megatron-Core CPU support applied (no CUDA): gloo, CPU RNG tracker, CPU allocations")


def sync_save_strategy():
    """A synchronous, in-process dist_checkpointing save strategy (item 6), same torch_dist files."""
    from .dcp_save import InProcessTorchDistSaveStrategy

    return InProcessTorchDistSaveStrategy()
