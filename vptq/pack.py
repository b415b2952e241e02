"""Bit-packing of VPTQ index tensors, exactly as the official VPTQ format stores them
(microsoft/VPTQ v0.0.5.post1: `vptq/utils/pack.py` pack_index / unpack_index_tensor, read by
`VQuantLinear` with `is_indice_packed=True`). Our own vectorized implementation.

Layout. For one (group g, vector row r) the group_size main indices i_j (index_bits = b each) and
residual indices i'_j (res_bits = b' each, 0 without residual) are merged,

    m_j = (i'_j << b) | i_j                      j = 0 .. group_size-1,  t = b + b' bits each,

and written one after the other into a little-endian bit stream: bit p of m_j is stream bit
j*t + p; stream bit q lives in int32 word q // 32 at bit q % 32 (two's complement: bit 31 is the
sign). The stream is zero-padded to whole words:

    packed (G, n, W) int32,   W = ceil(group_size * t / 32)     from indices (G, n, group_size)

Quirks of the official unpacker (it defines what a valid file is, so `check_packable` enforces them):
  * it masks the residual field with the MAIN index width: (m >> b) & (2^b - 1), so res_bits <= b;
  * it drops `(W*32) % (group_size*t)` trailing bits instead of `W*32 - group_size*t`; the two agree
    only when W*32 < 2*group_size*t (or group_size*t is a multiple of 32), which excludes tiny
    groups such as group_size=1 with t=12;
  * `VQuantLinear` sizes W with int(log2 k) but the unpacker uses ceil(log2 k): k must be a power
    of two (the exporter pads codebooks up to one, see `vptq.format`);
  * unpacked indices are uint16 values in int16 tensors: b <= 16 (k <= 65536).

Each element spans at most two words (t <= 32), so packing is two scatter-adds of shifted int64
values (the bits are disjoint, so add == or) and unpacking two gathers; no per-bit expansion.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vptq.numerics import ceil_log2

_MASK32 = 0xFFFFFFFF
MAX_TOTAL_BITS = 32
MAX_INDEX_BITS = 16


def index_bits_of(num_centroids: int) -> int:
    """Bits of one index into a codebook of `num_centroids` entries (ceil(log2 k), as stored)."""
    if num_centroids < 1:
        raise ValueError(f"num_centroids={num_centroids} must be >= 1")
    return ceil_log2(num_centroids)


def packed_words(group_size: int, total_bits: int) -> int:
    """int32 words per (group, vector row): ceil(group_size * total_bits / 32)."""
    return -(-group_size * total_bits // 32)


def check_packable(group_size: int, index_bits: int, res_bits: int = 0) -> None:
    """Raise ValueError (one line, bad value and valid range) when the official unpacker would not
    read these widths back."""
    t = index_bits + res_bits
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits={index_bits} not supported by the VPTQ format; valid: 1..{MAX_INDEX_BITS} "
                         f"(num_centroids 2..65536)")
    if res_bits < 0 or res_bits > index_bits:
        raise ValueError(f"res_bits={res_bits} > index_bits={index_bits}: the official unpacker masks residual "
                         f"indices with the main index width; valid: 0..{index_bits} "
                         f"(num_res_centroids <= num_centroids)")
    if t > MAX_TOTAL_BITS:
        raise ValueError(f"index_bits+res_bits={t} > {MAX_TOTAL_BITS}; valid: at most {MAX_TOTAL_BITS}")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    bits = group_size * t
    W = packed_words(group_size, t)
    if (W * 32) % bits != W * 32 - bits:
        ok = next(g for g in range(group_size + 1, group_size + 64)
                  if (packed_words(g, t) * 32) % (g * t) == packed_words(g, t) * 32 - g * t)
        raise ValueError(f"group_size={group_size} with {t}-bit indices is misread by the official unpacker "
                         f"(its padding rule needs group_size*bits >= 32 or a multiple of 32); nearest valid "
                         f"group_size above: {ok}")


def pack_indices(indices: torch.Tensor, index_bits: int, res_indices: Optional[torch.Tensor] = None,
                 res_bits: int = 0) -> torch.Tensor:
    """(..., group_size) integer indices (+ residual ones of the same shape) -> (..., W) int32.

    Values must lie in [0, 2^index_bits) and [0, 2^res_bits). Exact inverse: `unpack_indices`.
    """
    if res_indices is None:
        res_bits = 0
    elif res_indices.shape != indices.shape:
        raise ValueError(f"res_indices shape {tuple(res_indices.shape)} != indices shape {tuple(indices.shape)}")
    check_packable(indices.shape[-1], index_bits, res_bits)
    m = indices.to(torch.int64)
    _check_range("indices", m, index_bits)
    if res_bits:
        r = res_indices.to(torch.int64)
        _check_range("res_indices", r, res_bits)
        m = m | (r << index_bits)  # (..., gs) merged, t bits each
    t = index_bits + res_bits
    gs = m.shape[-1]
    W = packed_words(gs, t)
    offset = torch.arange(gs, device=m.device, dtype=torch.int64) * t  # (gs,) bit offset of element j
    word = (offset // 32).expand_as(m)  # (..., gs)
    shifted = m << (offset % 32)  # < 2^63: t <= 32 and shift <= 31
    out = torch.zeros(*m.shape[:-1], W + 1, dtype=torch.int64, device=m.device)  # one spill word
    out.scatter_add_(-1, word, shifted & _MASK32)  # low part -> word
    out.scatter_add_(-1, word + 1, shifted >> 32)  # high part -> next word
    out = out[..., :W]  # (..., W) each in [0, 2^32)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_indices(packed: torch.Tensor, index_bits: int, group_size: int,
                   res_bits: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(..., W) int32 -> (indices (..., group_size) int64, res_indices or None)."""
    check_packable(group_size, index_bits, res_bits)
    t = index_bits + res_bits
    W = packed_words(group_size, t)
    if packed.dtype != torch.int32 or packed.shape[-1] != W:
        raise ValueError(f"packed indices: expected int32 (..., {W}), got {packed.dtype} {tuple(packed.shape)}")
    words = packed.to(torch.int64) & _MASK32  # (..., W) in [0, 2^32)
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)  # (..., W+1)
    offset = torch.arange(group_size, device=packed.device, dtype=torch.int64) * t  # (gs,)
    word, shift = offset // 32, offset % 32
    lo = words[..., word] >> shift  # (..., gs): the element's bits that sit in its first word
    n_hi = (shift + t - 32).clamp_min(0)  # bits that spill into the next word
    hi_mask = torch.bitwise_left_shift(torch.ones_like(n_hi), n_hi) - 1  # (gs,)
    hi = (words[..., word + 1] & hi_mask) << (32 - shift)  # < 2^t: no overflow
    m = (lo | hi) & ((1 << t) - 1)  # (..., gs) merged indices
    idx = m & ((1 << index_bits) - 1)
    res = (m >> index_bits) if res_bits else None
    return idx, res


def _check_range(name: str, x: torch.Tensor, bits: int) -> None:
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= (1 << bits)):
        raise ValueError(f"{name} out of range for {bits} bits: min {int(x.min())}, max {int(x.max())}; "
                         f"valid: 0..{(1 << bits) - 1}")


def to_uint16_view(x: torch.Tensor) -> torch.Tensor:
    """Integer values in [0, 65536) -> int16 tensor holding their uint16 bit patterns (how the
    official format stores unpacked outlier indices and the permutation)."""
    x = x.to(torch.int64)
    _check_range("uint16 values", x, 16)
    return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)


def from_uint16_view(x: torch.Tensor) -> torch.Tensor:
    """int16 tensor of uint16 bit patterns -> int64 values in [0, 65536)."""
    if x.dtype not in (torch.int16, torch.uint16):
        raise ValueError(f"expected an int16 (uint16-view) tensor, got {x.dtype}")
    return x.to(torch.int64) & 0xFFFF
