"""Numeric helpers shared by the methods (one copy of each idea).

  * `ceil_log2(k)`: bits of one index into k entries (0 for k <= 1).
  * `pack_bits` / `unpack_bits`: a little-endian bit stream of fixed-width unsigned integers in
    uint8 bytes (GPTVQ indices, AQLM codes). VPTQ's int32-word layout of the official format is
    `vptq.pack` (a different, externally fixed layout).
  * `round_fp16(t, overflow=...)`: round to float16 and back; one rule per call site, named:
    "raise" (a value that overflows is an error: codebooks, norms) or "clamp" (saturate at
    ±65504: scales, where the largest finite value is still the best one).
  * `Segments` / `segment_sum`: deterministic sums of rows grouped by an index (CPU: index_add_
    in index order; elsewhere a stable sort + float64 cumulative sums, no atomics).
  * `weighted_lloyd`: batched Lloyd iterations with per-coordinate weights (GPTVQ's EM, §3.2 of
    arXiv 2402.15319), with the empty-cluster and stopping rules as parameters.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

FP16_MAX = 65504.0
_DIST_CHUNK = 1 << 20  # elements of one (groups × vectors × centroids) distance tensor at once


# ----------------------------------------------------------------------------- bits
def ceil_log2(k: int) -> int:
    """ceil(log2 k): bits of one index into k entries (0 for k <= 1)."""
    k = int(k)
    return (k - 1).bit_length() if k > 1 else 0


def pack_bits(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """Non-negative ints x (any shape, < 2^nbits) -> uint8 (ceil(numel·nbits/8),) little-endian
    bit stream: bit p of element i is stream bit i·nbits + p."""
    if not 1 <= nbits <= 16:
        raise ValueError(f"nbits={nbits}; valid: 1..16")
    flat = x.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << nbits)):
        raise ValueError(f"values out of range for {nbits} bits: min {int(flat.min())}, max {int(flat.max())}; "
                         f"valid: 0..{(1 << nbits) - 1}")
    shifts = torch.arange(nbits, device=flat.device)
    bits = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)  # (numel·nbits,)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (bits.reshape(-1, 8) * weights).sum(1, dtype=torch.int64).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, nbits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits` (nbits <= 16): -> int64 (numel,).

    Every 8 consecutive elements fill exactly nbits bytes, and element j (0..7) of such a run
    starts at bit j·nbits of it: byte (j·nbits) // 8, shift (j·nbits) % 8, spanning at most 3
    bytes. So the stream is viewed as (runs, nbits) bytes and each j is a 24-bit read of fixed
    columns: column slices and shifts, no per-element gather."""
    if not 1 <= nbits <= 16:
        raise ValueError(f"nbits={nbits}; valid: 1..16")
    if 8 % nbits == 0:  # whole elements per byte (the common k = 2, 4, 16, 256): shifts only
        shifts = torch.arange(0, 8, nbits, device=packed.device, dtype=torch.uint8)  # (8/nbits,)
        vals = (packed[:, None] >> shifts) & ((1 << nbits) - 1)  # (bytes, 8/nbits) uint8
        return vals.reshape(-1)[:numel].to(torch.int64)
    runs = -(-numel // 8)
    P = torch.zeros(runs * nbits + 2, dtype=torch.int32, device=packed.device)
    P[:packed.numel()] = packed.to(torch.int32)
    Q = torch.cat([P[:runs * nbits].reshape(runs, nbits), P.new_zeros(runs, 2)], 1)  # (runs, nbits + 2)
    mask = (1 << nbits) - 1
    cols = []
    for j in range(8):
        b, sh = (j * nbits) // 8, (j * nbits) % 8
        v = Q[:, b] | (Q[:, b + 1] << 8) | (Q[:, b + 2] << 16)  # (runs,)
        cols.append((v >> sh) & mask)
    return torch.stack(cols, 1).reshape(-1)[:numel].to(torch.int64)  # (numel,)


def packed_bytes(numel: int, nbits: int) -> int:
    """Bytes `pack_bits` stores for numel values of nbits each."""
    return math.ceil(numel * nbits / 8)


# ----------------------------------------------------------------------------- float16
def round_fp16(t: torch.Tensor, *, overflow: str) -> torch.Tensor:
    """Round to float16 and back to float32 (what is stored is what is used).

    overflow="raise": a finite value beyond ±65504 raises ValueError (one line);
    overflow="clamp": such values saturate at ±65504."""
    if overflow == "clamp":
        return t.float().clamp(-FP16_MAX, FP16_MAX).half().float()
    if overflow != "raise":
        raise ValueError(f"overflow={overflow!r}; valid: raise, clamp")
    h = t.half()
    if not torch.isfinite(h).all():
        raise ValueError("a value overflows float16 (|x| > 65504)")
    return h.float()


# ----------------------------------------------------------------------------- segment sums
class Segments:
    """Deterministic segment sums for a fixed index: out[k] = Σ_{i: index[i]=k} values[i].

    On the CPU `index_add_` accumulates in index order (deterministic). On other devices
    scatter-adds use atomics (run-dependent order), so there a stable sort and a float64
    cumulative sum are used instead; the sort is done once per index, so repeated sums over
    the same index are cheap. index: (N,) int64 in [0, size)."""

    def __init__(self, index: torch.Tensor, size: int):
        self.index, self.size = index, int(size)
        if index.device.type != "cpu":
            self.order = torch.sort(index, stable=True).indices  # (N,)
            idx = index[self.order]
            ks = torch.arange(self.size, device=index.device)
            self.starts = torch.searchsorted(idx, ks, right=False)  # (size,)
            self.ends = torch.searchsorted(idx, ks, right=True)

    def sum(self, values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """values (N, d) -> (size, d) in `dtype` (accumulated in float64 off the CPU)."""
        if self.index.device.type == "cpu":
            out = torch.zeros(self.size, values.shape[1], dtype=dtype)
            return out.index_add_(0, self.index, values.to(dtype))
        cs = torch.cat([values.new_zeros(1, values.shape[1], dtype=torch.float64),
                        values[self.order].double().cumsum(0)])  # (N+1, d)
        return (cs[self.ends] - cs[self.starts]).to(dtype)


def segment_sum(index: torch.Tensor, values: torch.Tensor, size: int, dtype: torch.dtype = torch.float32):
    """One deterministic segment sum: (N,) index, (N, d) values -> (size, d)."""
    return Segments(index, size).sum(values, dtype)


# ----------------------------------------------------------------------------- weighted k-means
def weighted_assign(X: torch.Tensor, Wt: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """argmin_k Σ_j Wt[.., n, j] (X[g, n, j] - C[g, k, j])²  (ties -> the lowest k).

    X: (G, N, d); Wt: (N, d) shared by the G groups, or (G, N, d); C: (G, K, d) -> (G, N) int64.
    Σ_j w x² does not depend on k, so dist ≅ [w, w·x] @ [c², -2c]ᵀ: one matmul of inner size 2d.
    """
    G, N, d = X.shape
    K = C.shape[1]
    out = torch.empty(G, N, dtype=torch.int64, device=X.device)
    B = torch.cat([C * C, -2 * C], -1).transpose(1, 2)  # (G, 2d, K)
    step = max(1, _DIST_CHUNK // max(1, G * K))
    for n0 in range(0, N, step):
        x = X[:, n0:n0 + step]  # (G, n, d)
        w = Wt[..., n0:n0 + step, :].expand(G, -1, -1)  # (G, n, d)
        A = torch.cat([w, w * x], -1)  # (G, n, 2d)
        out[:, n0:n0 + step] = torch.bmm(A, B).min(-1).indices  # (G, n, K) -> (G, n)
    return out


def weighted_lloyd(X: torch.Tensor, Wt: torch.Tensor, C: torch.Tensor, iters: int, *, empty: str = "keep",
                   stop_when_stable: bool = True, min_weight: float = 0.0) -> torch.Tensor:
    """Lloyd / EM with per-coordinate weights: X (G, N, d), Wt (N, d) or (G, N, d) >= 0,
    C (G, K, d) initial -> C (G, K, d) after at most `iters` iterations.

    E-step: `weighted_assign`. M-step: per centroid and coordinate the Wt-weighted mean of its
    vectors, Σ w x / max(Σ w, min_weight). A centroid with no vectors keeps its value
    (empty="keep") or becomes 0 (empty="zero": Σ w x / max(0, min_weight) with nothing assigned,
    as GPTVQ's released M-step computes it). stop_when_stable: stop once the assignment repeats.
    Sums are deterministic (`Segments`)."""
    if empty not in ("keep", "zero"):
        raise ValueError(f"empty={empty!r}; valid: keep, zero")
    G, N, d = X.shape
    K = C.shape[1]
    C = C.clone()
    Wf = Wt.expand(G, N, d).reshape(G * N, d)  # (G·N, d)
    WX = Wf * X.reshape(G * N, d)
    base = (torch.arange(G, device=X.device) * K)[:, None]  # (G, 1)
    prev = None
    for _ in range(iters):
        a = weighted_assign(X, Wt, C)  # (G, N)
        if stop_when_stable and prev is not None and torch.equal(a, prev):
            break
        prev = a
        seg = Segments((a + base).reshape(-1), G * K)
        num, den = seg.sum(WX), seg.sum(Wf)  # (G·K, d)
        if empty == "zero":
            C = torch.where(den > 0, num / den.clamp_min(max(min_weight, 1e-300)), torch.zeros_like(num))
            C = C.reshape(G, K, d)
        else:
            Cf = C.reshape(G * K, d)
            upd = den > 0
            Cf[upd] = num[upd] / den[upd].clamp_min(max(min_weight, 1e-300))
            C = Cf.reshape(G, K, d)
    return C
