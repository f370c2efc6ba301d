"""Vocab-parallel log-probability and entropy of sampled tokens (autograd.Function, hand-written backward).

RL needs, for every sampled token ``y_t``, ``log pi(y_t) = log_softmax(z / T)[y_t]`` (the numerator of
every importance ratio) and often the entropy ``H = -sum_j p_j log p_j`` of the same tempered
distribution, with gradients through both, while the logits ``z`` are split over the vocabulary
across tensor-parallel (TP) ranks. Megatron's ``vocab_parallel_cross_entropy`` gives the first
(negated) only, modifies fp32 logits in place and keeps an fp32 softmax alive until backward.

The max / sum-exp all-reduce pattern is the one of Megatron-Core's
``tensor_parallel/cross_entropy.py`` (credited; the code here is ours). What differs:

* **Single streaming pass per chunk.** Each rank reduces its shard against its *local* max
  (online-softmax style), then the per-token statistics are combined across ranks with two
  ``[tokens]``-sized all-reduces in total (MAX of the maxima, then one SUM of
  ``[sum-exp, sum p*x, target logit]`` rescaled to the global max), whatever the number of chunks.
  The full vocabulary is never gathered.
* **Nothing logits-sized is saved for backward.** Only per-token vectors (the max, the log-sum-exp,
  the entropy, the local target index) plus a reference to the caller's logits (no copy; autograd's
  version counter rejects in-place changes made to them before backward). Backward recomputes
  ``log p = (z - max) / T - log_z`` chunk by chunk; it needs no communication.
* **fp32 compute for any input dtype** (float64 stays float64, so ``gradcheck`` works). Work buffers
  are per chunk of tokens; at most two fp32 ``[chunk, V_shard]`` buffers are alive at once, and a
  chunk never exceeds ``N // buffers`` rows, so the working set never exceeds one fp32 shard-sized
  buffer (N = number of tokens, N >= 2). With fp32 logits the backward writes into the gradient
  buffer directly.

Gradients (s = z / T, p = softmax over the real vocabulary, t = sampled token):

    d logp_t / d z_j = (1[j = t] - p_j) / T
    d H / d z_j      = -p_j (log p_j + H) / T
      (H = -sum_k p_k log p_k; dp_k/ds_j = p_k (1[k=j] - p_j), so
       dH/ds_j = -sum_k p_k (1[k=j] - p_j)(log p_k + 1) = -p_j (log p_j + 1) + p_j (1 - H))

so with upstream gradients ``g`` (log-prob) and ``h`` (entropy):

    grad z_j = (g 1[j = t] - p_j (a + h log p_j)) / T,    a = g + h H.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["vocab_parallel_logprobs"]

# Automatic chunk size: bytes of one fp32 work buffer. On a CPU a chunk that stays in the cache
# makes the several passes per chunk nearly free (measured in bench/logprob.py); on a GPU large
# chunks keep the kernel count low.
_AUTO_CHUNK_BYTES_CPU = 1 << 19
_AUTO_CHUNK_BYTES_GPU = 1 << 28


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower floats; float64 stays float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(n_tokens: int, n_cols: int, chunk_size: Optional[int], n_buffers: int, device) -> int:
    """Rows of one chunk: the requested size (or an automatic one), capped so that ``n_buffers``
    work buffers of that many rows never exceed one shard-sized buffer."""
    if chunk_size is None:
        budget = _AUTO_CHUNK_BYTES_GPU if device.type == "cuda" else _AUTO_CHUNK_BYTES_CPU
        chunk_size = max(1, budget // (4 * max(1, n_cols)))
    cap = max(1, n_tokens // max(1, n_buffers))
    return max(1, min(chunk_size, cap, n_tokens))


def _group_info(tp_group) -> Tuple[int, int]:
    if tp_group is None:
        return 0, 1
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_logprobs: tp_group was given but torch.distributed is not initialised")
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _check_target(target: torch.Tensor, vocab_size: int, padded: int) -> None:
    """Raise a ValueError naming the first target id outside [0, vocab_size) (one host sync)."""
    if target.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo >= 0 and hi < vocab_size:
        return
    bad = (target < 0) | (target >= vocab_size)
    pos = tuple(int(i) for i in bad.nonzero()[0])
    value = int(target[pos])
    where = "a padding entry of the vocabulary" if vocab_size <= value < padded else "outside the vocabulary"
    raise ValueError(
        f"vocab_parallel_logprobs: target id {value} at position {pos} is {where}: ids must lie in "
        f"[0, vocab_size = {vocab_size}) (logits have {padded} entries over all TP ranks); "
        f"{int(bad.sum())} of {target.numel()} ids are out of range"
    )


def _shard_sums(zr: torch.Tensor, chunk_size: Optional[int], inv_t: float, m_loc: torch.Tensor,
                sum_exp: torch.Tensor, sum_px: Optional[torch.Tensor]) -> None:
    """Fill, in place and chunk by chunk, this shard's per-token max ``m_loc`` (raw logit units),
    ``sum_exp`` = sum_j exp(x_j) and (when given) ``sum_px`` = sum_j exp(x_j) x_j, with
    x = (z - max) / T over the real columns ``zr`` [tokens, n_real]."""
    n, n_real = zr.shape
    cdt, dev, with_entropy = m_loc.dtype, zr.device, sum_px is not None
    rows = _rows_per_chunk(n, n_real, chunk_size, 2 if with_entropy else 1, dev)
    buf = torch.empty(rows, n_real, dtype=cdt, device=dev)
    ebuf = torch.empty(rows, n_real, dtype=cdt, device=dev) if with_entropy else None
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        zc, w = zr[i0:i1], buf[: i1 - i0]
        if zc.dtype != cdt:
            # Upcast with copy_ first: a mixed-dtype op would allocate a hidden converted
            # temporary per call, and the bf16 max is ~3x slower than the fp32 one on CPU.
            zc = w.copy_(zc)
        m = zc.amax(dim=1)
        m_loc[i0:i1] = m
        torch.sub(zc, m.unsqueeze(1), out=w)
        if inv_t != 1.0:
            w.mul_(inv_t)
        if with_entropy:
            e = ebuf[: i1 - i0]
            torch.exp(w, out=e)
            sum_exp[i0:i1] = e.sum(dim=1)
            # sum_j e_j x_j, in place in e (bmm / einsum were 10x slower on CPU for > 1 row).
            sum_px[i0:i1] = e.mul_(w).sum(dim=1)
        else:
            w.exp_()
            sum_exp[i0:i1] = w.sum(dim=1)


def _reduce_over_tp(m_loc, sum_exp, sum_px, z_tgt, on_shard, inv_t: float, tp_group):
    """(global max, sum_exp, x at the target, sum_px) over the TP group.

    Megatron's pattern (cross_entropy.py): all-reduce the max, then the sums. Here the sums were
    taken against the local max in one pass, so they are rescaled to the global max first, and
    everything goes in one SUM all-reduce of [3, tokens].
    """
    m_glob = m_loc.clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=tp_group)
    has = sum_exp > 0  # False on a shard that is all padding (m_loc = -inf)
    d = torch.where(has, (m_loc - m_glob) * inv_t, torch.zeros_like(m_loc))  # <= 0
    scale = torch.exp(d)
    parts = [sum_exp * scale, torch.where(on_shard, z_tgt - m_glob, z_tgt)]
    if sum_px is not None:
        # sum_j e^{x_j + d} (x_j + d) = scale * (sum_px + d * sum_exp) over this shard.
        parts.append(scale * (sum_px + d * sum_exp))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)
    return m_glob, stacked[0], stacked[1] * inv_t, (stacked[2] if sum_px is not None else None)


class _VocabParallelLogprob(torch.autograd.Function):
    """Forward: (logprob, entropy or None); backward: grad w.r.t. the logits shard."""

    @staticmethod
    def forward(ctx, logits, target, tp_group, temperature, with_entropy, vocab_size, chunk_size):
        rank, world = _group_info(tp_group)
        v_shard = logits.shape[-1]
        start = rank * v_shard
        n_real = max(0, min(v_shard, vocab_size - start))  # real (unpadded) columns on this rank
        cdt = _compute_dtype(logits.dtype)
        inv_t = 1.0 / temperature

        if not logits.is_contiguous():
            logger.debug("vocab_parallel_logprobs: non-contiguous logits %s are copied", tuple(logits.shape))
        z = logits.reshape(-1, v_shard)  # a view for contiguous logits (Megatron's [s, b, V/tp])
        tgt = target.reshape(-1).long()
        n = z.shape[0]
        dev = z.device

        # Local target index; rows whose target lies on another rank gather column 0 and are masked.
        t_loc = tgt - start
        on_shard = (t_loc >= 0) & (t_loc < n_real)
        t_idx = torch.where(on_shard, t_loc, torch.zeros_like(t_loc))

        # Per-token statistics of this shard. The max is in raw logit units (exact for any input
        # dtype); x = (z - max) / T is formed from the exact difference, so the error of log p
        # stays ~ ulp(|x|) like log_softmax's, not ~ ulp(|z| / T).
        m_loc = torch.full((n,), -math.inf, dtype=cdt, device=dev)  # max_j z_j (raw units)
        sum_exp = torch.zeros(n, dtype=cdt, device=dev)  # sum_j exp(x_j)
        sum_px = torch.zeros(n, dtype=cdt, device=dev) if with_entropy else None  # sum_j exp(x_j) x_j
        z_tgt = torch.zeros(n, dtype=cdt, device=dev)  # z at the target (0 off this shard)

        if n_real > 0 and n > 0:
            zr = z[:, :n_real]
            z_tgt = torch.where(on_shard, zr.gather(1, t_idx.unsqueeze(1)).squeeze(1).to(cdt), z_tgt)
            _shard_sums(zr, chunk_size, inv_t, m_loc, sum_exp, sum_px)

        if world > 1:
            m_glob, sum_exp, x_tgt, sum_px = _reduce_over_tp(m_loc, sum_exp, sum_px, z_tgt, on_shard, inv_t, tp_group)
        else:
            m_glob, x_tgt = m_loc, (z_tgt - m_loc) * inv_t

        log_z = torch.log(sum_exp)  # log-sum-exp minus the (scaled) max
        logprob = x_tgt - log_z
        entropy = (log_z - sum_px / sum_exp) if with_entropy else None

        ctx.save_for_backward(logits, t_idx, on_shard, m_glob, log_z, entropy if with_entropy else None)
        ctx.meta = (n_real, inv_t, chunk_size)
        ctx.set_materialize_grads(False)
        out_lp = logprob.view(target.shape)
        if with_entropy:
            return out_lp, entropy.view(target.shape)
        return out_lp, None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, t_idx, on_shard, m_max, log_z, entropy = ctx.saved_tensors
        n_real, inv_t, chunk_size = ctx.meta
        nones = (None,) * 6
        if g_lp is None and g_ent is None:
            return (None,) + nones
        v_shard = logits.shape[-1]
        z = logits.reshape(-1, v_shard)
        n = z.shape[0]
        dev, cdt = z.device, log_z.dtype
        grad = torch.empty(n, v_shard, dtype=logits.dtype, device=dev)
        if n_real < v_shard:
            grad[:, n_real:].zero_()  # padded entries are outside the softmax
        if n_real == 0 or n == 0:
            return (grad.view(logits.shape),) + nones

        use_ent = g_ent is not None and entropy is not None
        gl = g_lp.reshape(-1).to(cdt) if g_lp is not None else None
        if use_ent:
            gh = g_ent.reshape(-1).to(cdt)
            a = gh * entropy if gl is None else gl + gh * entropy
            alpha = a * (-inv_t)  # grad_j = p_j (alpha + beta log p_j) + [j = t] g / T
            beta = gh * (-inv_t)
        else:
            alpha = gl * (-inv_t)
        tgt_add = (gl * inv_t * on_shard) if gl is not None else None

        direct = logits.dtype == cdt  # compute in the gradient buffer itself
        n_buf = (0 if direct else 1) + (1 if use_ent else 0)
        rows = _rows_per_chunk(n, n_real, chunk_size, max(1, n_buf), dev)
        wbuf = None if direct else torch.empty(rows, n_real, dtype=cdt, device=dev)
        ebuf = torch.empty(rows, n_real, dtype=cdt, device=dev) if use_ent else None
        zr, gr = z[:, :n_real], grad[:, :n_real]
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            w = gr[i0:i1] if direct else wbuf[: i1 - i0]
            if direct:
                torch.sub(zr[i0:i1], m_max[i0:i1].unsqueeze(1), out=w)
            else:
                w.copy_(zr[i0:i1]).sub_(m_max[i0:i1].unsqueeze(1))  # upcast without a hidden temporary
            torch.add(log_z[i0:i1].neg().unsqueeze(1), w, alpha=inv_t, out=w)  # log p = (z - max) / T - log_z
            if use_ent:
                e = ebuf[: i1 - i0]
                torch.exp(w, out=e)
                # p (alpha + beta log p); mul_ + add_ beat a broadcast addcmul by ~2x on CPU.
                w.mul_(beta[i0:i1].unsqueeze(1)).add_(alpha[i0:i1].unsqueeze(1)).mul_(e)
            else:
                w.exp_().mul_(alpha[i0:i1].unsqueeze(1))
            if tgt_add is not None:
                w.scatter_add_(1, t_idx[i0:i1].unsqueeze(1), tgt_add[i0:i1].unsqueeze(1))
            if not direct:
                gr[i0:i1].copy_(w)
        return (grad.view(logits.shape),) + nones


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability (and entropy) of ``target`` under ``softmax(logits / temperature)``.

    Args:
        logits: this rank's vocabulary shard, ``[..., V_shard]``, any float dtype. Shards are
            contiguous and in TP-rank order (Megatron's ``VocabUtility``): rank r holds the ids
            ``[r * V_shard, (r + 1) * V_shard)``. Not modified.
        target: global token ids, integer tensor of shape ``logits.shape[:-1]``, each in
            ``[0, vocab_size)`` (masked positions must still hold a valid id, e.g. 0; their
            gradient is zero when their upstream gradient is).
        tp_group: the tensor-parallel process group; ``None`` = one process holding the whole
            vocabulary.
        temperature: the rollout temperature T > 0.
        with_entropy: also return the entropy of the same tempered distribution.
        vocab_size: the real vocabulary size; ids >= vocab_size (Megatron's padding) are excluded
            from the softmax and get zero gradient. ``None`` = no padding (``V_shard * tp``).
        chunk_size: tokens processed at once (bounds the fp32 working memory); ``None`` = automatic.
            Values and gradients do not depend on it.

    Returns:
        ``logprob`` of shape ``target.shape`` (float32; float64 for float64 logits), or
        ``(logprob, entropy)`` with ``with_entropy=True``. Differentiable w.r.t. ``logits``.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"vocab_parallel_logprobs: logits must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() \
            or target.dtype == torch.bool:
        raise TypeError(f"vocab_parallel_logprobs: target must be an integer tensor of token ids, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"vocab_parallel_logprobs: logits must have a non-empty vocabulary dimension, "
                         f"got shape {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"vocab_parallel_logprobs: target shape {tuple(target.shape)} must equal the leading dims of "
            f"logits {tuple(logits.shape)}, i.e. {tuple(logits.shape[:-1])}"
        )
    if target.device != logits.device:
        raise ValueError(f"vocab_parallel_logprobs: target is on {target.device}, logits on {logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"vocab_parallel_logprobs: temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"vocab_parallel_logprobs: chunk_size must be a positive int or None, got {chunk_size!r}")
    _, world = _group_info(tp_group)
    padded = logits.shape[-1] * world
    if vocab_size is None:
        vocab_size = padded
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= padded:
        raise ValueError(
            f"vocab_parallel_logprobs: vocab_size must be an int in [1, {padded}] (V_shard {logits.shape[-1]} x "
            f"tp {world}), got {vocab_size!r}"
        )
    _check_target(target, vocab_size, padded)
    lp, ent = _VocabParallelLogprob.apply(
        logits, target, tp_group, float(temperature), bool(with_entropy), int(vocab_size), chunk_size
    )
    return (lp, ent) if with_entropy else lp
