"""Fused dequantize-GEMV for decode (1-16 tokens), and its torch reference.

    y[b, o] = sum_j Wp[o, j] * xp[b, j] + c[b] + bias[o]

computed straight from the packed index stream (`layout.py`): each program owns BLOCK_R vector
rows (BLOCK_R * v outputs) and a span of stored columns; per BLOCK_C columns it decodes the
merged indices, gathers the codewords (the codebooks stay on chip: L1/L2-resident; Triton has
no explicit shared-memory gather) and accumulates in fp32; the dense weight is never written.
Any v (padded to VP = next_pow2(v) with masks), any codebook size up to 32 merged index bits,
residual codebooks, groups, and outlier columns (a second launch over their own stream).

The permutation and the norm act on x instead of W (VPTQ stores W = W'[:, perm] * s + b):
    xp[b, j] = x[b, perm[j]] * s[perm[j]]      (x permuted and scaled, fp32)
    c[b]     = sum_i x[b, i] * bias_norm[i]     (the norm's bias is one dot per token)

Three kernels:
  * `_vq_gemv1_kernel`, one token: a (C, R, VP) tile of fp32 products per step (one per column,
    row, lane), summed over the columns once at the end: no reduction inside the loop. Each
    index costs two int32 word loads and a variable funnel shift (measured on an H200).
  * `_vq_gemvp_kernel`, 1-4 tokens, reading the same indices as bit planes (`layout.pack_planes`):
    one vector load per plane for a run of BLOCK_C indices and constant shifts. Static SASS
    counts for sm_90 (benchmarks/kernel_sass.py, docs/benchmarks.md): with Triton 3.9, 1.3-1.6x
    fewer instructions per index than `_vq_gemv1_kernel` at one token (3.9 compiles that one
    worse than 3.6 did); with 3.6 level at one token, 1.2-1.7x fewer at 4 tokens. Its throughput
    has not been measured on a GPU yet, so the tuner times it beside the packed kernels and keeps
    the faster (`dispatch.gemv_candidates`, config "PLANES").
  * `_vq_gemvn_kernel`, 2-16 tokens: an (R, C, VP) tile whose index words for the next step are
    loaded before this step's codewords are gathered; 2-4 tokens keep one register accumulator
    each (the decoded codewords are reused by every token), more tokens (or DOT) use tl.dot on
    fp32 operands: tf32 tensor cores for fp16/bf16 activations (float16 codewords and fp16/bf16
    activations are exact in tf32; a residual sum or a scaled x rounds to tf32), full fp32
    ("ieee") for fp32 activations.
SPLIT > 1 splits the columns over programs that add into an fp32 output (atomics), then a cast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import triton
import triton.language as tl

from vptq.kernels.dequant import INTERPRET, _codewords, _store, dequantize_reference
from vptq.kernels.layout import KernelWeight, Segment, next_pow2, plane_widths

MAX_TOKENS = 16  # the dispatch sends more tokens to dequantize + matmul


# --------------------------------------------- helpers of the 2-16-token kernel: an (R, C) tile,
# loaded and decoded in two steps so the next step's words can be in flight (measured with these
# eviction hints; the one-token kernel uses dequant._codewords, without them)
@triton.jit
def _group_col(cols, GS, G_LAST, ONE_GROUP: tl.constexpr):
    """cols (C,) segment columns -> (group (C,), column inside the group (C,))."""
    if ONE_GROUP:
        return cols * 0, cols
    g = tl.minimum(cols // GS, G_LAST)
    return g, cols - g * GS


@triton.jit
def _words(packed_ptr, rows, cols, mask, N_ROWS, GS, W_WORDS, G_LAST,
           TB: tl.constexpr, ONE_GROUP: tl.constexpr):
    """rows (R,) vector rows, cols (C,) segment columns, mask (R, C) -> (w0, w1) uint32 (R, C):
    the int32 word holding each merged index's first bit, and the next one (w0 again when no
    index can straddle two words)."""
    g, cg = _group_col(cols, GS, G_LAST, ONE_GROUP)
    word = (cg * TB) >> 5  # (C,)
    row = g[None, :] * N_ROWS + rows[:, None]  # (R, C) stream row (g, r)
    wp = packed_ptr + row * W_WORDS + word[None, :]  # (R, C)
    # the stream is read once: evict it first, keep the codebooks cached
    w0 = tl.load(wp, mask=mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    if (32 % TB) != 0:  # an index may straddle two words: its high bits are in the next one
        w1 = tl.load(wp + 1, mask=mask & ((word + 1) < W_WORDS)[None, :], other=0,
                     eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    else:
        w1 = w0
    return w0, w1


@triton.jit
def _decode(cb_ptr, rcb_ptr, w0, w1, cols, GS, K, KR, G_LAST,
            VP: tl.constexpr, TB: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr, ONE_GROUP: tl.constexpr):
    """(w0, w1) (R, C) from `_words` -> codewords (R, C, VP) fp32 (+ the residual codeword).

    Masked-off entries (w0 = w1 = 0) decode as index 0, a valid address; callers mask their effect."""
    g, cg = _group_col(cols, GS, G_LAST, ONE_GROUP)
    sh = ((cg * TB) & 31).to(tl.uint32)[None, :]  # (1, C) first bit inside w0
    if (32 % TB) != 0:
        m = (w0 >> sh) | ((w1 << 1) << (31 - sh))  # (R, C); <<1<<(31-s) avoids a shift by 32
    else:
        m = w0 >> sh
    idx = (m & ((1 << IB) - 1)).to(tl.int32)  # (R, C) main index
    lanes = tl.arange(0, VP)  # (VP,)
    crow = g[None, :] * K + idx  # (R, C) codebook row; one VP-wide vector load per codeword
    cw = tl.load(cb_ptr + crow[:, :, None] * VP + lanes[None, None, :],
                 eviction_policy="evict_last").to(tl.float32)  # (R, C, VP)
    if RB > 0:
        ridx = ((m >> IB) & ((1 << RB) - 1)).to(tl.int32)  # (R, C) residual index
        rrow = g[None, :] * KR + ridx
        cw = cw + tl.load(rcb_ptr + rrow[:, :, None] * VP + lanes[None, None, :],
                          eviction_policy="evict_last").to(tl.float32)
    return cw


# ---------------------------------------------------------------------------------- one token
@triton.jit(do_not_specialize=["OUT", "N_ROWS", "GS", "NCOLS", "W_WORDS", "K", "KR", "G_LAST", "X_COL0", "SPAN"])
def _vq_gemv1_kernel(x_ptr, y_ptr, packed_ptr, cb_ptr, rcb_ptr, bias_ptr, c_ptr,
                     OUT, N_ROWS, GS, NCOLS, W_WORDS, K, KR, G_LAST, X_COL0, SPAN,
                     V: tl.constexpr, VP: tl.constexpr, TB: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr,
                     ONE_GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, BF16_BITS: tl.constexpr):
    """One token. grid (cdiv(N_ROWS, BLOCK_R), SPLIT): rows block x column span [pid_s*SPAN, +SPAN)."""
    # 1. this program's vector rows and column span
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    rmask = rows < N_ROWS
    c_lo = pid_s * SPAN
    c_hi = tl.minimum(c_lo + SPAN, NCOLS)
    offs_c = tl.arange(0, BLOCK_C)  # (C,)
    acc = tl.zeros((BLOCK_C, BLOCK_R, VP), dtype=tl.float32)  # one product per column, row, lane
    # 2. stream the packed indices, BLOCK_C columns at a time
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + offs_c  # (C,)
        cmask = cols < c_hi
        mask = cmask[:, None] & rmask[None, :]  # (C, R)
        cw = _codewords(packed_ptr, cb_ptr, rcb_ptr, rows, cols, mask, N_ROWS, GS, W_WORDS, K, KR, G_LAST,
                        VP, TB, IB, RB, ONE_GROUP)  # (C, R, VP) fp32
        xv = tl.load(x_ptr + X_COL0 + cols, mask=cmask, other=0.0).to(tl.float32)  # (C,); 0 off-span
        acc += cw * xv[:, None, None]  # (C, R, VP)
    # 3. epilogue: outputs o = r * V + lane; bias and the norm's per-token constant once (span 0)
    res = tl.sum(acc, axis=0)  # (R, VP): the column sum, once
    lane = tl.arange(0, VP)
    o = rows[:, None] * V + lane[None, :]  # (R, VP)
    ok = (lane[None, :] < V) & (o < OUT)
    if HAS_BIAS:
        res += tl.load(bias_ptr + o, mask=ok & (o * 0 + pid_s == 0), other=0.0).to(tl.float32)
    if HAS_C:
        res += tl.where(pid_s == 0, tl.load(c_ptr), 0.0)
    if ATOMIC:
        tl.atomic_add(y_ptr + o, res, mask=ok, sem="relaxed")
    else:
        _store(y_ptr + o, res, ok, BF16_BITS)


# ----------------------------------------------------------------- 1-4 tokens, bit planes: decode
@triton.jit
def _plane(prow, cg0, rmask, POFF16, W: tl.constexpr, C: tl.constexpr):
    """(R, C) uint32 entries [cg0, cg0 + C) of one W-bit plane; prow (R, 1) byte pointers to the
    rows' plane area, POFF16 this plane's offset in 16-byte units; cg0 % C == 0, C >= 8 // W."""
    pb = prow + POFF16 * 16
    if W >= 8:  # one W-bit word per entry: a contiguous (vectorized) load
        cols = cg0 + tl.arange(0, C)
        if W == 8:
            v = tl.load(pb + cols[None, :], mask=rmask[:, None], other=0).to(tl.uint32)
        elif W == 16:
            v = tl.load(pb.to(tl.pointer_type(tl.uint16)) + cols[None, :], mask=rmask[:, None], other=0).to(tl.uint32)
        else:
            v = tl.load(pb.to(tl.pointer_type(tl.uint32)) + cols[None, :], mask=rmask[:, None], other=0)
    else:  # 8 // W entries per byte: load C // PER bytes, split each with constant shifts
        PER: tl.constexpr = 8 // W
        b = cg0 // PER + tl.arange(0, C // PER)
        byt = tl.load(pb + b[None, :], mask=rmask[:, None], other=0).to(tl.uint32)  # (R, C/PER)
        sh = (tl.arange(0, PER) * W).to(tl.uint32)
        v = tl.reshape((byt[:, :, None] >> sh[None, None, :]) & ((1 << W) - 1), (byt.shape[0], C))
    return v


@triton.jit
def _planes_merged(prow, cg0, rmask, GS_BYTES, TB: tl.constexpr, C: tl.constexpr):
    """(R, C) uint32 merged TB-bit indices from the bit planes (layout.pack_planes): planes of
    the binary digits of TB, widest first, each shifted to its bit offset and or-ed."""
    m = tl.zeros((prow.shape[0], C), dtype=tl.uint32)
    poff = GS_BYTES * 0  # 16-byte units of the planes before this one
    for i in tl.static_range(6):  # widths 32, 16, 8, 4, 2, 1
        if (TB & (32 >> i)) != 0:
            pv = _plane(prow, cg0, rmask, poff, 32 >> i, C)
            if (TB & ~((64 >> i) - 1)) == 0:  # the plane's bit offset: the wider planes' bits
                m = m | pv
            else:
                m = m | (pv << (TB & ~((64 >> i) - 1)))
            poff += (GS_BYTES * (32 >> i) + 127) // 128
    return m


# ------------------------------------------------------------------------ shared epilogue
@triton.jit
def _token_out(acc, y_ptr, bias_ptr, c_ptr, t, rows, pid_s, OUT, stride_y,
               V: tl.constexpr, VP: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_C: tl.constexpr, BF16_BITS: tl.constexpr):
    """Epilogue of one token: acc (R, C, VP) products -> y[t, r*V + lane] (+ bias, + c[t] on span 0)."""
    res = tl.sum(acc, axis=1)  # (R, VP): the column sum, once
    lane = tl.arange(0, VP)
    o = rows[:, None] * V + lane[None, :]  # (R, VP)
    ok = (lane[None, :] < V) & (o < OUT)
    if HAS_BIAS:
        res += tl.load(bias_ptr + o, mask=ok & (o * 0 + pid_s == 0), other=0.0).to(tl.float32)
    if HAS_C:
        res += tl.where(pid_s == 0, tl.load(c_ptr + t), 0.0)
    ptrs = y_ptr + t * stride_y + o
    if ATOMIC:
        tl.atomic_add(ptrs, res, mask=ok, sem="relaxed")
    else:
        _store(ptrs, res, ok, BF16_BITS)


@triton.jit
def _tokens_out(acc0, acc1, acc2, acc3, y_ptr, bias_ptr, c_ptr, rows, pid_s, OUT, stride_y,
                V: tl.constexpr, VP: tl.constexpr, BP: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_C: tl.constexpr, BF16_BITS: tl.constexpr):
    """`_token_out` for tokens 0..BP-1 of the elementwise kernels (one accumulator each)."""
    _token_out(acc0, y_ptr, bias_ptr, c_ptr, 0, rows, pid_s, OUT, stride_y, V, VP, ATOMIC, HAS_BIAS, HAS_C, BF16_BITS)
    if BP >= 2:
        _token_out(acc1, y_ptr, bias_ptr, c_ptr, 1, rows, pid_s, OUT, stride_y, V, VP, ATOMIC, HAS_BIAS, HAS_C,
                   BF16_BITS)
    if BP >= 3:
        _token_out(acc2, y_ptr, bias_ptr, c_ptr, 2, rows, pid_s, OUT, stride_y, V, VP, ATOMIC, HAS_BIAS, HAS_C,
                   BF16_BITS)
    if BP >= 4:
        _token_out(acc3, y_ptr, bias_ptr, c_ptr, 3, rows, pid_s, OUT, stride_y, V, VP, ATOMIC, HAS_BIAS, HAS_C,
                   BF16_BITS)


@triton.jit(do_not_specialize=["B", "OUT", "N_ROWS", "GS", "GS_STEPS", "ROW16", "K", "KR", "X_COL0",
                               "SPAN_STEPS", "N_STEPS", "stride_x", "stride_y"])
def _vq_gemvp_kernel(x_ptr, y_ptr, planes_ptr, cb_ptr, rcb_ptr, bias_ptr, c_ptr,
                     B, OUT, N_ROWS, GS, GS_STEPS, ROW16, K, KR, X_COL0, SPAN_STEPS, N_STEPS, stride_x, stride_y,
                     V: tl.constexpr, VP: tl.constexpr, TB: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr,
                     ONE_GROUP: tl.constexpr, BP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, BF16_BITS: tl.constexpr):
    """BP = B = 1..4 tokens from the bit planes, one (R, C, VP) fp32 accumulator each (the decoded
    codewords are reused by every token). grid (cdiv(N_ROWS, BLOCK_R), SPLIT): rows block x steps
    [pid_s * SPAN_STEPS, +SPAN_STEPS) of BLOCK_C columns; BLOCK_C divides the group size GS
    (GS_STEPS = GS / BLOCK_C), so a step lies in one group and needs no column mask."""
    # 1. this program's vector rows and steps
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    rmask = rows < N_ROWS
    s_lo = pid_s * SPAN_STEPS
    s_hi = tl.minimum(s_lo + SPAN_STEPS, N_STEPS)
    lanes = tl.arange(0, VP)
    acc0 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)  # one product per row, column, lane
    acc1 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)
    for s in range(s_lo, s_hi):
        # 2. decode BLOCK_C merged indices per row from the planes (constant shifts)
        if ONE_GROUP:
            g = 0
            cg0 = s * BLOCK_C
        else:
            g = s // GS_STEPS
            cg0 = (s - g * GS_STEPS) * BLOCK_C
        prow = planes_ptr + ((g * N_ROWS + rows).to(tl.int64) * ROW16 * 16)[:, None]  # (R, 1)
        m = _planes_merged(prow, cg0, rmask, GS, TB, BLOCK_C)  # (R, C)
        # 3. gather the codewords (one VP-wide vector load each) and accumulate
        idx = (m & ((1 << IB) - 1)).to(tl.int32)
        cbg = cb_ptr + g * K * VP  # this group's codebook
        cw = tl.load(cbg + (idx.to(tl.int64) * VP)[:, :, None] + lanes[None, None, :]).to(tl.float32)  # (R, C, VP)
        if RB > 0:
            ridx = ((m >> IB) & ((1 << RB) - 1)).to(tl.int32)
            rcbg = rcb_ptr + g * KR * VP
            cw = cw + tl.load(rcbg + (ridx.to(tl.int64) * VP)[:, :, None] + lanes[None, None, :]).to(tl.float32)
        xrow = x_ptr + X_COL0 + s * BLOCK_C + tl.arange(0, BLOCK_C)  # (C,) token 0
        acc0 += cw * tl.load(xrow).to(tl.float32)[None, :, None]
        if BP >= 2:
            acc1 += cw * tl.load(xrow + stride_x).to(tl.float32)[None, :, None]
        if BP >= 3:
            acc2 += cw * tl.load(xrow + 2 * stride_x).to(tl.float32)[None, :, None]
        if BP >= 4:
            acc3 += cw * tl.load(xrow + 3 * stride_x).to(tl.float32)[None, :, None]
    # 4. epilogue per token: the column sum once, bias and the norm's constant on span 0
    _tokens_out(acc0, acc1, acc2, acc3, y_ptr, bias_ptr, c_ptr, rows, pid_s, OUT, stride_y, V, VP, BP, ATOMIC,
                HAS_BIAS, HAS_C, BF16_BITS)


# ---------------------------------------------------------------------------------- 2-16 tokens
# shape integers are not specialized: one binary per block configuration serves every layer shape
@triton.jit(do_not_specialize=["B", "OUT", "N_ROWS", "GS", "NCOLS", "W_WORDS", "K", "KR", "G_LAST", "X_COL0", "SPAN",
                               "stride_x", "stride_y"])
def _vq_gemvn_kernel(x_ptr, y_ptr, packed_ptr, cb_ptr, rcb_ptr, bias_ptr, c_ptr,
                    B, OUT, N_ROWS, GS, NCOLS, W_WORDS, K, KR, G_LAST, X_COL0, SPAN, stride_x, stride_y,
                    V: tl.constexpr, VP: tl.constexpr, TB: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr,
                    ONE_GROUP: tl.constexpr, BP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    USE_DOT: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr,
                    BF16_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """2-16 tokens. grid (cdiv(N_ROWS, BLOCK_R), SPLIT): rows block x column span [pid_s*SPAN, +SPAN).

    Elementwise path (USE_DOT=False): BP = B = 1..4 tokens, one (R, C, VP) fp32 accumulator each.
    Dot path: BP = next_pow2(B) >= 16 padded tokens, a (R*VP, BP) accumulator."""
    # 1. this program's vector rows and column span
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    rmask = rows < N_ROWS
    c_lo = pid_s * SPAN
    c_hi = tl.minimum(c_lo + SPAN, NCOLS)
    acc0 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)  # products of token 0, summed over C at the end
    acc1 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_R, BLOCK_C, VP), dtype=tl.float32)
    if USE_DOT:
        toks = tl.arange(0, BP)  # (BP,) padded tokens
        accd = tl.zeros((BLOCK_R * VP, BP), dtype=tl.float32)
    # 2. stream the packed indices BLOCK_C columns at a time; the next step's words are loaded
    #    before this step's codewords are gathered, so their DRAM latency hides behind the math
    cols = c_lo + tl.arange(0, BLOCK_C)  # (C,)
    w0, w1 = _words(packed_ptr, rows, cols, rmask[:, None] & (cols < c_hi)[None, :], N_ROWS, GS, W_WORDS, G_LAST,
                    TB, ONE_GROUP)  # (R, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        ncols = cols + BLOCK_C
        nw0, nw1 = _words(packed_ptr, rows, ncols, rmask[:, None] & (ncols < c_hi)[None, :], N_ROWS, GS, W_WORDS,
                          G_LAST, TB, ONE_GROUP)
        cw = _decode(cb_ptr, rcb_ptr, w0, w1, cols, GS, K, KR, G_LAST, VP, TB, IB, RB, ONE_GROUP)  # (R, C, VP)
        cmask = cols < c_hi
        xrow = x_ptr + X_COL0 + cols  # (C,) token 0; masked columns read as 0
        if USE_DOT:
            xt = tl.load(xrow[None, :] + toks[:, None] * stride_x, mask=(toks < B)[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)  # (BP, C)
            wt = tl.reshape(tl.permute(cw, (0, 2, 1)), (BLOCK_R * VP, BLOCK_C))  # (R*VP, C)
            accd += tl.dot(wt, tl.trans(xt), input_precision=DOT_PRECISION)  # (R*VP, BP)
        else:
            acc0 += cw * tl.load(xrow, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
            if BP >= 2:
                acc1 += cw * tl.load(xrow + stride_x, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
            if BP >= 3:
                acc2 += cw * tl.load(xrow + 2 * stride_x, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
            if BP >= 4:
                acc3 += cw * tl.load(xrow + 3 * stride_x, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
        cols, w0, w1 = ncols, nw0, nw1
    # 3. epilogue: outputs o = r * V + lane; bias and the norm's per-token constant once (span 0)
    if USE_DOT:
        lane = tl.arange(0, VP)
        res = tl.permute(tl.reshape(accd, (BLOCK_R, VP, BP)), (2, 0, 1))  # (BP, R, VP)
        o = rows[:, None] * V + lane[None, :]  # (R, VP)
        omask = (lane[None, :] < V) & (o < OUT)
        if HAS_BIAS:
            res += tl.load(bias_ptr + o, mask=omask & (o * 0 + pid_s == 0), other=0.0).to(tl.float32)[None, :, :]
        if HAS_C:
            res += tl.load(c_ptr + toks, mask=(toks < B) & (toks * 0 + pid_s == 0), other=0.0)[:, None, None]
        ptrs = y_ptr + toks[:, None, None] * stride_y + o[None, :, :]  # (BP, R, VP)
        ok = (toks < B)[:, None, None] & omask[None, :, :]
        if ATOMIC:
            tl.atomic_add(ptrs, res, mask=ok, sem="relaxed")
        else:
            _store(ptrs, res, ok, BF16_BITS)
    else:
        _tokens_out(acc0, acc1, acc2, acc3, y_ptr, bias_ptr, c_ptr, rows, pid_s, OUT, stride_y, V, VP, BP, ATOMIC,
                    HAS_BIAS, HAS_C, BF16_BITS)


# ---------------------------------------------------------------------------------- launch
DEFAULT_CONFIG = {"BLOCK_R": 4, "BLOCK_C": 64, "SPLIT": 1, "num_warps": 4, "num_stages": 2}  # one token
DEFAULT_CONFIG_N = {"BLOCK_R": 8, "BLOCK_C": 32, "SPLIT": 1, "num_warps": 4, "num_stages": 2, "DOT": False}
# interpreter: few, large programs (its cost is per program instance and per op, not per element);
# 1-4 tokens from the bit planes, so the harness tests run that kernel (test_kernels runs both)
INTERPRET_CONFIG = {"BLOCK_R": 16, "BLOCK_C": 32, "SPLIT": 2, "num_warps": 1, "num_stages": 1, "DOT": False,
                    "PLANES": True}
MAX_TILE = 8192  # fp32 products held per program (2-4 tokens: tokens * R * C * VP), per 4 warps
MAX_ELEMENTWISE_TOKENS = 4  # one register accumulator per token; more tokens take the tl.dot path


def default_config(tokens: int) -> dict:
    if INTERPRET:
        return INTERPRET_CONFIG
    return DEFAULT_CONFIG if tokens == 1 else DEFAULT_CONFIG_N


def tile(cfg: dict, tokens: int, vp: int) -> tuple:
    """(BLOCK_R, BLOCK_C, BP, use_dot) actually launched for this config, token count and VP.

    One token: as configured. 2-4 tokens: BP = tokens accumulators of R * C * VP fp32 products;
    C, then R, shrink to fit MAX_TILE. tl.dot (DOT, or more than 4 tokens): every dim >= 16."""
    R, C = cfg["BLOCK_R"], cfg["BLOCK_C"]
    if tokens == 1:
        return R, C, 1, False
    use_dot = tokens > MAX_ELEMENTWISE_TOKENS or (bool(cfg.get("DOT")) and tokens > 1)
    if use_dot:
        return max(R, triton.cdiv(16, vp)), max(C, 16), max(16, next_pow2(tokens)), True
    limit = MAX_TILE * max(1, cfg["num_warps"] // 4)
    while tokens * R * C * vp > limit and C > 16:
        C //= 2
    while tokens * R * C * vp > limit and R > 1:
        R //= 2
    return R, C, tokens, False


def prepare_x(kw: KernelWeight, x: torch.Tensor):
    """x (B, in) -> (xp (B, in) in stored column order, c (B,) fp32 or None).

    Without perm and norm x is used as is (its own dtype); otherwise xp is fp32.
    """
    c = None
    if kw.scale is None and kw.perm is None:
        return x, c
    xf = x.float()
    if kw.scale is not None:
        c = (xf @ kw.wbias).contiguous()  # (B,)
        xf = xf * kw.scale[None, :]
    if kw.perm is not None:
        xf = xf[:, kw.perm.long()]
    return xf.contiguous(), c


def plane_block_c(seg: Segment, block_c: int) -> Optional[int]:
    """Columns per step of the bit-plane kernel for this segment: block_c halved until it divides
    the group size (a step must not straddle groups), and >= the entries per byte of its
    narrowest plane; None where no such size exists (the packed-stream kernel takes it)."""
    min_c = max([8 // w for w in plane_widths(seg.total_bits) if w < 8] + [1])
    c = block_c
    while c > min_c and seg.group_size % c:
        c //= 2
    return c if seg.group_size % c == 0 and c >= min_c else None


@dataclass(frozen=True)
class Launch:
    """What one segment's launch looks like for a config and token count."""
    planes: bool  # the bit-plane kernel (1-4 tokens; else the packed-stream kernels)
    R: int
    C: int
    BP: int
    use_dot: bool
    split: int  # programs along the columns
    span: int  # columns (packed) or steps of C columns (planes) per program


def plan(seg: Segment, cfg: dict, tokens: int) -> Launch:
    R, C, BP, use_dot = tile(cfg, tokens, seg.vp)
    if cfg.get("PLANES") and not use_dot:  # 1-4 tokens
        pc = plane_block_c(seg, C)
        if pc is not None:
            n_steps = seg.ncols // pc
            span = triton.cdiv(n_steps, max(1, min(cfg["SPLIT"], n_steps)))
            return Launch(True, R, pc, BP, False, triton.cdiv(n_steps, span), span)
    split = max(1, min(cfg["SPLIT"], triton.cdiv(seg.ncols, C)))
    span = triton.cdiv(triton.cdiv(seg.ncols, split), C) * C
    return Launch(False, R, C, BP, use_dot, triton.cdiv(seg.ncols, span), span)


def _launch_segment(y, xp, kw: KernelWeight, seg: Segment, cfg: dict, atomic: bool, bias, c, epilogue: bool,
                    precision: str):
    B = xp.shape[0]
    L = plan(seg, cfg, B)
    grid = (triton.cdiv(seg.rows, L.R), L.split)
    dummy = seg.packed
    has_bias = epilogue and bias is not None
    has_c = epilogue and c is not None
    bf16 = y.dtype == torch.bfloat16
    yk = y.view(torch.int16) if bf16 else y
    rcb = seg.res_codebook if seg.res_codebook is not None else seg.codebook
    common = dict(V=seg.v, VP=seg.vp, TB=seg.total_bits, IB=seg.index_bits, RB=seg.res_bits,
                  ONE_GROUP=seg.groups == 1, BLOCK_R=L.R, BLOCK_C=L.C, ATOMIC=atomic, HAS_BIAS=has_bias,
                  HAS_C=has_c, BF16_BITS=bf16, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if L.planes:
        planes = seg.planes
        _vq_gemvp_kernel[grid](
            xp, yk, planes, seg.codebook, rcb, bias if has_bias else dummy, c if has_c else dummy,
            B, kw.out_features, seg.rows, seg.group_size, seg.group_size // L.C, planes.shape[1] // 16, seg.k,
            max(seg.k_res, 1), seg.col0, L.span, seg.ncols // L.C, xp.stride(0), y.stride(0), BP=L.BP, **common)
        return
    if B == 1:
        _vq_gemv1_kernel[grid](
            xp, yk, seg.packed, seg.codebook, rcb, bias if has_bias else dummy, c if has_c else dummy,
            kw.out_features, seg.rows, seg.group_size, seg.ncols, seg.words, seg.k, max(seg.k_res, 1),
            seg.groups - 1, seg.col0, L.span, **common)
        return
    _vq_gemvn_kernel[grid](
        xp, yk, seg.packed, seg.codebook, rcb, bias if has_bias else dummy, c if has_c else dummy,
        B, kw.out_features, seg.rows, seg.group_size, seg.ncols, seg.words, seg.k, max(seg.k_res, 1),
        seg.groups - 1, seg.col0, L.span, xp.stride(0), y.stride(0),
        BP=L.BP, USE_DOT=L.use_dot, DOT_PRECISION=precision, **common)


def needs_atomic(kw: KernelWeight, cfg: dict, tokens: int) -> bool:
    return kw.outlier is not None or plan(kw.main, cfg, tokens).split > 1


def gemv(kw: KernelWeight, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config: Optional[dict] = None) -> torch.Tensor:
    """x (B, in), B <= 16, fp16/bf16/fp32 -> y (B, out) in x.dtype; never writes the dense weight."""
    if x.dim() != 2 or x.shape[1] != kw.in_features:
        raise ValueError(f"x shape {tuple(x.shape)}: expected (tokens, {kw.in_features})")
    if not 1 <= x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"gemv takes 1..{MAX_TOKENS} tokens, got {x.shape[0]}")
    cfg = config or default_config(x.shape[0])
    x = x.contiguous()
    xp, c = prepare_x(kw, x)
    B = x.shape[0]
    atomic = needs_atomic(kw, cfg, B)
    if atomic:  # partial sums from several programs / segments meet in an fp32 buffer
        y = torch.zeros(B, kw.out_features, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(B, kw.out_features, dtype=x.dtype, device=x.device)
    bias = None if bias is None else bias.contiguous()
    # float32 activations: an exact fp32 dot; fp16/bf16 ones are exact in tf32 (as are float16 codewords)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _launch_segment(y, xp, kw, kw.main, cfg, atomic, bias, c, True, precision)
    if kw.outlier is not None:
        _launch_segment(y, xp, kw, kw.outlier, {**cfg, "SPLIT": 1}, True, bias, c, False, precision)
    return y.to(x.dtype) if atomic else y


# ---------------------------------------------------------------------------------- reference
def gemv_reference(kw: KernelWeight, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch: dequantize the packed buffers in fp32 and multiply in fp32; y in x.dtype."""
    W = dequantize_reference(kw, torch.float32)  # (out, in)
    y = x.float() @ W.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
