"""Counter-based Gaussian noise: xi[row, b, j] is a pure function of (key, global position).

Why not ``torch.randn`` with a seeded generator: the ALP noise must be *the same numbers* whatever
the parallel layout (ALGORITHMS.md section 1: under sequence/context parallelism each rank draws
its own slice of one global noise tensor, ideally the values the TP=1 run draws), and it must be
regenerated exactly in the backward pass and under activation recomputation instead of being
stored. A stateful generator's stream depends on how much was drawn before; a counter-based one
does not. Each row (sequence position) of the global tensor [S, B x H] is cut into two halves;
the pair (k, k + BH/2) of row s hashes its index m = s * BH/2 + k with the key (murmur3's 32-bit
finaliser, int32 arithmetic that wraps), splits the 32 bits into two 16-bit uniforms and applies
Box-Muller, emitting the cosine output at k and the sine output at k + BH/2. Tails are
truncated at sqrt(-2 ln(2^-17)) = 4.85 sigma (mass beyond: 1.2e-6); mean, variance and the
fraction within one sigma are tested in tests/unit/test_alp.py.

Token keying (sequence packing, trainer/packing.py): :func:`gaussian_codes` keys the noise of one
token on its sample's identity and its index in the sample instead of its position in the
micro-batch, so the same token gets the same noise padded or packed, in any micro-batch, on any
DP rank. The actor uses it for every policy update.

(The counter-based idea is Philox's, Salmon et al. 2011; the finaliser is MurmurHash3's fmix32.)
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

_M1 = -2048144789  # 0x85EBCA6B as a signed int32
_M2 = -1028477387  # 0xC2B2AE35 as a signed int32
_MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on int32 tensors, in place (logical shifts via masks; products wrap)."""
    h.bitwise_xor_((h >> 16).bitwise_and_(0xFFFF))
    h.mul_(_M1)
    h.bitwise_xor_((h >> 13).bitwise_and_(0x7FFFF))
    h.mul_(_M2)
    return h.bitwise_xor_((h >> 16).bitwise_and_(0xFFFF))


def _fmix32_int(h: int) -> int:
    h &= _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def derive_key(*parts: int) -> int:
    """A 32-bit key from integers (base seed, step, micro-batch, layer, DP rank, ...)."""
    h = 0x9E3779B9
    for p in parts:
        h = _fmix32_int(h ^ _fmix32_int(int(p) & _MASK32) ^ ((int(p) >> 32) & _MASK32))
    # As a signed int32 so it can be xor-ed with int32 tensors.
    return h - (1 << 32) if h >= (1 << 31) else h


def gaussian_rows(rows: torch.Tensor, row_size: int, key: int, total_rows: int) -> torch.Tensor:
    """Noise for the given global rows of a [total_rows, row_size] tensor: [len(rows), row_size], fp32.

    ``rows`` is an int64 tensor of global row indices (sequence positions). ``row_size`` (= B x H)
    must be even. The values do not depend on which other rows are asked for. Elements k and
    k + row_size/2 of a row come from one hash: the Box-Muller cosine and sine outputs.
    """
    if row_size % 2:
        raise ValueError(f"ALP noise needs an even row size (micro-batch x hidden), got {row_size}")
    half = row_size // 2
    if total_rows * half < 2**31:
        # Pair index m = row * half + k fits int32 without wrapping.
        idx = rows.to(torch.int32)[:, None] * half + torch.arange(half, dtype=torch.int32, device=rows.device)
    else:
        # Beyond 2^31 pairs: fold the high bits through the hash so distinct pairs stay distinct.
        base = rows.to(torch.int64)[:, None] * half + torch.arange(half, dtype=torch.int64, device=rows.device)
        idx = (base & _MASK32).to(torch.int32).bitwise_xor_(_fmix32((base >> 32).to(torch.int32)))
    return _box_muller(_fmix32(idx.bitwise_xor_(key)), row_size)


def _box_muller(a: torch.Tensor, row_size: int) -> torch.Tensor:
    """[R, row_size / 2] hashed int32 -> [R, row_size] fp32 normals (cosine half, sine half).

    The low 16 bits u give the radius sqrt(-2 ln((u + 0.5) / 2^16)), the high 16 bits v the angle
    2 pi v / 2^16. Each has 2^16 values, so both come from tables (:func:`_tables`) computed once
    with the same fp32 operations: the same numbers as computing them per element, in far fewer
    operations (what a small model's step is bound by)."""
    rows, half = a.shape[0], row_size // 2
    radius, cos_sin = _tables(a.device)
    flat = a.reshape(-1)
    r = torch.index_select(radius, 0, flat & 0xFFFF).view(rows, half, 1)
    cs = torch.index_select(cos_sin, 0, (flat >> 16).bitwise_and_(0xFFFF)).view(rows, half, 2)
    out = torch.empty(rows, row_size, dtype=torch.float32, device=a.device)
    torch.mul(r, cs, out=out.view(rows, 2, half).transpose(1, 2))  # cosines, then sines
    return out


_TABLES: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
_STEPS: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def _tables(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller's radius [2^16] and (cosine, sine) [2^16, 2] for every 16-bit value (768 KiB)."""
    tables = _TABLES.get(device)
    if tables is None:
        k = torch.arange(65536, dtype=torch.float32, device=device)
        radius = (k + 0.5).mul_(1.0 / 65536.0).log_().mul_(-2.0).sqrt_()
        theta = k.mul(2.0 * math.pi / 65536.0)
        tables = _TABLES[device] = (radius, torch.stack([torch.cos(theta), torch.sin(theta)], dim=1))
    return tables


def _golden_steps(half: int, device: torch.device) -> torch.Tensor:
    """[half] int32: k * 0x9E3779B9 (wrapping), the per-element offsets of :func:`gaussian_codes`."""
    steps = _STEPS.get((half, device))
    if steps is None:
        golden = -1640531527  # 0x9E3779B9 as a signed int32
        steps = _STEPS[(half, device)] = torch.arange(half, dtype=torch.int32, device=device) * golden
    return steps


def token_codes(sample_ids: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """int64 identity of a token: its sample's id (high 32 bits) and its index in the sample."""
    return (sample_ids.to(torch.int64) << 32) | (token_index.to(torch.int64) & _MASK32)


def gaussian_codes(codes: torch.Tensor, width: int, key: int) -> torch.Tensor:
    """Noise [len(codes), width] fp32 for tokens identified by ``codes`` (see :func:`token_codes`):
    a pure function of (key, code, element), whatever the token's position in a batch or pack."""
    if width % 2:
        raise ValueError(f"ALP token noise needs an even width (hidden size), got {width}")
    half = width // 2
    codes = codes.to(torch.int64)
    # .to(int32) keeps the low 32 bits (two's complement wrap) on CPU and CUDA; a new tensor, so
    # the in-place hashing below never touches ``codes``.
    h = _fmix32(codes.to(torch.int32).bitwise_xor_(key))
    h = _fmix32(h.bitwise_xor_(_fmix32((codes >> 32).to(torch.int32))))
    idx = h[:, None] + _golden_steps(half, codes.device)  # wraps
    return _box_muller(_fmix32(idx), width)


def global_rows(local_len: int, *, sp_rank: int = 0, sp_size: int = 1, cp_rank: int = 0, cp_size: int = 1,
                device=None) -> torch.Tensor:
    """Global sequence positions of this rank's local rows.

    Context parallel (Megatron's load-balanced layout): the sequence is cut into 2 x cp chunks and
    CP rank r holds chunks r and 2cp-1-r. Sequence parallel then splits the CP-local rows
    contiguously over the TP ranks.
    """
    cp_local = local_len * sp_size
    idx = torch.arange(local_len, dtype=torch.int64, device=device) + sp_rank * local_len  # CP-local rows
    if cp_size == 1:
        return idx
    if cp_local % 2:
        raise ValueError(f"context parallel needs an even CP-local length, got {cp_local}")
    chunk = cp_local // 2
    first = idx < chunk
    return torch.where(first, cp_rank * chunk + idx, (2 * cp_size - 1 - cp_rank) * chunk + (idx - chunk))


def noise_like(h: torch.Tensor, rows: torch.Tensor, key: int, total_rows: int,
               codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 noise shaped like ``h`` ([s_local, *rest]) for the given global rows; with ``codes``
    ([s_local, b] token identities) keyed per token instead: ``h[s, b, :]`` gets ``codes[s, b]``'s."""
    if codes is not None:
        return gaussian_codes(codes.reshape(-1), math.prod(h.shape[2:]), key).reshape(h.shape)
    row_size = math.prod(h.shape[1:])
    return gaussian_rows(rows, row_size, key, total_rows).reshape(h.shape)


def chunks(n: int, rows_per_chunk: int) -> Sequence[slice]:
    return [slice(i, min(n, i + rows_per_chunk)) for i in range(0, n, max(1, rows_per_chunk))]
