"""ALP on one process: the noise, the perturbation function, sigma's parameter handling."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_alp.config import AlpConfig
from megatron_alp.model.alp import alp_forward, current_context, perturb, perturbed_layers
from megatron_alp.model.alp.noise import (
    _fmix32_int,
    derive_key,
    gaussian_codes,
    gaussian_rows,
    global_rows,
    token_codes,
)
from megatron_alp.model.alp.perturb import Perturbation, _AddScaledNoise
from megatron_alp.runtime.cpu_support import apply_cpu_support

apply_cpu_support()


class _Cfg:
    sequence_parallel = False


def _pert(sigma=0.3, learnable=True, index=0, seed=5):
    return Perturbation(_Cfg(), AlpConfig(enabled=True, sigma_init=sigma, learnable=learnable, seed=seed), index)


# --- the noise --------------------------------------------------------------------------------


def test_noise_is_standard_normal():
    z = gaussian_rows(torch.arange(512), 512, derive_key(1, 2, 3), 512).flatten().double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 0.01
    # Normal moments and mass: P(|z| < 1) = 0.6827, P(|z| < 2) = 0.9545, kurtosis 3.
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.003
    assert abs((z.abs() < 2).double().mean().item() - 0.9545) < 0.002
    assert abs((z**4).mean().item() - 3.0) < 0.05
    # Neighbours (the cos/sin pair, and consecutive pairs) are uncorrelated.
    zz = z.view(-1, 2)
    assert abs((zz[:, 0] * zz[:, 1]).mean().item()) < 5 / math.sqrt(n / 2)
    assert abs((z[:-2] * z[2:]).mean().item()) < 5 / math.sqrt(n)


def test_noise_depends_on_key_not_on_what_else_is_drawn():
    full = gaussian_rows(torch.arange(16), 8, 77, 16)
    part = gaussian_rows(torch.tensor([3, 9, 4]), 8, 77, 16)
    torch.testing.assert_close(part, full[[3, 9, 4]], rtol=0, atol=0)
    other = gaussian_rows(torch.arange(16), 8, 78, 16)
    corr = (full * other).mean() / (full.std() * other.std())
    assert abs(corr.item()) < 0.15
    with pytest.raises(ValueError, match="even row size"):
        gaussian_rows(torch.arange(2), 7, 1, 2)


def test_keys_differ_by_every_part():
    base = derive_key(1, 2, 3, 4, 5)
    for i in range(5):
        parts = [1, 2, 3, 4, 5]
        parts[i] += 1
        assert derive_key(*parts) != base
    assert derive_key(1, 2, 3, 4, 5) == base


def test_global_rows_for_sequence_and_context_parallel():
    assert global_rows(4, sp_rank=1, sp_size=2).tolist() == [4, 5, 6, 7]
    # CP=2, global length 8: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert global_rows(4, cp_rank=0, cp_size=2).tolist() == [0, 1, 6, 7]
    assert global_rows(4, cp_rank=1, cp_size=2).tolist() == [2, 3, 4, 5]
    # CP=2 then SP=2 inside the CP-local 4 rows.
    assert global_rows(2, sp_rank=1, sp_size=2, cp_rank=0, cp_size=2).tolist() == [6, 7]
    # Every layout covers each global row exactly once.
    seen = sorted(r for cp in range(2) for sp in range(2)
                  for r in global_rows(3, sp_rank=sp, sp_size=2, cp_rank=cp, cp_size=2).tolist())
    assert seen == list(range(12))


# --- the perturbation -------------------------------------------------------------------------


def test_identity_outside_the_policy_update_forward():
    p = _pert()
    h = torch.randn(6, 2, 8)
    assert current_context() is None
    assert p(h) is h
    with alp_forward(step=1, micro_batch=0):
        assert current_context() == (1, 0)
        assert not torch.equal(p(h), h)
    assert current_context() is None and p(h) is h


def test_noise_statistics_per_layer():
    h = torch.zeros(256, 4, 64)
    for index, sigma in ((0, 0.02), (7, 0.5)):
        p = _pert(sigma=sigma, index=index)
        with alp_forward(step=3, micro_batch=1):
            d = (p(h) - h).double()
        assert abs(d.mean().item()) < 5 * sigma / math.sqrt(d.numel())
        assert abs(d.std().item() / sigma - 1) < 0.01


def test_noise_reproducible_and_distinct():
    h = torch.zeros(8, 2, 16)
    a, b = _pert(index=0), _pert(index=1)
    with alp_forward(5, 2):
        a1, a2, b1 = a(h), a(h), b(h)
    with alp_forward(6, 2):
        a3 = a(h)
    with alp_forward(5, 3):
        a4 = a(h)
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    for other in (b1, a3, a4):
        assert not torch.allclose(a1, other)


def test_gradcheck_float64():
    h = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor([math.log(0.7)], dtype=torch.float64, requires_grad=True)
    rows = torch.arange(5)
    assert torch.autograd.gradcheck(lambda x, s: _AddScaledNoise.apply(x, s, 1234, rows, 5), (h, log_sigma))


def test_noise_is_not_saved_for_backward():
    p = _pert()
    h = torch.randn(64, 4, 300, requires_grad=True)  # above KEEP_NOISE_ELEMENTS
    assert h.numel() > perturb.KEEP_NOISE_ELEMENTS
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with alp_forward(1, 0):
            out = p(h)
    # Only log-sigma (1) and the row indices (64) are kept: nothing of the [64, 4, 300] noise.
    assert sum(saved) <= 1 + 64 and out.grad_fn.xi is None
    out.sum().backward()
    assert h.grad is not None and p.log_sigma.grad is not None


def test_small_noise_kept_for_backward_and_chunks_give_the_same_values(monkeypatch):
    """A small layer's noise is kept from forward to backward (perturb.KEEP_NOISE_ELEMENTS), a big
    one's generated again, in chunks of CHUNK_ELEMENTS: the same output and gradients."""
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(40, 2, 32, generator=g)
    w = torch.randn(40, 2, 32, generator=g)

    def run():
        p = _pert(sigma=0.2)
        h = h0.clone().requires_grad_()
        with alp_forward(4, 1):
            out = p(h)
        kept = out.grad_fn.xi is not None
        (out * w).sum().backward()
        return out.detach(), h.grad, p.log_sigma.grad, kept

    kept = run()
    monkeypatch.setattr(perturb, "KEEP_NOISE_ELEMENTS", 0)
    regenerated = run()
    monkeypatch.setattr(perturb, "CHUNK_ELEMENTS", 7 * 64)  # 7 rows per chunk
    chunked = run()
    assert kept[3] and not regenerated[3] and not chunked[3]
    for other in (regenerated, chunked):
        torch.testing.assert_close(other[0], kept[0], rtol=0, atol=0)  # elementwise: the same noise
        torch.testing.assert_close(other[1], kept[1], rtol=0, atol=0)
    torch.testing.assert_close(regenerated[2], kept[2], rtol=0, atol=0)  # one chunk: the same sum
    # sigma's gradient sums 2560 fp32 products; in 7-row chunks the order differs (fp32 round-off)
    torch.testing.assert_close(chunked[2], kept[2], rtol=1e-5, atol=1e-6)
    assert kept[2].abs() > 1e-3


def test_token_noise_equals_the_scalar_definition():
    """gaussian_codes (table-driven Box-Muller, int32 tensor hashing) against the definition in
    noise.py's docstring computed per element with Python integers and float64."""
    codes = token_codes(torch.tensor([0, 5, 2**31 - 1, -3]), torch.tensor([0, 7, 3, 2**20]))
    width, key = 6, derive_key(9, 8, 7)
    got = gaussian_codes(codes, width, key)
    golden = 0x9E3779B9
    for i, c in enumerate(codes.tolist()):
        lo, hi = c & 0xFFFFFFFF, (c >> 32) & 0xFFFFFFFF
        h = _fmix32_int(_fmix32_int(lo ^ (key & 0xFFFFFFFF)) ^ _fmix32_int(hi))
        for k in range(width // 2):
            a = _fmix32_int(h + k * golden)
            r = math.sqrt(-2 * math.log(((a & 0xFFFF) + 0.5) / 65536))
            theta = (a >> 16) * 2 * math.pi / 65536
            assert got[i, k].item() == pytest.approx(r * math.cos(theta), rel=1e-5, abs=1e-6)
            assert got[i, k + width // 2].item() == pytest.approx(r * math.sin(theta), rel=1e-5, abs=1e-6)


def test_sigma_gradient_matches_finite_difference():
    """The fp32 parameter's gradient against a central difference (activations in fp64 so the
    difference itself is not dominated by round-off)."""
    g = torch.Generator().manual_seed(0)
    p = _pert(sigma=0.2)
    h = torch.randn(32, 2, 16, generator=g, dtype=torch.float64)
    w = torch.randn(32, 2, 16, generator=g, dtype=torch.float64)
    with alp_forward(2, 0):
        loss = (p(h) * w).sum()
        loss.backward()
        eps = 1e-3
        with torch.no_grad():
            p.log_sigma += eps
            up = (p(h) * w).sum()
            p.log_sigma -= 2 * eps
            down = (p(h) * w).sum()
    fd = (up - down) / (2 * eps)
    assert p.log_sigma.grad.item() == pytest.approx(fd.item(), rel=1e-3)


@pytest.mark.parametrize("direction", [+1, -1])
def test_sigma_learns_the_right_way_and_fixed_sigma_does_not(direction):
    """Toy objective: reward (direction=+1) or penalise the size of the injected noise."""
    for learnable in (True, False):
        p = _pert(sigma=0.1, learnable=learnable)
        opt = torch.optim.SGD([p.log_sigma], lr=2.0)
        h = torch.zeros(16, 2, 8)
        start = p.sigma.item()
        for step in range(10):
            with alp_forward(step, 0):
                loss = -direction * (p(h) - h).pow(2).mean()
            if learnable:
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                assert not loss.requires_grad
        end = p.sigma.item()
        if learnable:
            assert (end - start) * direction > 0.02, (start, end)
        else:
            assert end == start


def test_sigma_stays_fp32_under_half_casts():
    p = _pert(sigma=1e-6)
    p.bfloat16()
    assert p.log_sigma.dtype == torch.float32
    assert p.sigma.item() == pytest.approx(1e-6, rel=1e-6)
    assert getattr(p.log_sigma, "alp_sigma", False)


@pytest.mark.parametrize(
    "layers,target,expected",
    [
        ("all", "layers", list(range(9))),
        ("first:2", "layers", [0, 1]),
        ("last:3", "layers", [6, 7, 8]),
        ("early", "layers", [0, 1, 2]),
        ("middle", "layers", [3, 4, 5]),
        ("late", "layers", [6, 7, 8]),
        ([4, 1, 4], "layers", [1, 4]),
        ("all", "logits", []),
    ],
)
def test_layer_selection(layers, target, expected):
    assert perturbed_layers(AlpConfig(enabled=True, layers=layers, target=target), 9) == expected
