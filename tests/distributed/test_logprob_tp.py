"""vocab_parallel_logprobs at TP=2 over gloo against the naive reference on the gathered logits.

Both ranks build the same full logits from a seed, keep their contiguous vocabulary shard (rank r
holds ids [r * V_shard, (r + 1) * V_shard), as Megatron's VocabUtility), and run the function with
Megatron's TP group. Each rank's values and gradient shard must equal the float64 reference
(``log_softmax(full[..., :vocab_size] / T)`` gathered at the target, entropy ``-sum p log p``,
gradients by autograd) within ``atol = 1e-5, rtol = 1e-5`` for fp32 (values of bf16 input too);
bf16 gradient shards within one bf16 rounding (``rtol = 2**-8``). The TP=2 values must also equal
our own TP=1 result on the full logits within the same fp32 tolerance.

One spawned world runs every case (spawning costs more than the cases).
"""

from __future__ import annotations

import torch

from megatron_alp.runtime.spawn import run_world

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_GRAD_TOL = dict(atol=1e-6, rtol=2.0**-8)

V_SHARD = 24  # padded vocabulary 48 at TP=2

# (name, dtype, vocab_size, temperature, with_entropy, chunk_size, leading shape)
CASES = [
    ("plain", torch.float32, None, 1.0, False, None, (6, 5)),
    ("padding on rank 1", torch.float32, 41, 1.0, True, None, (6, 5)),
    ("temperature + chunks", torch.float32, 41, 0.7, True, 4, (6, 5)),
    ("rank 1 all padding", torch.float32, 20, 1.3, True, 3, (7, 3)),
    ("padding exactly at the shard edge", torch.float32, 24, 1.0, True, 1, (4, 2)),
    ("one real id on rank 1", torch.float32, 25, 0.9, True, None, (5,)),
    ("bf16 input", torch.bfloat16, 45, 1.2, True, 2, (6, 5)),
]


def _reference(full, target, temperature, vocab_size, gl, gh):
    zr = full.detach().double().requires_grad_()
    vs = vocab_size or zr.shape[-1]
    ls = torch.log_softmax(zr[..., :vs] / temperature, dim=-1)
    lp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    (lp * gl.double() + ent * gh.double()).sum().backward()
    return lp.detach(), ent.detach(), zr.grad


def _worker(rank, world_size):
    import pytest
    from megatron.core import parallel_state as ps

    from megatron_alp.config import ParallelConfig
    from megatron_alp.ops.logprob import vocab_parallel_logprobs
    from megatron_alp.runtime.distributed import init_parallel_state

    init_parallel_state(ParallelConfig(tp=world_size))
    group = ps.get_tensor_model_parallel_group()
    assert ps.get_tensor_model_parallel_rank() == rank
    lo, hi = rank * V_SHARD, (rank + 1) * V_SHARD
    report = []
    for i, (name, dtype, vocab_size, temperature, with_entropy, chunk, shape) in enumerate(CASES):
        g = torch.Generator().manual_seed(100 + i)
        full = (torch.randn(*shape, V_SHARD * world_size, generator=g, dtype=torch.float64) * 3).to(dtype)
        target = torch.randint(0, vocab_size or V_SHARD * world_size, shape, generator=g)
        if vocab_size is not None:
            target.view(-1)[0] = vocab_size - 1  # the last real id, wherever it falls
        gl, gh = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        if not with_entropy:
            gh = torch.zeros_like(gh)
        shard = full[..., lo:hi].clone().requires_grad_()
        kw = dict(temperature=temperature, vocab_size=vocab_size, chunk_size=chunk)
        if with_entropy:
            lp, ent = vocab_parallel_logprobs(shard, target, tp_group=group, with_entropy=True, **kw)
            (lp * gl + ent * gh).sum().backward()
        else:
            lp = vocab_parallel_logprobs(shard, target, tp_group=group, **kw)
            (lp * gl).sum().backward()
            ent = None
        rlp, rent, rgrad = _reference(full, target, temperature, vocab_size, gl, gh)
        msg = f"case {name!r} rank {rank}"
        assert lp.dtype == torch.float32 and lp.shape == target.shape, msg
        torch.testing.assert_close(lp.double(), rlp, **FP32_TOL, msg=lambda m, msg=msg: f"{msg} logprob: {m}")
        if ent is not None:
            torch.testing.assert_close(ent.double(), rent, **FP32_TOL, msg=lambda m, msg=msg: f"{msg} entropy: {m}")
        tol = FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL
        assert shard.grad.dtype == dtype, msg
        torch.testing.assert_close(shard.grad.double(), rgrad[..., lo:hi], **tol,
                                   msg=lambda m, msg=msg: f"{msg} grad: {m}")
        # invariance: TP=2 equals our own TP=1 on the full logits
        with torch.no_grad():
            one = vocab_parallel_logprobs(full, target, with_entropy=True, **kw)
        torch.testing.assert_close(lp, one[0], **FP32_TOL, msg=lambda m, msg=msg: f"{msg} TP=1 vs TP=2: {m}")
        report.append((name, float((lp.double() - rlp).abs().max()),
                       float((shard.grad.double() - rgrad[..., lo:hi]).abs().max())))

    # chunked == unchunked at TP=2 (bitwise here; asserted to 1 fp32 ulp)
    g = torch.Generator().manual_seed(7)
    full = torch.randn(9, 4, V_SHARD * world_size, generator=g) * 2
    target = torch.randint(0, 43, (9, 4), generator=g)
    outs = []
    for chunk in (1, 5, None, 1000):
        shard = full[..., lo:hi].clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs(shard, target, tp_group=group, with_entropy=True, vocab_size=43,
                                          temperature=0.8, chunk_size=chunk)
        (lp - 0.5 * ent).sum().backward()
        outs.append((lp.detach(), ent.detach(), shard.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=2e-7)

    # a bad id raises the same error on every rank (validation is local: no rank hangs)
    with pytest.raises(ValueError, match="target id 45 at position"):
        bad = target.clone()
        bad[2, 1] = 45
        vocab_parallel_logprobs(full[..., lo:hi], bad, tp_group=group, vocab_size=43)
    return report


def test_tp2_matches_naive_reference():
    reports = run_world(_worker, 2, timeout=240)
    assert len(reports) == 2 and all(len(r) == len(CASES) for r in reports)
