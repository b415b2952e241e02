"""Triton dequantization of a VPTQ weight from its PACKED index stream, and its torch reference.

Implements the VPTQ reconstruction (arXiv 2409.17066, Sec. 3: W = C[idx] (+ C_res[idx_res]),
outlier columns from their own codebook, then the inverse column permutation and the
per-column norm W * scale + bias), reading the official packed layout (see `layout.py`).
Used for prefill: dequantize, then `F.linear` (cuBLAS). Exact vs `VQWeight.dequantize`:
same fp32 operations in the same order, fp contraction off.

`_codewords` is shared with the one-token GEMV (`gemv.py`): it decodes a (C columns x R vector
rows) tile of merged indices from the bit stream and gathers their codewords. (A variant with
an (R, C) tile and L1 eviction hints, `gemv._words/_decode`, measured 1.6x slower here on an
H200, see docs/benchmarks.md; this one is kept.)
"""
from __future__ import annotations

import os
from typing import Optional

import torch

import triton
import triton.language as tl

from vptq.kernels.layout import KernelWeight, Segment, unpack_stream

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are decorated


@triton.jit
def _codewords(packed_ptr, cb_ptr, rcb_ptr, rows, cols, mask,
               N_ROWS, GS, W_WORDS, K, KR, G_LAST,
               VP: tl.constexpr, TB: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr,
               ONE_GROUP: tl.constexpr):
    """rows (R,) vector rows, cols (C,) segment columns, mask (C, R) -> codewords (C, R, VP) fp32.

    Masked-off entries decode as index 0 (a valid address); callers mask their effect.
    """
    # 1. group of each column and the column inside its group
    if ONE_GROUP:
        g = cols * 0  # (C,)
        cg = cols
    else:
        g = tl.minimum(cols // GS, G_LAST)
        cg = cols - g * GS
    # 2. where each merged index sits in its row's bit stream
    bit = cg * TB  # (C,)
    word = bit >> 5  # (C,)
    sh = (bit & 31).to(tl.uint32)  # (C,)
    row = g[:, None] * N_ROWS + rows[None, :]  # (C, R) stream row (g, r)
    wp = packed_ptr + row * W_WORDS + word[:, None]  # (C, R)
    w0 = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True)  # (C, R)
    if (32 % TB) != 0:  # an index may straddle two words: take the high part from the next
        nxt = mask & ((word + 1) < W_WORDS)[:, None]
        w1 = tl.load(wp + 1, mask=nxt, other=0).to(tl.uint32, bitcast=True)
        m = (w0 >> sh[:, None]) | ((w1 << 1) << (31 - sh)[:, None])  # (C, R); <<1<<(31-s): no shift by 32
    else:
        m = w0 >> sh[:, None]
    # 3. split the merged index, gather the codewords (one VP-wide vector load each)
    idx = (m & ((1 << IB) - 1)).to(tl.int32)  # (C, R)
    lanes = tl.arange(0, VP)  # (VP,)
    crow = g[:, None] * K + idx  # (C, R) codebook row
    cw = tl.load(cb_ptr + crow[:, :, None] * VP + lanes[None, None, :]).to(tl.float32)  # (C, R, VP)
    if RB > 0:
        ridx = ((m >> IB) & ((1 << RB) - 1)).to(tl.int32)  # (C, R)
        rrow = g[:, None] * KR + ridx
        cw = cw + tl.load(rcb_ptr + rrow[:, :, None] * VP + lanes[None, None, :]).to(tl.float32)
    return cw


@triton.jit
def _store(ptrs, val, mask, BF16_BITS: tl.constexpr):
    """Store fp32 `val` in the pointer's dtype. BF16_BITS: ptrs are int16 views of a bfloat16
    tensor and the rounding (to nearest even) is done on the bits, because the Triton
    interpreter truncates fp32 -> bf16; on a GPU this is what cvt.rn.bf16.f32 computes."""
    if BF16_BITS:
        u = val.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(ptrs, u.to(tl.int32).to(tl.int16), mask=mask)
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["OUT", "IN", "N_ROWS", "GS", "NCOLS", "W_WORDS", "K", "KR", "G_LAST", "COL0"])
def _vq_dequant_kernel(w_ptr, packed_ptr, cb_ptr, rcb_ptr, perm_ptr, scale_ptr, wbias_ptr,
                       OUT, IN, N_ROWS, GS, NCOLS, W_WORDS, K, KR, G_LAST, COL0,
                       V: tl.constexpr, VP: tl.constexpr, TB: tl.constexpr, IB: tl.constexpr,
                       RB: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_PERM: tl.constexpr,
                       HAS_NORM: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """W (OUT, IN) <- one segment's columns [COL0, COL0 + NCOLS), grid (cdiv(N_ROWS, R), cdiv(NCOLS, C))."""
    # 1. this program's tile: BLOCK_R vector rows x BLOCK_C stored columns
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (C,)
    cmask = cols < NCOLS
    mask = cmask[:, None] & (rows < N_ROWS)[None, :]  # (C, R)
    # 2. decode + gather (+ residual)
    cw = _codewords(packed_ptr, cb_ptr, rcb_ptr, rows, cols, mask, N_ROWS, GS, W_WORDS, K, KR, G_LAST,
                    VP, TB, IB, RB, ONE_GROUP)  # (C, R, VP) fp32
    # 3. stored column -> original column, then the per-column norm
    scol = COL0 + cols  # (C,)
    if HAS_PERM:
        ocol = tl.load(perm_ptr + scol, mask=cmask, other=0)  # (C,)
    else:
        ocol = scol
    if HAS_NORM:
        s = tl.load(scale_ptr + ocol, mask=cmask, other=0.0)  # (C,) fp32
        b = tl.load(wbias_ptr + ocol, mask=cmask, other=0.0)
        cw = cw * s[:, None, None] + b[:, None, None]
    # 4. scatter into W[o, ocol], o = r * V + lane (padding lanes and rows masked)
    lanes = tl.arange(0, VP)
    o = rows[None, :, None] * V + lanes[None, None, :]  # (1, R, VP)
    ok = mask[:, :, None] & (lanes < V)[None, None, :] & (o < OUT)  # (C, R, VP)
    ptrs = w_ptr + o.to(tl.int64) * IN + ocol[:, None, None]
    _store(ptrs, cw, ok, BF16_BITS)


# ---------------------------------------------------------------------------------- launch
DEQUANT_CONFIG = {"BLOCK_R": 16, "BLOCK_C": 32, "num_warps": 4}  # fixed: prefill time is the matmul's
INTERPRET_DEQUANT_CONFIG = {"BLOCK_R": 16, "BLOCK_C": 32, "num_warps": 1}


def _launch_segment(W: torch.Tensor, kw: KernelWeight, seg: Segment, cfg: dict) -> None:
    R, C = cfg["BLOCK_R"], cfg["BLOCK_C"]
    grid = (triton.cdiv(seg.rows, R), triton.cdiv(seg.ncols, C))
    dummy = seg.packed
    bf16 = W.dtype == torch.bfloat16
    _vq_dequant_kernel[grid](
        W.view(torch.int16) if bf16 else W, seg.packed, seg.codebook, seg.res_codebook if seg.res_codebook is not None else seg.codebook,
        kw.perm if kw.perm is not None else dummy, kw.scale if kw.scale is not None else dummy,
        kw.wbias if kw.wbias is not None else dummy,
        kw.out_features, kw.in_features, seg.rows, seg.group_size, seg.ncols, seg.words, seg.k,
        max(seg.k_res, 1), seg.groups - 1, seg.col0,
        V=seg.v, VP=seg.vp, TB=seg.total_bits, IB=seg.index_bits, RB=seg.res_bits,
        ONE_GROUP=seg.groups == 1, HAS_PERM=kw.perm is not None, HAS_NORM=kw.scale is not None,
        BF16_BITS=bf16, BLOCK_R=R, BLOCK_C=C, num_warps=cfg["num_warps"], enable_fp_fusion=False)


def dequantize(kw: KernelWeight, dtype: torch.dtype = torch.float16, config: Optional[dict] = None) -> torch.Tensor:
    """The dense (out, in) weight in `dtype`, from the packed stream(s). Exact vs the reference."""
    cfg = config or (INTERPRET_DEQUANT_CONFIG if INTERPRET else DEQUANT_CONFIG)
    W = torch.empty(kw.out_features, kw.in_features, dtype=dtype, device=kw.device)
    _launch_segment(W, kw, kw.main, cfg)
    if kw.outlier is not None:
        _launch_segment(W, kw, kw.outlier, cfg)
    return W


# ---------------------------------------------------------------------------------- reference
def _segment_reference(seg: Segment, out_features: int) -> torch.Tensor:
    """(out, G*gs) fp32 from the packed stream (unpack, gather, lay vectors along rows)."""
    idx, res = unpack_stream(seg.packed, seg.index_bits, seg.group_size, seg.res_bits)  # (G, n, gs)
    g = torch.arange(seg.groups, device=idx.device)[:, None, None]
    vec = seg.codebook.float()[g, idx][..., :seg.v]  # (G, n, gs, v)
    if res is not None:
        vec = vec + seg.res_codebook.float()[g, res][..., :seg.v]
    Wg = vec.permute(0, 1, 3, 2).reshape(seg.groups, seg.rows * seg.v, seg.group_size)  # (G, n*v, gs)
    return Wg.permute(1, 0, 2).reshape(seg.rows * seg.v, seg.ncols)[:out_features]  # (out, G*gs)


def dequantize_reference(kw: KernelWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch dequantization of the kernel buffers (the oracle of `dequantize`)."""
    W = _segment_reference(kw.main, kw.out_features)
    if kw.outlier is not None:
        W = torch.cat([_segment_reference(kw.outlier, kw.out_features), W], dim=1)  # (out, in) stored order
    if kw.perm is not None:
        W = W[:, torch.argsort(kw.perm.long())]
    if kw.scale is not None:
        W = W * kw.scale[None, :] + kw.wbias[None, :]
    return W.to(dtype)
