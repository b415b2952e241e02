"""`kernel=cpu`: decode and prefill (1 to `MAX_TOKENS` = 256 tokens) of quantized linears on the CPU, straight from
the indices, without the dense weight: a gather-FMA GEMV in C++ (csrc/vq_cpu.cpp) built on first use.

Why this route (measured on a 2-core AMD EPYC Zen3, docs/LOG.md): at one token an fp32 `F.linear` is
bound by memory bandwidth (a 4096x11008 fp32 weight is 180 MB), the torch path dequantizes the whole
weight on every call, and a 2-bit weight is 8-16x fewer bytes. The kernel reads one uint16 index per
v weights and gathers a float16 codeword from a cache-resident codebook: for output vector row r
(rows r*v .. r*v+v-1) and stored input column c,

    y[t, r*v:(r+1)*v] += x'[t, c] * C[g(c)][I[r, c]]       (VPTQ layout, `VQWeight`)

summed over one PASS per codebook (main, residual, outlier columns), with x' = (s ∘ x)[perm] and
y += (b · x) for the per-column norms W = W'·s + b. Transposed layouts (AQLM-style weights: vectors
along the input dimension, `vptq.qweight.KernelLayout(transposed=True)`) run the same loop as dot
products: y[t, o] = s[o] · Σ_j x[t, j*g:(j+1)*g] · Σ_m C_m[I_m[o, j]], two codebooks summed per pass
(AQLM's M codebooks: the layout's main, residual and `extra` ones).

Buffers per pass (`Pass`), built once per weight and cached on the `QuantLinear`:
    idx       (`DIRECT`) the weight's own indices, read in place, R = TILE_ROWS rows of a tile as R
              streams: the kernel adds no index bytes to the model's memory. VPTQ layout: the (G, n, gs)
              uint8 / int16 / uint16 indices; transposed: the stored codes the weight's layout offers
              (`KernelLayout.codes`, AQLM's (out, nj, M)) where 8-bit (`DIRECT_IN_DTYPES`). Else (other
              transposed layouts, `DIRECT` off) a tiled copy (ntiles, ncols, R), a tile's R rows adjacent
              per column: uint8 codeword numbers for codebooks of at most 256 entries (`TILED_U8`), else
              uint16, byte offsets where they fit 16 bits ((k-1) * VP * 2 or 4 < 2^16)
    codebook  (G, k, VP)         float16  codewords zero-padded to VP in {4, 8, 16, 32} lanes; float32
                                          where that is <= F32_CODEBOOK_BYTES (the residual's 256)
Arithmetic is float32 (float16 codebooks convert exactly; a small float32 codebook is used as it is,
float16-exact or not); the result is cast to the activations' dtype. Against kernel="torch" it differs
only in summation order (and, for float16/bfloat16 activations, in where the rounding to that dtype
happens): tests bound it.

What it does not take returns None (the torch path): tensors off the CPU, more than MAX_TOKENS tokens
(prefill: see `vptq.qlinear.dense_weights`), calls that need autograd, weights without a kernel
layout (GPTVQ, scalar grids) or with k > 65536 or v > 32, transposed layouts with
groups, outliers or a permutation, codebooks that float16 cannot hold exactly and that are too large
for a float32 copy, and any machine where the library cannot be built (no compiler: one warning).
The library: a plain C ABI called through ctypes, compiled with the system C++
compiler ($CXX, g++, c++ or clang++) into $VQB_CACHE/cpu_kernels (default ~/.cache/vq-bench), keyed by
a hash of the source, compiler and flags; no -march: the AVX2/FMA/F16C loop is compiled for that
target by function attributes and chosen at run time, every other CPU runs a portable scalar loop.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional

import torch

from vptq.kernels.layout import Unsupported, layout_of, same_stamp, weight_stamp
from vptq.qweight import KernelLayout
from vptq.sysinfo import CACHE_SYSFS, cache_sizes, size_bytes

log = logging.getLogger("vq-bench")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "vq_cpu.cpp")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
OPENMP = ("-fopenmp",)
# Up to this many tokens the kernel runs (decode, prefills). Its cost grows with the tokens, ~0.5 ms per
# token for a 4096x4096 layer; the torch path's is one dequantization (~120-160 ms) + F.linear (0.13-0.33
# ms per token), so the kernel is faster up to ~500-700 tokens (Zen 4, one and two threads; at 256
# tokens 127 against 209 ms, v=6 k=4096, one thread: docs/LOG.md, 2026-12-07 21:50 UTC session), and never holds a
# dense weight. Slower than F.linear with a weight already dense, which `vptq.qlinear.dense_weights`
# provides for evaluation.
MAX_TOKENS = 256
TILE_ROWS = 8  # R: vector rows per tile (the kernel's register tiles divide it)
LANES = (4, 8, 16, 32)  # VP: codeword lanes the kernel has loops for
MAX_K = 65536  # uint16 indices
# Small codebooks (the residual's 256 entries, ...): codewords as float32 when the codebook is at most
# F32_CODEBOOK_BYTES that way (L1-resident: one load+FMA per vector instead of a load, a float16
# conversion and an FMA), and indices as uint16 BYTE OFFSETS when every offset fits 16 bits (no shift per
# vector). Measured in docs/LOG.md; benchmarks/cpu_decode_bench.py --plain times the kernel without them.
F32_CODEBOOK_BYTES = 16384
COMPACT = True
# OUT-layout passes read the weight's own uint8 / int16 / uint16 indices in place (no copy: the kernel
# adds only its codebooks to the model's memory) instead of a tiled uint16 copy, which doubled the
# indices' memory (a 2-bit v=6 k=4096 layer: 2 bytes per 6 weights more) and was no faster: the copy took
# 1.00-1.68x the in-place time for k=4096 at batch 1, 0.89-1.21x for k=65536 (docs/benchmarks.md,
# 2026-12-07 23:56 UTC, cpu_decode_bench --tiled).
DIRECT = True
DIRECT_DTYPES = (torch.uint8, torch.int16, torch.uint16)
# Transposed layouts (AQLM's stored codes, `KernelLayout.codes`) are read in place for these code dtypes
# only. 8-bit codes: half the index bytes of a tiled uint16 copy; 2x8 1.03-1.37x faster in place (both
# codes in one load, `SPLIT`; docs/benchmarks.md 2026-12-08 01:00), 1x8 0.86-1.13x the copy's time.
# 16-bit codes (1x16): as many bytes as the copy, and 5-30 % slower in place on cold calls (an address
# register per row's stream against constant offsets in one stream), so they keep the tiled copy
# (docs/LOG.md, 2026-12-07 23:43 UTC session).
DIRECT_IN_DTYPES = (torch.uint8,)
# With the weight's own indices, a tile's 8 rows are 8 streams. Where a pass's codebook is over
# BIG_CODEBOOK bytes but within the core's L2 (it nearly fills it), one-token programs run 4 rows, whose
# streams leave the codebook more of the L2; a codebook larger than the L2 misses it anyway and runs 8
# rows, more gathers in flight. Zen 4, 1 MB L2, cold calls: a 1 MB codebook 5-12 % faster with 4 rows; a
# 2 MB one (v8 k65536 as float32, standing in for the Zen 3's 1 MB codebook in a 512 KB L2) 11-19 %
# faster with 8 (docs/LOG.md, 2026-12-07 21:50 UTC session).
BIG_CODEBOOK = 256 * 1024
# Transposed layouts with two codebooks or more (AQLM's M >= 2) run one loop per pair of codebooks that adds
# both codewords before the FMA, instead of one pass over x per codebook (measured in docs/LOG.md,
# 2026-12-07 21:50 UTC session).
FUSE_IN = True
# AQLM's 2x8 codes read in place: both 8-bit codes of a vector in one uint16 load, split in registers, instead
# of two byte streams (which were up to 30 % slower than the tiled copy; docs/LOG.md, 2026-12-07 23:43 UTC
# session).
SPLIT = True
# Tiled copies of indices into codebooks of at most 256 entries are uint8 codeword numbers, not uint16 (byte
# offsets or numbers): half the bytes, and faster (7x7/g16 8-17 %, 1x6/g3 4-7 %, cold, one and two threads:
# docs/LOG.md, 2026-12-07 23:43 UTC session). What AQLM codes of fewer than 8 bits get.
TILED_U8 = True
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATS: Counter = Counter()  # route -> calls ("cpu", "torch"); tests check the kernel really ran


# ---------------------------------------------------------------------------------- the library
class _Pass(ctypes.Structure):
    """struct VQPass of csrc/vq_cpu.cpp (field for field)."""

    _fields_ = [("in_mode", ctypes.c_int32), ("T", ctypes.c_int32), ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64),
                ("idx", ctypes.c_void_p), ("ntiles", ctypes.c_int32), ("ncols", ctypes.c_int32),
                ("R", ctypes.c_int32), ("VP", ctypes.c_int32), ("v", ctypes.c_int32), ("cb", ctypes.c_void_p),
                ("cb_gstride", ctypes.c_int64), ("group_size", ctypes.c_int32), ("y", ctypes.c_void_p),
                ("ldy", ctypes.c_int64), ("nvec", ctypes.c_int32), ("nthreads", ctypes.c_int32),
                ("cb_f32", ctypes.c_int32), ("idx_bytes", ctypes.c_int32), ("idx_mode", ctypes.c_int32),
                ("half_rows", ctypes.c_int32), ("idx2", ctypes.c_void_p), ("cb2", ctypes.c_void_p),
                ("idx_cstride", ctypes.c_int32)]


class BuildError(RuntimeError):
    pass


def cache_dir() -> str:
    root = os.environ.get("VQB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vq-bench"))
    return os.path.join(root, "cpu_kernels")


def compiler() -> Optional[str]:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def library_path(cxx: str, flags: tuple) -> str:
    """Where the library built from SOURCE by `cxx` with `flags` is cached (a hash of the source,
    compiler path and version, flags and machine: a cache shared across machines stays valid)."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cxx} --version failed: {e}") from e
    with open(SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha256(b"\0".join([src, cxx.encode(), version.encode(), " ".join(flags).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    return os.path.join(cache_dir(), f"vq_cpu-{key}.so")


def _build(cxx: str, flags: tuple) -> str:
    """Compile SOURCE with `flags` into the cache unless it is there -> the library's path."""
    path = library_path(cxx, flags)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".vq_cpu-", suffix=".so")
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise BuildError(f"{os.path.basename(cxx)} {' '.join(flags)} failed: {r.stderr.strip()[-600:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # atomic: concurrent builders each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load():
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found ($CXX, g++, c++, clang++)")
    try:
        path = _build(cxx, FLAGS + OPENMP)
    except BuildError as e:  # e.g. clang without libomp: single-threaded build
        log.info("kernel=cpu: OpenMP build failed (%s); building single-threaded", e)
        path = _build(cxx, FLAGS)
    lib = ctypes.CDLL(path)
    lib.vq_cpu_pass.argtypes = [ctypes.POINTER(_Pass), ctypes.c_int]
    lib.vq_cpu_pass.restype = ctypes.c_int
    lib.vq_cpu_isa.restype = ctypes.c_int
    return lib


_LIB: list = []  # [lib or None] once tried


def library():
    """The compiled kernel library (built and loaded on first use), or None where it cannot be built
    (logged once: the torch path runs)."""
    if not _LIB:
        try:
            _LIB.append(_load())
        except (BuildError, OSError, subprocess.SubprocessError) as e:
            log.warning("kernel=cpu: the C++ kernel is unavailable (%s); using the torch path", e)
            _LIB.append(None)
    return _LIB[0]


def isa() -> str:
    """Which loop the library runs on this CPU: "avx2" (AVX2+FMA+F16C), "scalar" or "unavailable"."""
    lib = library()
    return "unavailable" if lib is None else ("avx2" if lib.vq_cpu_isa() == 2 else "scalar")


# ---------------------------------------------------------------------------------- buffers
@dataclass(eq=False)
class Pass:
    """One codebook over a range of input columns (csrc/vq_cpu.cpp), columns [col0, col0 + ncols) of x'
    (OUT) or all of x (IN); codebook (G, k, VP) float16 or float32. idx: the weight's own indices, read
    in place (`direct`, codeword numbers): OUT, VPTQ's (G, nvec, group_size) uint8 / int16 / uint16; IN,
    AQLM's stored codes (nvec, ncols, M) uint8 / uint16, this pass's codebook being code `ioff` of M
    (`cstride`). Or a tiled copy (ntiles, ncols, R) uint8 / uint16 of codeword numbers or byte offsets
    (`idx_bytes`)."""

    idx: torch.Tensor
    codebook: torch.Tensor
    v: int
    group_size: int
    col0: int
    nvec: int  # vector rows (OUT) / output rows (IN)
    in_mode: bool
    idx_bytes: bool = False
    direct: bool = False
    shared_codebook: bool = False  # `codebook` is the weight's own tensor
    half_rows: bool = False  # direct: one-token programs of 4 rows (BIG_CODEBOOK)
    cstride: int = 1  # direct: index elements from one column to the next of a row (AQLM's M)
    ioff: int = 0  # direct: this stream's first index element in idx (AQLM's code m)
    split: bool = False  # direct, with `second`: idx (nvec, ncols, 1) uint16 words of two uint8 codes, low byte
    # this pass's, high byte second's (AQLM's 2x8 codes, one load for both)
    second: Optional["Pass"] = None  # IN: a second codebook's pass summed into each codeword in this loop
    _args: Optional[bytes] = None  # the constant fields of its struct VQPass (pointers into idx, codebook)

    @property
    def vp(self) -> int:
        return self.codebook.shape[-1]

    @property
    def ncols(self) -> int:
        if self.direct and not self.in_mode:
            return self.idx.shape[0] * self.idx.shape[2]
        return self.idx.shape[1]

    @property
    def ntiles(self) -> int:
        return -(-self.nvec // TILE_ROWS) if self.direct else self.idx.shape[0]

    def nbytes(self) -> int:
        """Bytes the kernel's buffers add to the weight's own tensors."""
        own = 0 if self.direct else self.idx.numel() * self.idx.element_size()
        own += 0 if self.second is None else self.second.nbytes()
        return own + (0 if self.shared_codebook else self.codebook.numel() * self.codebook.element_size())

    def run(self, lib, x: torch.Tensor, y: torch.Tensor, nthreads: int, force_scalar: bool = False) -> int:
        """y (T, ldy) float32 += this pass of x (T, ldx) float32 (both with unit column stride)."""
        if self._args is None:  # the fields that do not change between calls, set once
            if not self.direct:
                mode = 4 if self.idx.dtype == torch.uint8 else 0
            else:
                mode = 3 if self.split else 2 if self.idx.element_size() == 1 else 1
            two = self.second
            self._args = bytes(_Pass(in_mode=int(self.in_mode), idx=self._stream(), ntiles=self.ntiles,
                                     ncols=self.ncols, R=TILE_ROWS, VP=self.vp, v=self.v,
                                     cb=self.codebook.data_ptr(), cb_gstride=self.codebook.shape[1] * self.vp,
                                     group_size=self.group_size, nvec=self.nvec,
                                     cb_f32=int(self.codebook.dtype == torch.float32),
                                     idx_bytes=int(self.idx_bytes), idx_mode=mode,
                                     half_rows=int(self.half_rows),
                                     idx2=two._stream() if two and not self.split else None,
                                     cb2=two.codebook.data_ptr() if two else None, idx_cstride=self.cstride))
        a = _Pass.from_buffer_copy(self._args)  # per call: calls may overlap (ctypes drops the GIL)
        a.T, a.x, a.ldx = x.shape[0], x.data_ptr() + 4 * self.col0, x.stride(0)
        a.y, a.ldy, a.nthreads = y.data_ptr(), y.stride(0), nthreads
        r = lib.vq_cpu_pass(ctypes.byref(a), int(force_scalar))
        if r < 0:
            raise RuntimeError(f"vq_cpu_pass rejected its arguments: {[(f, getattr(a, f)) for f, _ in a._fields_]}")
        return r

    def _stream(self) -> int:
        """Address of this pass's first index."""
        return self.idx.data_ptr() + self.ioff * self.idx.element_size()


_L2: list = []


def l2_bytes() -> int:
    """The L2 cache of cpu0 in bytes, from sysfs (0 where it does not say: no pass runs half rows)."""
    if not _L2:
        sizes = cache_sizes(CACHE_SYSFS)
        _L2.append(size_bytes(sizes.get("L2") or sizes.get("L2d") or ""))
    return _L2[0]


def lanes(v: int) -> int:
    """VP: the smallest register width >= v the kernel has a loop for."""
    for vp in LANES:
        if v <= vp:
            return vp
    raise Unsupported(f"vector_len {v} > {LANES[-1]}")


def _codebook(centroids: torch.Tensor, f32: bool = False) -> torch.Tensor:
    """(G, k, v) -> (G, k, VP) float16 (codebooks must be float16-exact), or float32 (`f32`: any
    codebook), zero-padded lanes. A contiguous float16 codebook with v == VP (v = 4, 8, 16, 32) is used
    as it is, not copied (the released formats' 1 MB v=8 k=65536 codebooks)."""
    G, k, v = centroids.shape
    if k > MAX_K:
        raise Unsupported(f"codebook of {k} entries > {MAX_K} (uint16 indices)")
    c = centroids.detach()
    if not f32 and c.dtype == torch.float16 and v == lanes(v) and c.device.type == "cpu" and c.is_contiguous():
        return c
    c = c.cpu()
    if f32:
        c = c.float()
    else:
        c16 = c.to(torch.float16)
        if c.dtype != torch.float16 and not torch.equal(c16.float(), c.float()):
            raise Unsupported(f"{c.dtype} codebook is not exactly representable in float16 (and a float32 copy "
                              f"of its {k} entries is only kept up to {F32_CODEBOOK_BYTES} bytes)")
        c = c16
    out = torch.zeros(G, k, lanes(v), dtype=c.dtype)
    out[..., :v] = c
    return out


def _tiles(idx: torch.Tensor, scale: int = 1, dtype: torch.dtype = torch.uint16) -> torch.Tensor:
    """(rows, ncols) integer indices (times `scale`: byte offsets) -> (ntiles, ncols, R) `dtype`, rows
    padded to a multiple of R."""
    rows, ncols = idx.shape
    nt = -(-rows // TILE_ROWS)
    out = torch.zeros(nt * TILE_ROWS, ncols, dtype=torch.int32)
    out[:rows] = idx.cpu()
    if scale != 1:
        out *= scale
    return out.reshape(nt, TILE_ROWS, ncols).permute(0, 2, 1).to(dtype).contiguous()  # (nt, ncols, R)


def check_indices(idx: torch.Tensor, k: int) -> None:
    """The kernel gathers without bounds checks: indices outside [0, k) (e.g. a file packing a 37-entry
    codebook's indices in 6 bits) raise here, as the torch path's gather does, instead of reading past
    the codebook."""
    if idx.numel():
        lo, hi = (idx.to(torch.int32) if idx.dtype == torch.uint16 else idx).aminmax()
        if int(lo) < 0 or int(hi) >= k:
            bad = int(hi) if int(hi) >= k else int(lo)
            raise ValueError(f"an index {bad} into a {k}-entry codebook: valid indices are 0..{k - 1}")


def _pass(centroids: torch.Tensor, idx: torch.Tensor, **kw) -> Pass:
    """A Pass of codebook `centroids` (G, k, v) and a tiled copy of indices idx (rows, ncols), in the
    compact form where it applies (F32_CODEBOOK_BYTES; uint8 codeword numbers for at most 256 entries,
    `TILED_U8`; else uint16 byte offsets where they fit). Indices checked by the caller (`check_indices`)."""
    cb, shared = _pass_codebook(centroids)
    stride = cb.shape[-1] * cb.element_size()  # bytes per codeword
    if TILED_U8 and centroids.shape[1] <= 256:
        return Pass(idx=_tiles(idx, dtype=torch.uint8), codebook=cb, shared_codebook=shared, **kw)
    offsets = COMPACT and (centroids.shape[1] - 1) * stride < 65536
    return Pass(idx=_tiles(idx, stride if offsets else 1), codebook=cb, idx_bytes=offsets, shared_codebook=shared,
                **kw)


def _pass_codebook(centroids: torch.Tensor):
    """-> (the pass's codebook: float32 where COMPACT and small, else float16; whether it is `centroids`'
    own storage)."""
    k, vp = centroids.shape[1], lanes(centroids.shape[2])
    cb = _codebook(centroids, f32=COMPACT and k * vp * 4 <= F32_CODEBOOK_BYTES)
    return cb, cb.data_ptr() == centroids.data_ptr()


def out_pass(centroids: torch.Tensor, indices: torch.Tensor, col0: int) -> Pass:
    """A pass of the VPTQ layout: centroids (G, k, v), indices (G, n, gs) for stored columns
    [col0, col0 + G*gs); codebook g serves columns g*gs .. (g+1)*gs - 1. Reads `indices` in place where
    `DIRECT` and their dtype allow it, else a tiled copy."""
    G, n, gs = indices.shape
    check_indices(indices, centroids.shape[1])
    if _in_place(indices) and n and gs:
        return _direct_pass(centroids, indices, v=centroids.shape[-1], group_size=gs, col0=col0, nvec=n, in_mode=False)
    idx = indices.permute(1, 0, 2).reshape(n, G * gs)  # (n, G*gs): vector row r, stored column c
    return _pass(centroids, idx, v=centroids.shape[-1], group_size=max(gs, 1), col0=col0, nvec=n, in_mode=False)


def _in_place(indices: Optional[torch.Tensor]) -> bool:
    """Whether the kernel reads these stored indices as they are (`DIRECT`)."""
    return (DIRECT and indices is not None and indices.dtype in DIRECT_DTYPES and indices.device.type == "cpu"
            and indices.is_contiguous())


def _direct_pass(centroids: torch.Tensor, indices: torch.Tensor, in_mode: bool, **kw) -> Pass:
    """A pass reading `indices` in place, with half-row programs where one group's codebook is over
    BIG_CODEBOOK but within the L2."""
    cb, shared = _pass_codebook(centroids)
    cb_bytes = cb[0].numel() * cb.element_size()  # one group's codebook
    half = BIG_CODEBOOK < cb_bytes <= l2_bytes()
    return Pass(idx=indices, codebook=cb, direct=True, shared_codebook=shared, half_rows=half, in_mode=in_mode, **kw)


@dataclass(eq=False)
class CpuWeight:
    """The kernel's view of one weight. OUT mode (`transposed` False):
        y = Σ_passes (x'[:, col0:col0+ncols] "times" pass)[:, :out] + (x · wbias) + bias,
        x' = (x * scale)[:, perm]
    perm (in,) int64, scale / wbias (in,) float32 by ORIGINAL column (None: identity / no norm; wbias
    also None where it is all zero). IN mode (`transposed`, AQLM-style): x read as (T, nj, g) (zero-padded
    where nj * g > in), y = Σ_passes(...) * scale + (Σ x) * wbias + bias, scale / wbias
    (out,) per output row."""

    out_features: int
    in_features: int
    passes: List[Pass]
    ydim: int  # columns of the float32 accumulator (>= out_features: padding rows)
    perm: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    wbias: Optional[torch.Tensor]
    transposed: bool = False
    g: int = 0  # IN mode: vector length along the input

    def nbytes(self) -> int:
        """Bytes the buffers add to the weight's own tensors: the passes' (`Pass.nbytes`), and perm /
        scale / wbias counted as the int64 / float32 copies they are unless the weight already held
        them so (`runners.throughput.resident_bytes` counts storages exactly)."""
        n = sum(p.nbytes() for p in self.passes)
        for t in (self.perm, self.scale, self.wbias):
            n += 0 if t is None else t.numel() * t.element_size()
        return n


def from_layout(lay: KernelLayout) -> CpuWeight:
    """Build the kernel buffers (on the CPU) of a kernel layout. Raises `Unsupported`."""
    q = lay.weight
    if q.centroids.device.type != "cpu":
        raise Unsupported(f"weight on {q.centroids.device.type}")
    norm = (None, None) if q.weight_scale is None else (q.weight_scale.float().cpu(), q.weight_bias.float().cpu())
    if norm[1] is not None and not bool(norm[1].any()):  # e.g. AQLM-style: scales only, no per-row offset
        norm = (norm[0], None)
    if lay.transposed:
        return _from_transposed(q, norm, lay.codes, lay.extra)
    if lay.extra:
        raise Unsupported("extra codebooks on a VPTQ (OUT) layout")
    passes = [out_pass(q.centroids, q.indices, q.outlier_size)]
    if q.num_res_centroids:
        passes.append(out_pass(q.res_centroids, q.res_indices, q.outlier_size))
    if q.outlier_size:
        passes.append(out_pass(q.outlier_centroids, q.outlier_indices, 0))
    ydim = max(p.nvec * p.v for p in passes)
    perm = None if q.perm is None else q.perm.to(torch.int64).cpu()
    return CpuWeight(q.out_features, q.in_features, passes, ydim, perm, *norm)


def _from_transposed(q, norm, codes: Optional[torch.Tensor] = None, extra: tuple = ()) -> CpuWeight:
    """q: the VQWeight of Wᵀ (in, out); vectors of length g run along W's input dimension; its main and
    residual codebooks and the `extra` (centroids, indices) pairs are the M codebooks summed into each
    codeword (AQLM's). codes: the weight's own (out, nj, M) codes (`KernelLayout.codes`), read in place
    where `DIRECT` allows. Codebooks go two to a pass (`FUSE_IN`: one loop adds both codewords)."""
    if q.group_num != 1 or q.outlier_size or q.perm is not None:
        raise Unsupported("a transposed layout with groups, outliers or a permutation")
    out_f, in_f, g = q.in_features, q.out_features, q.vector_len
    books = [(q.centroids, q.indices)] + list(extra)
    if q.num_res_centroids:
        books.insert(1, (q.res_centroids, q.res_indices))
    M, nj = len(books), q.indices.shape[1]
    own = (_in_place(codes) and codes.dtype in DIRECT_IN_DTYPES and tuple(codes.shape) == (out_f, nj, M) and nj > 0)

    def in_pass(m):
        centroids, indices = books[m]  # indices (1, nj, out): vector j of output row o
        if tuple(indices.shape) != (1, nj, out_f) or centroids.shape[-1] != g:
            raise Unsupported(f"codebook {m} of a transposed layout: indices {tuple(indices.shape)}, "
                              f"not (1, {nj}, {out_f})")
        check_indices(indices, centroids.shape[1])
        if own:
            return _direct_pass(centroids, codes, v=g, group_size=nj, col0=0, nvec=out_f, in_mode=True,
                                cstride=M, ioff=m)
        return _pass(centroids, indices[0].t(), v=g, group_size=nj, col0=0, nvec=out_f, in_mode=True)

    single = [in_pass(m) for m in range(M)]
    passes = []
    for m in range(0, M, 2):
        p0 = single[m]
        p1 = single[m + 1] if m + 1 < M else None
        if p1 is None or not (FUSE_IN and p0.codebook.dtype == p1.codebook.dtype and p0.vp == p1.vp
                              and p0.idx_bytes == p1.idx_bytes and p0.direct == p1.direct):
            passes += [p0] + ([p1] if p1 is not None else [])
            continue
        duo = dataclasses.replace(p0, second=p1)  # one loop: w = C_m[i] + C_m+1[j]
        if own and codes.dtype == torch.uint8 and M % 2 == 0 and SPLIT:  # both codes in one uint16 load
            duo = dataclasses.replace(duo, idx=codes.view(torch.uint16), cstride=M // 2, ioff=m // 2, split=True)
        passes.append(duo)
    return CpuWeight(out_f, in_f, passes, out_f, None, *norm, transposed=True, g=g)


# ---------------------------------------------------------------------------------- compute
def matmul(cw: CpuWeight, x: torch.Tensor, bias: Optional[torch.Tensor] = None, lib=None,
           nthreads: Optional[int] = None, force_scalar: bool = False) -> torch.Tensor:
    """y = x Wᵀ + bias for x (T, in) on the CPU, in x's dtype (float32 arithmetic)."""
    lib = lib or library()
    if lib is None:
        raise BuildError("the C++ kernel is unavailable")
    nthreads = nthreads or torch.get_num_threads()
    T = x.shape[0]
    xf = x.float()  # (T, in)
    if cw.transposed:
        nj = cw.passes[0].ncols
        # x is (T, nj, g) as it is (the kernel reads g floats per column, masked where g < VP); zero-padded
        # only where the last input vector is partial
        pad = nj * cw.g - cw.in_features
        xp = (xf if not pad else torch.nn.functional.pad(xf, (0, pad))).contiguous()
        y = torch.zeros(T, cw.ydim)
        for p in cw.passes:
            p.run(lib, xp, y, nthreads, force_scalar)
        if cw.scale is not None:
            y.mul_(cw.scale)
            if cw.wbias is not None:
                y += xf.sum(1, keepdim=True) * cw.wbias
    else:
        bx = None
        if cw.scale is not None:
            if cw.wbias is not None:
                bx = xf @ cw.wbias  # (T,)
            xf = xf * cw.scale
        if cw.perm is not None:
            xf = xf[:, cw.perm]  # stored column order
        xf = xf.contiguous()
        y = torch.zeros(T, cw.ydim)  # (T, ydim) float32: every pass adds into it
        for p in cw.passes:
            p.run(lib, xf, y, nthreads, force_scalar)
        if cw.ydim != cw.out_features:  # padding rows
            y = y[:, :cw.out_features].contiguous()
        if bx is not None:
            y += bx[:, None]
    if bias is not None:
        y += bias.float()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


_warned = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def cpu_weight(qlinear) -> Optional[CpuWeight]:
    """The cached buffers of this layer (built on first use, rebuilt when the weight's tensors changed:
    `layout.weight_stamp`), or None where the kernel does not take the weight."""
    q = qlinear.qweight
    cache = qlinear.kernel_cache
    hit = cache.get("cpu")
    if hit is not None and hit[0] is q and same_stamp(hit[1], q):
        return hit[2]
    try:
        cw = from_layout(layout_of(q))
    except Unsupported as e:
        _warn_once(("unsupported", str(e)), f"kernel=cpu: torch path for a weight: {e}")
        cw = None
    cache["cpu"] = (q, weight_stamp(q), cw)
    return cw


def takes(qlinear, x: torch.Tensor) -> Optional[CpuWeight]:
    """The layer's kernel buffers if the kernel computes qlinear(x), else None (the torch path runs):
    x on the CPU in a float dtype, 1 to MAX_TOKENS tokens, no autograd, the library built, the weight
    supported."""
    tokens = x.numel() // qlinear.in_features if x.dim() and x.shape[-1] == qlinear.in_features else 0
    if (x.device.type != "cpu" or x.dtype not in DTYPES or not 0 < tokens <= MAX_TOKENS
            or qlinear.needs_grad(x) or library() is None):
        return None
    return cpu_weight(qlinear)


def cpu_linear(qlinear, x: torch.Tensor) -> Optional[torch.Tensor]:
    """`KERNELS["cpu"]`: y = x Wᵀ + b through the C++ kernel, or None (the torch path)."""
    cw = takes(qlinear, x)
    if cw is None:
        STATS["torch"] += 1
        return None
    tokens = x.numel() // cw.in_features
    y = matmul(cw, x.reshape(tokens, cw.in_features), qlinear.bias)  # (tokens, out)
    if not STATS["cpu"]:
        log.info("kernel=cpu: first call (%d tokens, %s loop)", tokens, isa())
    STATS["cpu"] += 1
    return y.reshape(*x.shape[:-1], cw.out_features)
