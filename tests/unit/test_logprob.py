"""vocab_parallel_logprobs on one process (tp_group=None) against the naive reference.

Reference: ``log_softmax(logits[..., :vocab_size].double() / T)`` gathered at the target, entropy
``-sum p log p``, gradients by autograd through both, all in float64. Tolerances:

* fp32 (and bf16 input, whose values are computed in fp32): values and gradients within
  ``atol = 1e-5, rtol = 1e-5`` of the float64 reference (observed errors are ~1e-6).
* bf16 gradients are returned in bf16: within one bf16 rounding (``rtol = 2**-8``) of the reference.
* float64 input is computed in float64: ``torch.autograd.gradcheck`` with its default tolerances.
"""

from __future__ import annotations

import pytest
import torch

from megatron_alp.ops.logprob import vocab_parallel_logprobs

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_GRAD_TOL = dict(atol=1e-6, rtol=2.0**-8)


def naive(logits, target, temperature=1.0, vocab_size=None):
    """float64 reference on the full logits: (logprob, entropy), differentiable."""
    vs = vocab_size or logits.shape[-1]
    ls = torch.log_softmax(logits.double()[..., :vs] / temperature, dim=-1)
    lp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    return lp, ent


def make(shape=(3, 5), vocab=50, dtype=torch.float32, seed=0, scale=3.0, vocab_size=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab_size or vocab, shape, generator=g)
    return logits, target


def run_both(logits, target, gl, gh, **kw):
    """Our values and gradient vs the reference's, for the loss sum(gl * lp + gh * H)."""
    z = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(z, target, with_entropy=True, **kw)
    (lp * gl.to(lp.dtype) + ent * gh.to(ent.dtype)).sum().backward()
    zr = logits.detach().double().requires_grad_()  # float64 leaf: reference gradients in float64
    rlp, rent = naive(zr, target, kw.get("temperature", 1.0), kw.get("vocab_size"))
    (rlp * gl.double() + rent * gh.double()).sum().backward()
    return (lp, ent, z.grad), (rlp, rent, zr.grad)


# ---------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("temperature,vocab_size,chunk", [(1.0, None, None), (0.7, 9, 2), (1.6, 12, 1)])
def test_gradcheck_logprob_float64(temperature, vocab_size, chunk):
    logits, target = make((2, 3), vocab=12, dtype=torch.float64, vocab_size=vocab_size)
    z = logits.requires_grad_()
    fn = lambda x: vocab_parallel_logprobs(  # noqa: E731
        x, target, temperature=temperature, vocab_size=vocab_size, chunk_size=chunk
    )
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("temperature,vocab_size,chunk", [(1.0, None, None), (0.7, 9, 2), (1.6, 12, 1)])
def test_gradcheck_entropy_and_joint_float64(temperature, vocab_size, chunk):
    logits, target = make((2, 3), vocab=12, dtype=torch.float64, vocab_size=vocab_size)
    z = logits.requires_grad_()
    kw = dict(temperature=temperature, vocab_size=vocab_size, chunk_size=chunk, with_entropy=True)
    # entropy alone (the log-prob output gets no gradient), then both outputs together
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_logprobs(x, target, **kw)[1], (z,))
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_logprobs(x, target, **kw), (z,))


def test_entropy_gradient_formula():
    """dH/dz_j = -p_j (log p_j + H) / T, the identity the backward implements."""
    logits, target = make((4,), vocab=10, dtype=torch.float64)
    T = 0.8
    z = logits.clone().requires_grad_()
    _, ent = vocab_parallel_logprobs(z, target, temperature=T, with_entropy=True)
    ent.sum().backward()
    logp = torch.log_softmax(logits / T, -1)
    expected = -logp.exp() * (logp + ent.detach().unsqueeze(-1)) / T
    torch.testing.assert_close(z.grad, expected, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------ fp32 against naive


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("vocab_size", [None, 37])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_fp32_matches_naive(temperature, vocab_size, chunk):
    logits, target = make((4, 6), vocab=50, vocab_size=vocab_size, seed=1)
    g = torch.Generator().manual_seed(2)
    gl, gh = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ours, ref = run_both(logits, target, gl, gh, temperature=temperature, vocab_size=vocab_size, chunk_size=chunk)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[0].shape == target.shape and ours[1].shape == target.shape
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), **FP32_TOL)
    if vocab_size is not None:
        assert torch.all(ours[2][..., vocab_size:] == 0), "padded entries must get zero gradient"


def test_logprob_only_and_large_logits():
    """Without entropy, with logits far from 0 (the max subtraction must keep exp finite)."""
    logits, target = make((64,), vocab=300, seed=3, scale=40.0)
    logits = logits + 500.0
    z = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(z, target, temperature=0.9)
    assert isinstance(lp, torch.Tensor) and torch.isfinite(lp).all()
    lp.sum().backward()
    zr = logits.double().requires_grad_()
    rlp, _ = naive(zr, target, 0.9)
    rlp.sum().backward()
    torch.testing.assert_close(lp.double(), rlp, **FP32_TOL)
    torch.testing.assert_close(z.grad.double(), zr.grad.double(), **FP32_TOL)


def test_bf16_input_computes_in_fp32():
    logits, target = make((8, 4), vocab=64, dtype=torch.bfloat16, vocab_size=60, seed=4)
    g = torch.Generator().manual_seed(5)
    gl, gh = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    (lp, ent, grad), (rlp, rent, rgrad) = run_both(logits, target, gl, gh, temperature=0.8, vocab_size=60)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # values: fp32 accuracy on the (exactly upcast) bf16 logits, not bf16 accuracy
    torch.testing.assert_close(lp.double(), rlp, **FP32_TOL)
    torch.testing.assert_close(ent.double(), rent, **FP32_TOL)
    torch.testing.assert_close(grad.double(), rgrad, **BF16_GRAD_TOL)


def test_masked_positions_get_zero_gradient():
    logits, target = make((4, 7), vocab=40, seed=6)
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(7)) > 0.4
    target = torch.where(mask, target, torch.zeros_like(target))  # masked slots hold a valid id (0)
    z = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(z, target, with_entropy=True, chunk_size=3)
    loss = ((lp + 0.1 * ent) * mask).sum() / mask.sum()
    loss.backward()
    zr = logits.clone().requires_grad_()
    rlp, rent = naive(zr, target)
    (((rlp + 0.1 * rent) * mask).sum() / mask.sum()).backward()
    assert torch.all(z.grad[~mask] == 0)
    torch.testing.assert_close(z.grad.double(), zr.grad.double(), **FP32_TOL)
    torch.testing.assert_close(lp[mask].double(), rlp[mask], **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(dtype):
    logits, target = make((5, 3, 2), vocab=70, dtype=dtype, vocab_size=66, seed=8)
    g = torch.Generator().manual_seed(9)
    gl, gh = torch.randn(5, 3, 2, generator=g), torch.randn(5, 3, 2, generator=g)
    results = []
    for chunk in (1, 2, 7, 30, None, 10_000):
        z = logits.clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs(z, target, with_entropy=True, vocab_size=66, chunk_size=chunk,
                                          temperature=1.3)
        (lp * gl + ent * gh).sum().backward()
        results.append((lp.detach(), ent.detach(), z.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            # the per-token arithmetic does not depend on the chunking: bitwise on this machine,
            # asserted to 1 fp32 ulp to stay robust to vectorisation differences elsewhere
            torch.testing.assert_close(a, b, atol=0, rtol=2e-7 if a.dtype == torch.float32 else 2.0**-8)


def test_only_entropy_used_and_no_grad():
    logits, target = make((6,), vocab=20, seed=10)
    z = logits.clone().requires_grad_()
    _, ent = vocab_parallel_logprobs(z, target, with_entropy=True, temperature=0.5)
    ent.sum().backward()
    zr = logits.clone().requires_grad_()
    naive(zr, target, 0.5)[1].sum().backward()
    torch.testing.assert_close(z.grad.double(), zr.grad.double(), **FP32_TOL)
    with torch.no_grad():
        lp = vocab_parallel_logprobs(logits, target)
    assert not lp.requires_grad
    torch.testing.assert_close(lp.double(), naive(logits, target)[0], **FP32_TOL)


def test_input_untouched_and_saved_memory():
    """Logits are not modified; nothing logits-sized is saved for backward except the logits
    themselves (by reference: same storage, no copy)."""
    logits, target = make((16, 8), vocab=256, dtype=torch.bfloat16, seed=11)
    before = logits.clone()
    z = logits.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = vocab_parallel_logprobs(z, target, with_entropy=True)
    big = [t for t in saved if t.numel() > target.numel()]
    assert len(big) == 1 and big[0].data_ptr() == z.data_ptr() and big[0].dtype == torch.bfloat16
    assert sum(t.numel() * t.element_size() for t in saved if t is not big[0]) <= 64 * target.numel()
    (lp + ent).sum().backward()
    assert torch.equal(z.detach(), before)


def test_empty_and_int32_targets():
    z = torch.randn(0, 5, requires_grad=True)
    lp = vocab_parallel_logprobs(z, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)
    logits, target = make((4,), vocab=9, seed=12)
    torch.testing.assert_close(
        vocab_parallel_logprobs(logits, target.int()).double(), naive(logits, target)[0], **FP32_TOL
    )


# -------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "bad,expected",
    [(37, r"target id 37 at position \(1, 2\) is a padding entry"), (-3, r"target id -3 at position \(1, 2\)"),
     (99, r"target id 99 at position \(1, 2\) is outside the vocabulary")],
)
def test_bad_target_names_the_value(bad, expected):
    logits, target = make((3, 4), vocab=40, vocab_size=37)
    target[1, 2] = bad
    with pytest.raises(ValueError, match=expected):
        vocab_parallel_logprobs(logits, target, vocab_size=37)


def test_bad_shapes_and_arguments():
    logits, target = make((3, 4), vocab=10)
    with pytest.raises(ValueError, match=r"target shape \(4, 3\) must equal the leading dims of logits \(3, 4, 10\)"):
        vocab_parallel_logprobs(logits, target.t())
    with pytest.raises(ValueError, match=r"target shape \(3,\)"):
        vocab_parallel_logprobs(logits, target[:, 0])
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        vocab_parallel_logprobs(logits, target.float())
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        vocab_parallel_logprobs(target, target)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        vocab_parallel_logprobs(logits, target, temperature=0)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 10\]"):
        vocab_parallel_logprobs(logits, target, vocab_size=11)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        vocab_parallel_logprobs(logits, target, chunk_size=0)


def test_working_memory_bound():
    """Chunks are capped so that the fp32 work buffers (at most two) never exceed one shard."""
    from megatron_alp.ops.logprob import _rows_per_chunk

    cpu = torch.device("cpu")
    for n, requested, n_buf in [(10, None, 2), (10, 1000, 2), (4096, None, 2), (7, 7, 1), (1, None, 2)]:
        rows = _rows_per_chunk(n, 32768, requested, n_buf, cpu)
        assert 1 <= rows <= n and (rows * n_buf <= n or n == 1), (n, requested, n_buf, rows)
    assert _rows_per_chunk(4096, 32768, 3, 2, cpu) == 3  # an explicit small chunk is honoured
