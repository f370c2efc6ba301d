"""The local spec's packed (THD) core attention (model/attention.py) against a naive reference:
each sample attended on its own, causal, in float64. Tolerance: fp32 round-off (rtol 1e-5,
atol 1e-6) for values and gradients; float64 gradcheck of the packed function."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_alp.model.attention import packed_attention

HEADS, GROUPS, DIM = 4, 2, 8


def _inputs(lengths, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, HEADS, DIM, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(t, GROUPS, DIM, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(t, GROUPS, DIM, generator=g, dtype=dtype, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def _naive(q, k, v, lengths, scale):
    """Per sample, per head: softmax(q k^T * scale + causal) v, float64; head h uses group h // 2."""
    out = []
    start = 0
    for n in lengths:
        rows = []
        for h in range(HEADS):
            qs, ks, vs = (x[start:start + n, i].double() for x, i in ((q, h), (k, h * GROUPS // HEADS),
                                                                     (v, h * GROUPS // HEADS)))
            s = qs @ ks.T * scale
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
            rows.append(torch.softmax(s, -1) @ vs)
        out.append(torch.stack(rows, 1).reshape(n, HEADS * DIM))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lengths", [[3, 1, 5, 2], [7], [1, 1, 1], [4, 6, 6, 2, 6]])
def test_packed_attention_equals_each_sample_alone(lengths):
    scale = 1 / math.sqrt(DIM)
    q, k, v, cu = _inputs(lengths)
    got = packed_attention(q, k, v, cu, max(lengths), scale)
    want = _naive(q, k, v, lengths, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = torch.autograd.grad((_naive(q2, k2, v2, lengths, scale) * w.double()).sum(), (q2, k2, v2))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_packed_attention_gradcheck_float64():
    q, k, v, cu = _inputs([2, 3, 1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: packed_attention(a, b, c, cu, 3, 0.5), (q, k, v))


def test_packed_attention_needs_cu_seqlens_covering_the_pack():
    q, k, v, _ = _inputs([3, 2])
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_attention(q, k, v, torch.tensor([0, 3], dtype=torch.int32), 3, 1.0)
