"""The kernel-side buffers of a `VQWeight`: packed index streams and padded codebooks.

Built once per weight (and device) the first time a Triton kernel runs on it, cached on the
`QuantLinear`; the `VQWeight` itself (unpacked int64 indices, the torch reference) is untouched.

Index streams use the official VPTQ packed layout (microsoft/VPTQ v0.0.5.post1 `pack_index`;
our `vptq.pack` writes the same bits): for one (group g, vector row r) the group_size merged
indices m_j = (res_j << b) | idx_j (t = b + b' bits each) follow one another in a little-endian
bit stream, stream bit q in int32 word q // 32 at bit q % 32:

    packed (G, n, W) int32,  W = ceil(group_size * t / 32),  n = ceil(out / v)

`pack_stream` below is a general writer of that layout (no restriction from the official
unpacker's quirks, which `vptq.pack.check_packable` enforces for files: the kernels read the
stream themselves); tests check it is bit-identical to `vptq.pack.pack_indices`.

Codebooks are zero-padded from v to VP = next_pow2(v) entries per codeword so that one codeword
is one aligned vector load (v=6 -> 8 halves = 16 bytes):

    codebook (G, k, VP)  in the stored dtype (float16)

The outlier columns (their own codebook, vector length v_o; stored unpacked in the official
format) become a second stream in the same layout, so one kernel serves both.

Bit planes (`pack_planes`, read by the one-token GEMV's plane kernel, built on first use): the
same merged indices, split by the binary digits of t into planes of w in {32, 16, 8, 4, 2, 1} bits
(t = 12 -> an 8-bit plane of bits 0-7 and a 4-bit plane of bits 8-11). Each plane is a plain
array of w-bit entries (w >= 8: little-endian words; w < 8: 8 / w entries per byte, entry j in
byte j // (8 / w) at bit (j % (8 / w)) * w), so a kernel loads a run of indices with one vector
load per plane and decodes them with constant shifts, instead of two word loads and a variable
funnel shift per index. Same bits as the packed stream, plus each plane's row padded to 16 bytes:

    planes (G * n, ROW) uint8, row g * n + r = [plane w1 | plane w2 | ...] (w decreasing),
    plane w occupying ceil(gs * w / 128) * 16 bytes
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from vptq.qweight import KernelLayout, Unsupported  # noqa: F401  (Unsupported re-exported: vptq.kernels)

MAX_TOTAL_BITS = 32  # one merged index spans at most two int32 words
MAX_VECTOR_LEN = 64  # VP = next_pow2(v) codeword lanes held in registers per index


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def bits_for(k: int) -> int:
    """Bits of one index into a codebook of k entries (ceil(log2 k); 0 for k == 1)."""
    return int(math.ceil(math.log2(k))) if k > 1 else 0


def pack_stream(indices: torch.Tensor, index_bits: int, res_indices: Optional[torch.Tensor] = None,
                res_bits: int = 0) -> torch.Tensor:
    """(..., gs) indices (+ residual indices) -> (..., W) int32 in the official packed layout."""
    t = index_bits + (res_bits if res_indices is not None else 0)
    if not 1 <= t <= MAX_TOTAL_BITS:
        raise Unsupported(f"index bits {t} outside 1..{MAX_TOTAL_BITS}")
    m = indices.to(torch.int64)  # (..., gs)
    if res_indices is not None:
        m = m | (res_indices.to(torch.int64) << index_bits)
    gs = m.shape[-1]
    W = -(-gs * t // 32)
    offset = torch.arange(gs, device=m.device, dtype=torch.int64) * t  # (gs,) first bit of element j
    word = (offset // 32).expand_as(m)
    shifted = m << (offset % 32)  # < 2^63 since t <= 32, shift <= 31
    out = torch.zeros(*m.shape[:-1], W + 1, dtype=torch.int64, device=m.device)  # one spill word
    out.scatter_add_(-1, word, shifted & 0xFFFFFFFF)  # bits are disjoint: add == or
    out.scatter_add_(-1, word + 1, shifted >> 32)
    out = out[..., :W]  # (..., W) in [0, 2^32)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_stream(packed: torch.Tensor, index_bits: int, group_size: int, res_bits: int = 0):
    """Inverse of `pack_stream`: (..., W) int32 -> (indices (..., gs) int64, res or None)."""
    t = index_bits + res_bits
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (..., W)
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)  # (..., W+1)
    offset = torch.arange(group_size, device=packed.device, dtype=torch.int64) * t
    word, shift = offset // 32, offset % 32
    both = words[..., word] | (words[..., word + 1] << 32)  # (..., gs) < 2^64 as int64 bits
    m = (both >> shift) & ((1 << t) - 1)  # arithmetic shift is fine: t + shift <= 63
    idx = m & ((1 << index_bits) - 1)
    res = (m >> index_bits) if res_bits else None
    return idx, res


def plane_widths(t: int) -> list:
    """Plane widths of a t-bit merged index, widest first (its binary digits): 12 -> [8, 4]."""
    return [w for w in (32, 16, 8, 4, 2, 1) if t & w]


def plane_row_bytes(w: int, gs: int) -> int:
    """Bytes of one row of a w-bit plane over gs entries, padded to 16 (an aligned vector load)."""
    return -(-gs * w // 128) * 16


def pack_planes(merged: torch.Tensor, t: int) -> torch.Tensor:
    """(..., gs) merged t-bit indices -> (prod(...), ROW) uint8 bit planes (module docstring)."""
    m = merged.to(torch.int64).reshape(-1, merged.shape[-1])  # (rows, gs)
    rows, gs = m.shape
    parts = []
    for w in plane_widths(t):
        off = t & ~(2 * w - 1)  # bits of the wider planes below this one
        vals = (m >> off) & ((1 << w) - 1)  # (rows, gs)
        if w >= 8:  # little-endian w-bit words
            byts = torch.stack([(vals >> (8 * b)) & 0xFF for b in range(w // 8)], dim=-1).reshape(rows, -1)
        else:  # 8 / w entries per byte
            per = 8 // w
            pad = (-gs) % per
            vals = torch.nn.functional.pad(vals, (0, pad)).reshape(rows, -1, per)
            shifts = torch.arange(per, device=m.device, dtype=torch.int64) * w
            byts = (vals << shifts).sum(-1)  # disjoint bits: sum == or
        rb = plane_row_bytes(w, gs)
        parts.append(torch.nn.functional.pad(byts, (0, rb - byts.shape[1])))
    return torch.cat(parts, dim=1).to(torch.uint8).contiguous()


def unpack_planes(planes: torch.Tensor, t: int, gs: int) -> torch.Tensor:
    """Inverse of `pack_planes`: (rows, ROW) uint8 -> (rows, gs) int64 merged indices."""
    b = planes.to(torch.int64)
    m = torch.zeros(b.shape[0], gs, dtype=torch.int64, device=b.device)
    pos = 0
    for w in plane_widths(t):
        off = t & ~(2 * w - 1)
        rb = plane_row_bytes(w, gs)
        row = b[:, pos:pos + rb]
        if w >= 8:
            nb = w // 8
            byts = row[:, :gs * nb].reshape(-1, gs, nb)
            vals = sum(byts[..., i] << (8 * i) for i in range(nb))
        else:
            per = 8 // w
            j = torch.arange(gs, device=b.device)
            vals = (row[:, j // per] >> ((j % per) * w)) & ((1 << w) - 1)
        m |= vals << off
        pos += rb
    return m


@dataclass(eq=False)
class Segment:
    """One packed index stream with its codebooks: the main columns or the outlier columns.

    packed (G, n, W) int32; codebook (G, k, VP); res_codebook (G, k_r, VP) or None.
    Stored columns [col0, col0 + G*gs) of the (permuted) weight; rows r*v .. r*v+v-1.
    """

    packed: torch.Tensor
    codebook: torch.Tensor
    res_codebook: Optional[torch.Tensor]
    v: int
    k: int
    k_res: int
    index_bits: int
    res_bits: int
    groups: int
    group_size: int
    rows: int  # n = ceil(out / v)
    col0: int
    _planes: Optional[torch.Tensor] = None  # bit planes of the same indices, built on first use

    @property
    def planes(self) -> torch.Tensor:
        """(G * n, ROW) uint8 bit planes of this stream (`pack_planes`), built once from `packed`."""
        if self._planes is None:
            idx, res = unpack_stream(self.packed, self.index_bits, self.group_size, self.res_bits)
            merged = idx if res is None else idx | (res << self.index_bits)
            self._planes = pack_planes(merged, self.total_bits)
        return self._planes

    @property
    def vp(self) -> int:
        return self.codebook.shape[-1]

    @property
    def total_bits(self) -> int:
        return self.index_bits + self.res_bits

    @property
    def words(self) -> int:
        return self.packed.shape[-1]

    @property
    def ncols(self) -> int:
        return self.groups * self.group_size

    def nbytes(self) -> int:
        """Bytes a kernel reads for this segment: packed stream + codebooks as stored (v, not VP)."""
        n = self.packed.numel() * 4
        n += self.codebook.shape[0] * self.k * self.v * self.codebook.element_size()
        if self.res_codebook is not None:
            n += self.res_codebook.shape[0] * self.k_res * self.v * self.res_codebook.element_size()
        return n


@dataclass(eq=False)
class KernelWeight:
    """Everything the Triton kernels read for one weight (all on one device).

    perm (in,) int32: stored column j is original column perm[j] (None: identity).
    scale, wbias (in,) float32 by ORIGINAL column: W = W' * scale + wbias (None: no norm).
    """

    out_features: int
    in_features: int
    main: Segment
    outlier: Optional[Segment]
    perm: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    wbias: Optional[torch.Tensor]
    transposed: bool = False  # holds Wᵀ (a transposed `KernelLayout`, e.g. AQLM): dequantization route only

    @property
    def device(self) -> torch.device:
        return self.main.packed.device

    def nbytes(self) -> int:
        """Bytes of the quantized weight a GEMV must read (packed indices, codebooks, norms, perm)."""
        n = self.main.nbytes() + (self.outlier.nbytes() if self.outlier is not None else 0)
        if self.perm is not None:
            n += self.perm.numel() * 2  # int16 in the official format
        if self.scale is not None:
            n += 2 * self.scale.numel() * 2  # float16 scale + bias
        return n


def _pad_codebook(cb: torch.Tensor, vp: int) -> torch.Tensor:
    """(G, k, v) -> (G, k, VP) zero-padded, contiguous, same dtype."""
    G, k, v = cb.shape
    out = torch.zeros(G, k, vp, dtype=cb.dtype, device=cb.device)
    out[..., :v] = cb
    return out


def _segment(centroids, indices, res_centroids, res_indices, col0: int) -> Segment:
    G, k, v = centroids.shape
    if v > MAX_VECTOR_LEN:
        raise Unsupported(f"vector_len {v} > {MAX_VECTOR_LEN}")
    ib = bits_for(k)
    kr = res_centroids.shape[1] if res_centroids is not None else 0
    rb = bits_for(kr) if res_centroids is not None else 0
    if ib + rb > MAX_TOTAL_BITS or ib + rb == 0:
        raise Unsupported(f"merged index width {ib}+{rb} bits outside 1..{MAX_TOTAL_BITS}")
    if res_centroids is not None and rb == 0:  # a 1-entry residual codebook: fold it into the main one
        centroids = (centroids.float() + res_centroids.float()[:, :1]).to(centroids.dtype)
        res_centroids, res_indices, kr = None, None, 0
    vp = next_pow2(v)
    idx = indices.to(torch.int64)
    packed = pack_stream(idx, ib, None if res_indices is None else res_indices.to(torch.int64),
                         rb).contiguous()  # (G, n, W)
    return Segment(packed=packed, codebook=_pad_codebook(centroids, vp),
                   res_codebook=None if res_centroids is None else _pad_codebook(res_centroids, vp),
                   v=v, k=k, k_res=kr, index_bits=ib, res_bits=rb, groups=G, group_size=idx.shape[-1],
                   rows=idx.shape[1], col0=col0)


def from_vqweight(q) -> KernelWeight:
    """Build the kernel buffers of a `VQWeight` on its own device. Raises `Unsupported`."""
    if q.num_centroids < 2 and not q.num_res_centroids:
        raise Unsupported("a 1-entry codebook has no index stream")
    main = _segment(q.centroids, q.indices, q.res_centroids if q.num_res_centroids else None,
                    q.res_indices if q.num_res_centroids else None, col0=q.outlier_size)
    outlier = None
    if q.outlier_size:
        outlier = _segment(q.outlier_centroids, q.outlier_indices.to(torch.int64) & 0xFFFF, None, None, col0=0)
    perm = None if q.perm is None else q.perm.to(torch.int64).to(torch.int32).contiguous()
    scale = wbias = None
    if q.weight_scale is not None:
        scale = q.weight_scale.float().contiguous()
        wbias = q.weight_bias.float().contiguous()
    return KernelWeight(q.out_features, q.in_features, main, outlier, perm, scale, wbias)


def layout_of(q) -> KernelLayout:
    """How the kernels read weight q: a `VQWeight` as it is; every other type describes itself through
    `QuantizedWeight.kernel_layout` (e.g. AQLM-style weights: the VQWeight of their transpose), and
    raises `Unsupported` where no kernel fits."""
    from vptq.vqweight import VQWeight

    lay = KernelLayout(q) if isinstance(q, VQWeight) else q.kernel_layout()
    if not isinstance(lay.weight, VQWeight):
        raise Unsupported(f"{type(q).__name__}.kernel_layout() gave a {type(lay.weight).__name__}, not a VQWeight")
    return lay


def from_layout(lay: KernelLayout) -> KernelWeight:
    """The Triton buffers of a kernel layout. A transposed layout (Wᵀ, e.g. AQLM-style weights) is
    dequantized by the same kernel (the caller transposes its output); the fused GEMV computes x·Wᵀ
    for the layout it reads and does not serve it (it would need x·Ŵᵀᵀ)."""
    if lay.extra:
        raise Unsupported(f"a layout with {2 + len(lay.extra)} codebooks per vector: kernel=triton sums at most 2")
    kw = from_vqweight(lay.weight)
    kw.transposed = lay.transposed
    return kw


def weight_stamp(q) -> tuple:
    """What a kernel's cached buffers of weight q were built from: each tensor attribute (the object
    itself, kept alive by the stamp, so its id cannot be reused) with its in-place version counter,
    and each None attribute. A cache is valid while `same_stamp` holds: finetuning that replaces a
    codebook or steps it in place (AQLM Phase 3, VPTQ layer-wise finetuning) invalidates it."""
    return tuple((k, t, None if t is None else t._version) for k, t in vars(q).items()
                 if t is None or isinstance(t, torch.Tensor))


def same_stamp(stamp: tuple, q) -> bool:
    d = vars(q)
    for k, t, v in stamp:
        now = d.get(k)
        if now is not t or (t is not None and t._version != v):
            return False
    return True
