"""The ALP perturbation: ``h <- h + sigma_l * xi_l`` with ``sigma_l = exp(log_sigma_l)`` learnable.

- Active only inside :func:`alp_forward` (the actor's policy-update forward, with the step and
  micro-batch index); everywhere else (rollout export, pi_old recomputation, the reference model,
  evaluation) the module is the identity.
- The noise is not stored: :class:`_AddScaledNoise` keeps only the integer key and regenerates
  xi in backward (counter-based noise, :mod:`.noise`), so ALP's activation memory is ~zero. The
  one exception is a small layer input (at most ``KEEP_NOISE_ELEMENTS``, 256 KiB of fp32): there
  generating the noise costs a fixed few dozen tensor operations whatever its size, which is what
  a small model's step is bound by, so the forward's noise is kept for backward (the same values).
- Activation recomputation: the ALP context (active, step, micro-batch) is kept as an entry of
  Megatron's RNG-tracker states. Megatron's ``CheckpointFunction`` saves those states at the first
  forward and restores them before recomputing, so a recomputed layer sees the context of its
  original forward (and thus the same key) even though backward runs after the actor's
  ``alp_forward`` block has exited.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch

from .noise import chunks, derive_key, global_rows, noise_like

logger = logging.getLogger(__name__)

CONTEXT_STATE = "alp-context"
TOKENS_STATE = "alp-token-codes"  # [b, s] token identities (noise.token_codes) of the micro-batch
# Noise generated at once: bounds the transient int32/fp32 buffers to ~4 MiB each (256 rows of a
# 4096-wide hidden state).
CHUNK_ELEMENTS = 1 << 20
# A layer's noise of at most this many elements (256 KiB in fp32) is kept from forward to backward
# instead of being generated again (see the module docstring).
KEEP_NOISE_ELEMENTS = 1 << 16


def _tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def _set_context(value: Optional[torch.Tensor], codes: Optional[torch.Tensor] = None) -> None:
    tracker = _tracker()
    states = tracker.get_states()
    for name, v in ((CONTEXT_STATE, value), (TOKENS_STATE, codes)):
        if v is None:
            states.pop(name, None)
        else:
            states[name] = v
    # set_states marks the tracker initialised; keep whatever it held before.
    tracker.set_states(states)


def current_context() -> Optional[tuple]:
    """(step, micro_batch) while the policy-update forward is active, else None."""
    state = _tracker().get_states().get(CONTEXT_STATE)
    if state is None or not bool(state[0]):
        return None
    return int(state[1]), int(state[2])


def current_token_codes() -> Optional[torch.Tensor]:
    """The micro-batch's token identities [b, s] when the noise is keyed per token, else None."""
    return _tracker().get_states().get(TOKENS_STATE) if current_context() is not None else None


@contextlib.contextmanager
def alp_forward(step: int, micro_batch: int, token_codes: Optional[torch.Tensor] = None):
    """Turn the perturbation on for the policy-update forward of (step, micro_batch).

    ``token_codes`` ([b, s] int64, :func:`.noise.token_codes`): key the noise of each token on its
    sample's identity and index (then neither the micro-batch nor the DP rank enters the key)."""
    states = _tracker().get_states()
    previous = (states.get(CONTEXT_STATE), states.get(TOKENS_STATE))
    _set_context(torch.tensor([1, int(step), int(micro_batch)], dtype=torch.int64), token_codes)
    try:
        yield
    finally:
        _set_context(*previous)


class _AddScaledNoise(torch.autograd.Function):
    """out = h + exp(log_sigma) * xi(key); xi regenerated in backward (kept only when small)."""

    @staticmethod
    def forward(ctx, h, log_sigma, key: int, rows: torch.Tensor, total_rows: int, codes=None):
        # fp32 arithmetic (fp64 when h is fp64, for gradcheck); the noise itself is fp32.
        acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        sigma = log_sigma.detach().to(acc_dtype).exp()
        out = torch.empty_like(h)
        ctx.xi = None
        for sl in chunks(h.shape[0], _rows_per_chunk(h)):
            xi = noise_like(h[sl], rows[sl], key, total_rows, None if codes is None else codes[sl])
            if h.numel() <= KEEP_NOISE_ELEMENTS:  # one chunk: kept for backward (module docstring)
                ctx.xi = xi
            torch.add(h[sl], xi.to(acc_dtype).mul(sigma).to(h.dtype), out=out[sl])
        ctx.key, ctx.total_rows, ctx.codes = key, total_rows, codes
        ctx.save_for_backward(log_sigma, rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        log_sigma, rows = ctx.saved_tensors
        grad_log_sigma = None
        if ctx.needs_input_grad[1]:
            acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            sigma = log_sigma.detach().to(acc_dtype).exp()
            acc = torch.zeros((), dtype=acc_dtype, device=grad_out.device)
            for sl in chunks(grad_out.shape[0], _rows_per_chunk(grad_out)):
                xi = ctx.xi
                if xi is None:
                    codes = None if ctx.codes is None else ctx.codes[sl]
                    xi = noise_like(grad_out[sl], rows[sl], ctx.key, ctx.total_rows, codes)
                acc += (grad_out[sl].to(acc_dtype) * xi.to(acc_dtype)).sum()
            # d out / d log_sigma = sigma * xi
            grad_log_sigma = (acc * sigma).to(log_sigma.dtype).reshape(log_sigma.shape)
        ctx.xi = None
        return grad_out, grad_log_sigma, None, None, None, None


def _rows_per_chunk(h: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, math.prod(h.shape[1:])))


class Perturbation(torch.nn.Module):
    """One learnable noise scale for one position in the network (a layer input, or the logits).

    ``index`` is the global position used in the noise key: the 0-based global layer number for a
    layer input, ``num_layers`` for the logits-only variant.
    """

    def __init__(self, config, alp, index: int):
        super().__init__()
        self.index = int(index)
        self.base_seed = int(alp.seed)
        self.sequence_parallel = bool(config.sequence_parallel)
        self.log_sigma = torch.nn.Parameter(
            torch.full((1,), math.log(alp.sigma_init), dtype=torch.float32), requires_grad=bool(alp.learnable)
        )
        p = self.log_sigma
        p.alp_sigma = True  # optimizer param group and export filter key on this attribute
        # Under SP each TP rank holds a slice of the sequence, so d loss / d log_sigma is a partial
        # sum: Megatron's finalize_model_grads all-reduces parameters marked like this over TP
        # (the layer-norm weights get the same mark). Without SP the gradient is already complete
        # and identical on every TP rank.
        p.sequence_parallel = self.sequence_parallel

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.detach().float().exp()

    def _apply(self, fn, *args, **kwargs):
        # Megatron's Float16Module casts every parameter to bf16/fp16; sigma stays fp32 (a 1e-6
        # sigma has log -13.8, which bf16 would round by up to 3%).
        keep = self.log_sigma.data.clone()
        out = super()._apply(fn, *args, **kwargs)
        self.log_sigma.data = keep.to(device=self.log_sigma.device, dtype=torch.float32)
        return out

    def key(self, step: int, micro_batch: int) -> int:
        from megatron.core import parallel_state as ps

        dp_rank = ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0
        return derive_key(self.base_seed, step, micro_batch, self.index, dp_rank)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ctx = current_context()
        if ctx is None:
            return h
        from megatron.core import parallel_state as ps

        step, micro_batch = ctx
        tp_rank, tp_size = 0, 1
        if self.sequence_parallel:
            tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        cp_rank, cp_size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
        rows = global_rows(h.shape[0], sp_rank=tp_rank, sp_size=tp_size, cp_rank=cp_rank, cp_size=cp_size,
                           device=h.device)
        total_rows = h.shape[0] * tp_size * cp_size
        codes = current_token_codes()
        if codes is not None:  # keyed per token: [b, s_global] -> this rank's rows, [s_local, b]
            codes = codes.to(h.device).t()[rows]
            return _AddScaledNoise.apply(h, self.log_sigma, derive_key(self.base_seed, step, self.index), rows,
                                         total_rows, codes)
        return _AddScaledNoise.apply(h, self.log_sigma, self.key(step, micro_batch), rows, total_rows)

    def extra_repr(self) -> str:
        return f"index={self.index}, sigma={self.sigma.item():.3g}, learnable={self.log_sigma.requires_grad}"
