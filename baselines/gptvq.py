"""GPTVQ-style vector quantization (van Baalen et al., arXiv 2402.15319), re-implemented.

What is quantized: a vector is d weights of ONE output row in d ADJACENT INPUT columns
(d in {1, 2, 4}); W (out, in) holds out · in/d vectors. A codebook of k = 2^m centroids (d
values each) serves one block of `rows_per_group` rows × `columns_per_group` columns
(group_size = rows · columns weights), so a layer has (out/rows) · (in/columns) codebooks.

How (paper §3, arXiv v1 numbering):
  * §3.1, the loop: GPTQ's second-order error feedback with d columns quantized jointly per
    step, `vptq.solver.error_feedback(..., step=d)`; after the d columns are assigned, their
    errors are propagated to the columns not yet quantized (the solver's within-step updates
    make this the exact joint OBS update).
  * §3.2, codebook initialisation: when the pass reaches the first column of a column stripe,
    the codebooks of that stripe are fitted on the weights AS UPDATED by the error feedback so
    far (`RunningWeight`), by EM (k-means) with the Hessian-weighted distance
        dist(x, c) = Σ_j w_j (x_j - c_j)²,   w_j = 1 / [H⁻¹]_jj  (remaining-problem diagonal,
                                                                  = 1 / U_jj², U = chol(H⁻¹))
    and weighted-mean M-steps, seeded "Mahalanobis-style": the vectors sorted by their
    Mahalanobis distance to their mean under their own covariance, k of them taken at evenly
    spaced ranks.
  * assignment (each step of the loop): the centroid minimising the error feedback's own loss
    for these d columns, ||(x - c) U_dd⁻¹||² with U_dd the d x d diagonal block of U, i.e.
    (x - c)ᵀ [H⁻¹]_dd⁻¹ (x - c) with the remaining problem's H⁻¹ (`assign_metric="block"`).
    The reference code keeps only the diagonal of that metric (`assign_metric="diag"`); the
    exact block lowered the proxy loss by 20-45% on synthetic layers (d = 2, 4).
  * §3.3, codebook update: with all assignments fixed, a few gradient steps on the proxy loss
    tr((W - Ŵ(C)) H (W - Ŵ(C))ᵀ) over the centroids C (preconditioned by the diagonal curvature,
    exact line search since the loss is quadratic in C); kept only if the compressed result
    lowers the loss.
  * §3.4, codebook compression: every codebook stored as int8 with one float16 scale
    (symmetric, scale = max|c| / 127), or as float16 (`codebook_bits=16`). The codebook the
    error feedback uses is the compressed one, so the loop sees exactly what is stored.
    (The paper's optional SVD compression of 1-D codebooks is not implemented.)

Stored (`GPTVQWeight`): indices packed at m = log2 k bits each (uint8 bit stream), codebooks
(n_codebooks, k, d) int8 + scales (n_codebooks,) float16, or float16 codebooks. Storage counts
exactly those tensors.

Budget rule (`choose_scheme`, per layer shape): among the schemes whose realized total bits
(packed indices + codebooks + scales) fit `bits + tolerance`, take the most index bits per
weight (m / d), then the larger d (the paper's "blessing of dimensionality"), then the smallest
group (more codebooks), then the column count closest to `column_target`. Fields given
explicitly (vq_dim, num_centroids, group_size, columns_per_group) fix that choice; a budget or
a combination nothing can meet raises BudgetError naming the nearest valid values.

Deterministic: no random state is used (the seeding is rank based; argmin ties are broken the
same way on every run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from baselines.gptq import RunningWeight, check_layer, solver_inverse_cholesky
from vptq.methods import BudgetError, Method
from vptq.qweight import QuantizedWeight, Storage
from vptq.solver import SolverResult, error_feedback, prepare_hessian

VQ_DIMS = (1, 2, 4)
ASSIGN_METRICS = ("block", "diag")
CODEBOOK_BITS = (8, 16)  # 8: int8 + one float16 scale per codebook; 16: float16 codebooks
SCALE_BITS = 16
# elements of one (row groups × vectors × centroids) distance tensor computed at once
_DIST_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- bit packing
def pack_bits(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """Non-negative ints x (any shape, < 2^nbits) -> uint8 (ceil(numel·nbits/8),) little-endian
    bit stream: bit p of element i is stream bit i·nbits + p."""
    flat = x.reshape(-1).to(torch.int64)
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


# ----------------------------------------------------------------------------- the stored weight
class GPTVQWeight(QuantizedWeight):
    """A GPTVQ-quantized (out, in) weight.

    packed:    uint8 (ceil(out·(in/d)·m / 8),)  indices (out, in/d) row-major, m = log2 k bits each
    codebooks: int8 (n_cb, k, d) with scales float16 (n_cb,)   [codebook_bits=8]
               float16 (n_cb, k, d), scales None               [codebook_bits=16]
    Codebook of the vector at (row, v): (v·d // columns_per_group) · n_row_groups + row // rows_per_group.
    ŵ[row, v·d + j] = codebook[cb(row, v)][index[row, v], j]   (int8 · scale, computed in float32)
    """

    def __init__(self, packed, codebooks, scales, *, out_features: int, in_features: int, vq_dim: int,
                 num_centroids: int, rows_per_group: int, columns_per_group: int):
        self.packed = packed
        self.codebooks = codebooks
        self.scales = scales
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.vq_dim = int(vq_dim)
        self.num_centroids = int(num_centroids)
        self.index_bits = int(round(math.log2(num_centroids)))
        self.rows_per_group, self.columns_per_group = int(rows_per_group), int(columns_per_group)

    @property
    def n_row_groups(self) -> int:
        return self.out_features // self.rows_per_group

    def indices(self) -> torch.Tensor:
        """(out, in/d) int64."""
        n = self.out_features * (self.in_features // self.vq_dim)
        return unpack_bits(self.packed, self.index_bits, n).reshape(self.out_features, -1)

    def codebook_values(self) -> torch.Tensor:
        """(n_cb, k, d) float32: the centroids exactly as stored."""
        return codebook_values(self.codebooks, self.scales)

    def codebook_ids(self) -> torch.Tensor:
        """(out, in/d) int64: which codebook each vector uses."""
        return codebook_ids(self.out_features, self.in_features, self.vq_dim, self.rows_per_group,
                            self.columns_per_group, self.packed.device)

    def dequantize(self, dtype=torch.float32):
        C = self.codebook_values().reshape(-1, self.vq_dim)  # (n_cb·k, d)
        flat = self.codebook_ids() * self.num_centroids + self.indices()  # (out, in/d)
        return C.index_select(0, flat.reshape(-1)).reshape(self.out_features, self.in_features).to(dtype)

    def storage(self) -> Storage:
        bits = {"indices": int(self.packed.numel()) * 8,
                "codebooks": int(self.codebooks.numel()) * self.codebooks.element_size() * 8}
        if self.scales is not None:
            bits["codebook_scales"] = int(self.scales.numel()) * SCALE_BITS
        return Storage(self.out_features * self.in_features, bits)

    def to(self, device):
        self.packed = self.packed.to(device)
        self.codebooks = self.codebooks.to(device)
        self.scales = None if self.scales is None else self.scales.to(device)
        return self

    def settings(self) -> Dict[str, object]:
        return {"vq_dim": self.vq_dim, "num_centroids": self.num_centroids,
                "group_size": self.rows_per_group * self.columns_per_group,
                "rows_per_group": self.rows_per_group, "columns_per_group": self.columns_per_group,
                "codebook_bits": 16 if self.scales is None else 8}


def codebook_values(codebooks: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    if scales is None:
        return codebooks.float()
    return codebooks.float() * scales.float()[:, None, None]


def codebook_ids(out_f: int, in_f: int, d: int, rows: int, cols: int, device) -> torch.Tensor:
    r = torch.arange(out_f, device=device) // rows  # (out,)
    c = (torch.arange(in_f // d, device=device) * d) // cols  # (in/d,)
    return c[None, :] * (out_f // rows) + r[:, None]  # (out, in/d)


def compress_codebooks(C: torch.Tensor, codebook_bits: int):
    """C: (n, k, d) float32 -> (stored codebooks, scales or None, their exact float32 values)."""
    if codebook_bits == 16:
        cb = C.to(torch.float16)
        return cb, None, cb.float()
    amax = C.abs().flatten(1).amax(1)  # (n,)
    scale = (amax / 127).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero codebook / fp16 underflow
    q = torch.clamp(torch.round(C / scale.float()[:, None, None]), -128, 127).to(torch.int8)
    return q, scale, codebook_values(q, scale)


# ----------------------------------------------------------------------------- the scheme / budget
@dataclass(frozen=True)
class Scheme:
    vq_dim: int
    num_centroids: int
    rows_per_group: int
    columns_per_group: int
    codebook_bits: int

    @property
    def index_bits(self) -> int:
        return int(round(math.log2(self.num_centroids)))

    @property
    def group_size(self) -> int:
        return self.rows_per_group * self.columns_per_group

    def codebook_storage_bits(self) -> int:
        return self.num_centroids * self.vq_dim * self.codebook_bits + (SCALE_BITS if self.codebook_bits == 8 else 0)

    def total_bits(self, out_f: int, in_f: int) -> float:
        """Realized total bits/weight on an (out, in) layer, exactly as GPTVQWeight stores it."""
        n = out_f * in_f
        idx = math.ceil(n // self.vq_dim * self.index_bits / 8) * 8
        ncb = (out_f // self.rows_per_group) * (in_f // self.columns_per_group)
        return (idx + ncb * self.codebook_storage_bits()) / n

    def describe(self) -> str:
        return (f"d={self.vq_dim}, k={self.num_centroids}, group_size={self.group_size} "
                f"({self.rows_per_group} rows x {self.columns_per_group} columns)")


def _divisors(n: int) -> List[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _nearest(values: Sequence[int], target: float) -> List[int]:
    """The valid values just below and just above target (one of them when target is outside)."""
    below = [v for v in values if v <= target]
    above = [v for v in values if v >= target]
    return sorted({v for v in (max(below, default=None), min(above, default=None)) if v is not None})


def _column_options(in_f: int, d: int, columns: Optional[int]) -> List[int]:
    return [c for c in _divisors(in_f) if c % d == 0] if columns is None else [columns]


def _shape_pairs(out_f: int, in_f: int, d: int, group_size: Optional[int], columns: Optional[int]):
    """(rows, cols) blocks that tile an (out, in) layer with d | cols."""
    pairs = [(r, c) for c in _column_options(in_f, d, columns) for r in _divisors(out_f)]
    if group_size is not None:
        pairs = [(r, c) for r, c in pairs if r * c == group_size]
    return pairs


def _validate_structure(out_f: int, in_f: int, d: int, group_size: Optional[int], columns: Optional[int]) -> None:
    """Raise BudgetError when d / columns_per_group / group_size cannot tile an (out, in) layer."""
    shape = f"({out_f}, {in_f}) layer"
    if in_f % d:
        valid = [v for v in VQ_DIMS if in_f % v == 0]
        raise BudgetError(f"method.vq_dim={d} does not divide in_features={in_f} of a {shape}; valid vq_dim: {valid}")
    if columns is not None:
        if columns % d or in_f % columns:
            valid = [c for c in _divisors(in_f) if c % d == 0]
            why = (f"is not a multiple of vq_dim={d}" if columns % d else f"does not divide in_features={in_f}")
            dims = [v for v in VQ_DIMS if columns % v == 0]
            raise BudgetError(f"method.columns_per_group={columns} {why} ({shape}); nearest valid columns_per_group "
                              f"for vq_dim={d}: {_nearest(valid, columns)}" + (f"; vq_dim dividing {columns}: {dims}"
                                                                              if columns % d else ""))
    if group_size is not None and not _shape_pairs(out_f, in_f, d, group_size, columns):
        valid = sorted({r * c for r, c in _shape_pairs(out_f, in_f, d, None, columns)})
        if columns is not None and group_size % columns == 0:
            why = f"its {group_size // columns} rows do not divide out_features={out_f}"
        elif columns is not None:
            why = f"it is not a multiple of columns_per_group={columns}"
        else:
            why = f"no block of rows x columns (columns a multiple of vq_dim={d}) has that many weights"
        raise BudgetError(f"method.group_size={group_size} cannot tile a {shape} with vq_dim={d}: {why}; "
                          f"nearest valid group_size: {_nearest(valid, group_size)}")


def choose_scheme(out_f: int, in_f: int, *, bits: Optional[float], tolerance: float, vq_dim: Optional[int] = None,
                  num_centroids: Optional[int] = None, group_size: Optional[int] = None,
                  columns_per_group: Optional[int] = None, column_target: int = 256,
                  max_centroids: int = 4096, codebook_bits: int = 8, _hints: bool = True) -> Scheme:
    """The budget rule (see the module docstring) for one (out, in) layer shape."""
    if vq_dim is not None and vq_dim not in VQ_DIMS:
        raise BudgetError(f"method.vq_dim={vq_dim} is not supported; valid: {', '.join(map(str, VQ_DIMS))}")
    if num_centroids is not None and (num_centroids < 2 or num_centroids & (num_centroids - 1)):
        lo = 2 ** max(1, int(math.floor(math.log2(max(num_centroids, 2)))))
        raise BudgetError(f"method.num_centroids={num_centroids} must be a power of two >= 2; nearest valid: "
                          f"{sorted({lo, lo * 2})}")
    if codebook_bits not in CODEBOOK_BITS:
        raise BudgetError(f"method.codebook_bits={codebook_bits} is not supported; valid: 8 (int8 + float16 scale), "
                          f"16 (float16)")
    for fld, v in (("group_size", group_size), ("columns_per_group", columns_per_group)):
        if v is not None and v < 1:
            raise BudgetError(f"method.{fld}={v} must be a positive integer or null")
    dims = [vq_dim] if vq_dim is not None else list(VQ_DIMS)
    if vq_dim is not None or len([v for v in dims if in_f % v == 0]) == 0:
        _validate_structure(out_f, in_f, dims[0], group_size, columns_per_group)
    limit = None if bits is None else bits + tolerance
    if limit is None and None in (vq_dim, num_centroids, group_size):
        raise BudgetError("gptvq needs bits= (a total bits/weight budget) unless method.vq_dim, "
                          "method.num_centroids and method.group_size are all given")
    candidates = []
    for d in dims:
        if in_f % d:
            continue
        if vq_dim is None:
            try:
                _validate_structure(out_f, in_f, d, group_size, columns_per_group)
            except BudgetError:
                continue
        ks = [num_centroids] if num_centroids is not None else \
            [2 ** m for m in range(1, int(math.log2(max_centroids)) + 1)]
        for k in ks:
            for r, c in _shape_pairs(out_f, in_f, d, group_size, columns_per_group):
                candidates.append(Scheme(d, k, r, c, codebook_bits))
    if not candidates:  # only reachable when no d divides the layer with the given structure
        _validate_structure(out_f, in_f, dims[0], group_size, columns_per_group)
        raise BudgetError(f"no gptvq scheme tiles a ({out_f}, {in_f}) layer; valid vq_dim: "
                          f"{[v for v in VQ_DIMS if in_f % v == 0]}")
    def preference(s: Scheme):
        return (s.index_bits / s.vq_dim, s.vq_dim, -s.group_size, -abs(s.columns_per_group - column_target),
                s.columns_per_group)

    if limit is None:  # every parameter explicit: no budget to check
        return max(candidates, key=preference)
    feasible = [s for s in candidates if s.total_bits(out_f, in_f) <= limit + 1e-12]
    if feasible:
        return max(feasible, key=preference)
    # nothing fits: name the cheapest scheme and the nearest valid values of the fixed fields
    cheapest = min(candidates, key=lambda s: s.total_bits(out_f, in_f))
    need = cheapest.total_bits(out_f, in_f)
    hints = []
    if _hints and (group_size is not None or num_centroids is not None):
        free = choose_scheme_or_none(out_f, in_f, bits, tolerance, vq_dim, columns_per_group, max_centroids,
                                     codebook_bits, num_centroids=num_centroids)
        if group_size is not None and free is not None:
            hints.append(f"group_size >= {free.group_size} (e.g. {free.describe()})")
        free = choose_scheme_or_none(out_f, in_f, bits, tolerance, vq_dim, columns_per_group, max_centroids,
                                     codebook_bits, group_size=group_size)
        if num_centroids is not None and free is not None:
            hints.append(f"num_centroids <= {free.num_centroids} (e.g. {free.describe()})")
    hints.append(f"bits >= {need - tolerance:.3f}")
    raise BudgetError(f"bits={bits:g} (+ tolerance {tolerance:g}) is impossible for gptvq on a ({out_f}, {in_f}) "
                      f"layer: the cheapest allowed scheme ({cheapest.describe()}) needs {need:.3f} bits/weight; "
                      f"nearest valid: {'; '.join(hints)}")


def choose_scheme_or_none(out_f, in_f, bits, tolerance, vq_dim, columns_per_group, max_centroids, codebook_bits,
                          num_centroids=None, group_size=None) -> Optional[Scheme]:
    try:
        return choose_scheme(out_f, in_f, bits=bits, tolerance=tolerance, vq_dim=vq_dim, num_centroids=num_centroids,
                             group_size=group_size, columns_per_group=columns_per_group,
                             max_centroids=max_centroids, codebook_bits=codebook_bits, _hints=False)
    except BudgetError:
        return None


# ----------------------------------------------------------------------------- EM (§3.2)
def weighted_assign(X: torch.Tensor, Wt: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """argmin_k Σ_j Wt[n, j] (X[g, n, j] - C[g, k, j])².

    X: (G, N, d); Wt: (N, d) positive weights (shared by the G groups); C: (G, K, d) -> (G, N) int64.
    Σ_j w x² does not depend on k, so dist ≅ [w, w·x] @ [c², -2c]ᵀ: one matmul of inner size 2d.
    """
    G, N, d = X.shape
    K = C.shape[1]
    out = torch.empty(G, N, dtype=torch.int64, device=X.device)
    B = torch.cat([C * C, -2 * C], -1).transpose(1, 2)  # (G, 2d, K)
    step = max(1, _DIST_CHUNK // max(1, G * K))
    for n0 in range(0, N, step):
        x = X[:, n0:n0 + step]  # (G, n, d)
        w = Wt[n0:n0 + step].expand(G, -1, -1)  # (G, n, d)
        A = torch.cat([w, w * x], -1)  # (G, n, 2d)
        out[:, n0:n0 + step] = torch.bmm(A, B).min(-1).indices  # (G, n, K) -> (G, n)
    return out


def mahalanobis_seed(X: torch.Tensor, k: int) -> torch.Tensor:
    """X: (G, N, d) -> (G, k, d): the vectors at k evenly spaced ranks of their Mahalanobis
    distance to the group mean (GPTVQ's Mahalanobis initialisation; for d=1, quantiles)."""
    G, N, d = X.shape
    Xc = X - X.mean(1, keepdim=True)  # (G, N, d)
    S = Xc.transpose(1, 2) @ Xc / N  # (G, d, d)
    ridge = 1e-6 * S.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # (G,)
    S = S + ridge[:, None, None] * torch.eye(d, device=X.device)
    m = (torch.linalg.solve(S, Xc.transpose(1, 2)).transpose(1, 2) * Xc).sum(-1)  # (G, N)
    order = torch.argsort(m, dim=1, stable=True)  # (G, N)
    ranks = torch.round(torch.linspace(0, N - 1, k, device=X.device)).long()  # (k,)
    pick = order[:, ranks]  # (G, k)
    return torch.gather(X, 1, pick[..., None].expand(-1, -1, d)).clone()


def weighted_kmeans(X: torch.Tensor, Wt: torch.Tensor, C: torch.Tensor, iters: int) -> torch.Tensor:
    """Hessian-weighted EM: X (G, N, d), Wt (N, d), C (G, K, d) initial -> C (G, K, d).

    M-step: per centroid and dimension the Wt-weighted mean of its vectors; an empty centroid
    keeps its value. Stops early once the assignment no longer changes."""
    G, N, d = X.shape
    K = C.shape[1]
    C = C.clone()
    WX = (Wt[None] * X).reshape(G * N, d)  # (G·N, d)
    Wfull = Wt[None].expand(G, N, d).reshape(G * N, d)
    base = (torch.arange(G, device=X.device) * K)[:, None]  # (G, 1)
    prev = None
    for _ in range(iters):
        a = weighted_assign(X, Wt, C)  # (G, N)
        if prev is not None and torch.equal(a, prev):
            break
        prev = a
        flat = (a + base).reshape(-1)  # (G·N,)
        num = torch.stack([torch.bincount(flat, WX[:, j], minlength=G * K) for j in range(d)], 1)  # (G·K, d)
        den = torch.stack([torch.bincount(flat, Wfull[:, j], minlength=G * K) for j in range(d)], 1)
        upd = den > 0
        Cf = C.reshape(G * K, d)
        Cf[upd] = num[upd] / den[upd]
        C = Cf.reshape(G, K, d)
    return C


# ----------------------------------------------------------------------------- codebook update (§3.3)
def update_codebooks(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, flat_ids: torch.Tensor, iters: int):
    """A few preconditioned gradient steps on tr((W - Ŵ) H (W - Ŵ)ᵀ) over the centroids.

    W: (out, in); H: (in, in); C: (n_cb·k, d) float32; flat_ids: (out, in/d) centroid row of each
    vector. Direction: -grad / diag-curvature; step: the exact minimiser along it (quadratic).
    -> (C updated, loss before, loss after)."""
    out_f, in_f = W.shape
    d = C.shape[1]
    ids = flat_ids.reshape(-1)  # (out·in/d,)
    C = C.clone()
    R = W - C[ids].reshape(out_f, in_f)  # (out, in)
    RH = R @ H  # (out, in)
    loss0 = float((R.double() * RH.double()).sum())
    curv = torch.zeros_like(C).index_add_(0, ids, torch.diagonal(H).reshape(1, -1, d)
                                          .expand(out_f, -1, -1).reshape(-1, d))  # (n_cb·k, d), /2
    loss = loss0
    for _ in range(iters):
        gradQ = -RH  # ∂loss/∂Ŵ / 2, (out, in)
        g = torch.zeros_like(C).index_add_(0, ids, gradQ.reshape(-1, d))  # (n_cb·k, d)
        D = torch.where(curv > 0, -g / curv.clamp_min(1e-30), torch.zeros_like(g))
        dQ = D[ids].reshape(out_f, in_f)
        dQH = dQ @ H
        num = float((gradQ.double() * dQ.double()).sum())
        den = float((dQ.double() * dQH.double()).sum())
        if not (den > 0 and num < 0):
            break
        alpha = -num / den
        C += alpha * D
        RH -= alpha * dQH
        R -= alpha * dQ
        new = float((R.double() * RH.double()).sum())
        if not new < loss:
            break
        loss = new
    return C, loss0, loss


def _proxy(W, H, Q) -> float:
    R = (W - Q).double()
    return float((R @ H.double() * R).sum())


# ----------------------------------------------------------------------------- the algorithm
@torch.no_grad()
def gptvq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, *, kmeans_iters: int = 10,
                   update_iters: int = 10, block_size: int = 128, percdamp: float = 0.01,
                   assign_metric: str = "block"):
    """-> (GPTVQWeight, SolverResult). W: (out, in); H: (in, in) = E[x xᵀ].

    With update_iters=0 the solver's Q (what the error feedback used) is bitwise the weight's
    dequantize(); with updates, dequantize() is the updated (and again compressed) codebooks'."""
    W, H, _dead = prepare_hessian(W, H)
    out_f, in_f = W.shape
    d, K = scheme.vq_dim, scheme.num_centroids
    rows, cols = scheme.rows_per_group, scheme.columns_per_group
    if out_f % rows or in_f % cols or cols % d:
        raise BudgetError(f"scheme {scheme.describe()} does not tile a ({out_f}, {in_f}) layer")
    n_rg, n_cg = out_f // rows, in_f // cols
    dev = W.device
    U = solver_inverse_cholesky(H, percdamp, None)  # (in, in) upper
    wcol = 1.0 / torch.diagonal(U) ** 2  # (in,) 1/[H⁻¹]_jj of the remaining problem
    running = RunningWeight(W, U)
    stored = [None] * n_cg  # per stripe: (codebooks, scales)
    values = torch.zeros(n_cg, n_rg, K, d, device=dev)  # exact stored centroid values
    idx = torch.zeros(out_f, in_f // d, dtype=torch.int64, device=dev)  # (out, in/d)
    if assign_metric not in ASSIGN_METRICS:
        raise ValueError(f"method.assign_metric={assign_metric!r}; valid: {', '.join(ASSIGN_METRICS)}")
    block_metric = assign_metric == "block" and d > 1
    eye = torch.eye(d, device=dev)
    ones = torch.ones(rows, d, device=dev)

    def quantize_cols(col: int, Wc: torch.Tensor) -> torch.Tensor:  # Wc: (out, d)
        cg = col // cols
        if col % cols == 0:  # §3.2: fit the stripe's codebooks on the updated weights
            Xs = running.columns(col, col + cols)  # (out, cols)
            X = Xs.reshape(n_rg, rows, cols // d, d).reshape(n_rg, rows * (cols // d), d)  # (G, N, d)
            Wt = wcol[col:col + cols].reshape(1, cols // d, d).expand(rows, -1, -1).reshape(-1, d)  # (N, d)
            C = weighted_kmeans(X, Wt, mahalanobis_seed(X, K), kmeans_iters)  # (G, K, d)
            cb, sc, val = compress_codebooks(C, scheme.codebook_bits)
            stored[cg] = (cb, sc)
            values[cg] = val
        C = values[cg]  # (G, K, d)
        x = Wc.reshape(n_rg, rows, d)  # (G, rows, d)
        if block_metric:  # exact: ||(x - c) U_dd⁻¹||², Euclidean after the change of basis A
            A = torch.linalg.solve_triangular(U[col:col + d, col:col + d], eye, upper=True)  # (d, d) = U_dd⁻¹
            a = weighted_assign(x @ A, ones, C @ A)  # (G, rows)
        else:  # the reference code's diagonal approximation
            a = weighted_assign(x, wcol[col:col + d].expand(rows, d), C)  # (G, rows)
        idx[:, col // d] = a.reshape(out_f)
        q = torch.gather(C, 1, a[..., None].expand(-1, -1, d)).reshape(out_f, d)  # (out, d)
        running.record(col, q)
        return q

    res: SolverResult = error_feedback(W, H, quantize_cols, block_size=block_size, step=d, percdamp=percdamp)
    codebooks = torch.cat([s[0] for s in stored])  # (n_cg·n_rg, K, d), codebook id = cg·n_rg + rg
    scales = None if scheme.codebook_bits == 16 else torch.cat([s[1] for s in stored])
    flat_ids = codebook_ids(out_f, in_f, d, rows, cols, dev) * K + idx  # (out, in/d)
    if update_iters > 0:  # §3.3, then compress again; keep whichever compressed codebook is better
        C0 = values.reshape(-1, d)
        C1, _, _ = update_codebooks(W, H, C0, flat_ids, update_iters)
        cb1, sc1, val1 = compress_codebooks(C1.reshape(-1, K, d), scheme.codebook_bits)
        before = _proxy(W, H, C0[flat_ids].reshape(out_f, in_f))
        after = _proxy(W, H, val1.reshape(-1, d)[flat_ids].reshape(out_f, in_f))
        if after < before:
            codebooks, scales = cb1, sc1
    qw = GPTVQWeight(pack_bits(idx, scheme.index_bits), codebooks, scales, out_features=out_f, in_features=in_f,
                     vq_dim=d, num_centroids=K, rows_per_group=rows, columns_per_group=cols)
    return qw, res


class GPTVQ(Method):
    name = "gptvq"

    @dataclass
    class Config:
        name: str = "gptvq"
        vq_dim: Optional[int] = None  # d in {1, 2, 4}: input columns per vector; null = budget
        num_centroids: Optional[int] = None  # k (power of two) per codebook; null = budget
        group_size: Optional[int] = None  # weights per codebook (rows x columns); null = budget
        columns_per_group: Optional[int] = None  # columns per codebook block; null = budget
        column_target: int = 256  # budget tie-break: preferred columns per codebook block
        max_centroids: int = 4096  # largest k the budget rule considers
        codebook_bits: int = 8  # 8: int8 codebooks + float16 scale each; 16: float16 codebooks
        kmeans_iters: int = 10  # EM iterations (at most) per codebook initialisation (§3.2)
        update_iters: int = 10  # codebook gradient steps after the pass (§3.3); 0 = off
        assign_metric: str = "block"  # block: exact d x d error-feedback loss; diag: reference code's
        block_size: int = 128  # lazy-update block of the error feedback (a multiple of vq_dim)
        percdamp: float = 0.01
        tolerance: float = 0.1  # realized total may exceed the target by at most this

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        c = config
        for fld in ("kmeans_iters", "update_iters"):
            if getattr(c, fld) < 0:
                raise ValueError(f"method.{fld}={getattr(c, fld)} must be >= 0")
        if c.vq_dim is not None and c.vq_dim not in VQ_DIMS:
            raise BudgetError(f"method.vq_dim={c.vq_dim} is not supported; valid: {', '.join(map(str, VQ_DIMS))}")
        if c.block_size < 1 or (c.vq_dim and c.block_size % c.vq_dim):
            raise ValueError(f"method.block_size={c.block_size} must be a positive multiple of vq_dim "
                             f"(valid: multiples of {c.vq_dim or 4}, e.g. 128)")
        if c.block_size % 4 and c.vq_dim is None:
            raise ValueError(f"method.block_size={c.block_size} must be a multiple of 4 when vq_dim is chosen by "
                             f"the budget (it may be 1, 2 or 4); e.g. 128")
        if c.assign_metric not in ASSIGN_METRICS:
            raise ValueError(f"method.assign_metric={c.assign_metric!r}; valid: {', '.join(ASSIGN_METRICS)}")

    def layer_plan(self, out_f, in_f) -> Scheme:
        c = self.config
        return choose_scheme(
            int(out_f), int(in_f), bits=self.bits, tolerance=c.tolerance, vq_dim=c.vq_dim,
            num_centroids=c.num_centroids, group_size=c.group_size, columns_per_group=c.columns_per_group,
            column_target=c.column_target, max_centroids=c.max_centroids, codebook_bits=c.codebook_bits)

    def settings(self, plan=None):
        # per layer shape, compact for tables: d, k and the block of weights one codebook serves
        return {**{f"{o}x{i}": f"d{s.vq_dim}k{s.num_centroids}/{s.rows_per_group}x{s.columns_per_group}"
                   for (o, i), s in sorted((plan or {}).items())},
                "codebook_bits": self.config.codebook_bits, "kmeans_iters": self.config.kmeans_iters,
                "update_iters": self.config.update_iters, "assign_metric": self.config.assign_metric}

    @torch.no_grad()
    def quantize_layer(self, W, H, *, name, plan=None):
        check_layer(W, H, name, self.name)
        c = self.config
        scheme = self.layer_plan(*W.shape) if plan is None else plan
        qw, _ = gptvq_quantize(W, H, scheme, kmeans_iters=c.kmeans_iters,
                               update_iters=c.update_iters, block_size=c.block_size, percdamp=c.percdamp,
                               assign_metric=c.assign_metric)
        return qw
