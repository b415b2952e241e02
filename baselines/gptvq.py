"""GPTVQ (van Baalen et al., arXiv 2402.15319): vector quantization placed by GPTQ's error feedback.

What is quantized: a vector is d weights of ONE output row in d ADJACENT INPUT columns
(d in {1, 2, 4}); W (out, in) holds out · in/d vectors. A codebook of k = 2^m centroids (d
values each) serves one block of `rows_per_group` rows × `columns_per_group` columns
(group_size = rows · columns weights), so a layer has (out/rows) · (in/columns) codebooks.

Two variants (`variant=`), the same storage format and budget rule:

`reference` (default): what Qualcomm-AI-research/gptvq's released code (`gptq.py`
`GPTQ.fasterquant`, `vq_quant.py`) does with its paper scripts' flags (test_bigtable.sh:
--kmeans-init-method mahalanobis --hessian-weighted-lookups --include-m-step
--codebook-bitwidth 8 --quantize-per-codebook, optionally --vq-scaling-blocksize, --svd-rank),
step for step, including choices we would make differently:
  * the loop (§3.1): GPTQ's lazy-block error feedback, d columns per step; every column of a
    vector takes its error (w_c - q_c) / U_cc from the values the step started with and the
    errors reach only the columns after the vector ("diagonal" propagation, U = chol(H⁻¹) upper);
  * codebooks (§3.2), fitted when the pass reaches a column stripe, on their `W`: the weight as
    the lazy block updates left it (errors of earlier BLOCKS only); Mahalanobis initialisation
    (k vectors at evenly spaced ranks of (x-μ)ᵀΣ⁻¹(x-μ)); EM weighted by U_jj for d > 1 and
    unweighted for d = 1; an empty centroid becomes 0; then int8 per codebook, scale =
    max|c| / 127 (float32 in their code);
  * assignment: argmin_c Σ_j (x_j - c_j)² / U_jj for d > 1 (plain L2 for d = 1);
  * optional blockwise data normalisation (`vq_scaling_blocksize` b, their --vq-scaling-*:
    max-abs per row and b columns, log10 domain, 4-bit per column block across rows): each lazy
    block's weights are normalised once, at the block start, and the assignments of that block
    read those normalised values (their `W1_scaled`: later in-block updates are not seen);
  * codebook update (§3.3): Adam (lr 1e-3, 25 steps) on all centroids for the proxy loss
    tr((W - Ŵ) H (W - Ŵ)ᵀ), restarted with lr/10 whenever the loss rises above the start; then
    int8 again, kept whatever its loss;
  * optional SVD codebook compression (§3.4, `svd_rank` ρ, d = 1, inside the update): all of
    a layer's codebooks, each sorted, as one (n_cb, k) matrix C ≈ A V, rank r = int(k·ρ); Adam
    updates A only (V is in their optimizer's list but never requires a gradient); A and V are
    what is stored.

`exact` (ours): loss-consistent weights and updates. EM with w_j = 1 / U_jj² (= 1/[H⁻¹]_jj of
the remaining problem), codebooks fitted on the exactly updated weights (`RunningWeight`),
assignment by the error feedback's own d x d loss ||(x - c) U_dd⁻¹||² (`assign_metric=block`;
`diag`: Σ (x_j - c_j)² / U_jj²), exact joint propagation within a vector, a ridge in the
Mahalanobis seed, an empty centroid keeps its value, float16 codebook scale before int8
coding (the loop sees exactly what is stored), and a preconditioned gradient update with exact
line search kept only if the stored (compressed) result lowers the loss. On the fidelity layer
(tests/data/fidelity_reference.json) its loss is recorded beside the reference's.

Iteration counts are a separate axis (`iters=cpu|paper`): EM iterations 10 | 100 (their paper
scripts: --kmeans-iters 100); the update's steps follow the variant (reference: Adam 25 steps, as
their code; exact: 10 line-search steps). Explicit `kmeans_iters` / `update_iters` override.

Stored (`GPTVQWeight`): indices packed at m = log2 k bits each (uint8 bit stream), codebooks
(n_cb, k, d) int8 + one float16 scale each, or float16 (`codebook_bits=16`); with SVD the
factors A (n_cb, r) (int8 + float16 scale, or float16) and V (r, k) float16; with
normalisation the codes (out, in/b) at 4 bits and (min, step) float32 per column block. What is
stored is counted (`storage()`), and `dequantize()` reads only it. The reference computes in
float32 as their code does; its float16 scales (codebooks, SVD factors) are rounded when
stored, which moves the proxy loss by less than 0.1% on the fidelity layer.

Budget rule (`choose_scheme`, per layer shape): among the schemes whose realized total bits
(packed indices + codebooks + scales [+ normalisation, SVD factors]) fit `bits + tolerance`,
take the most index bits per weight (m / d), then the larger d (the paper's "blessing of
dimensionality"), then the smallest group (more codebooks), then the column count closest to
`column_target` (256, their --columns-per-group). Fields given explicitly (vq_dim,
num_centroids, group_size, columns_per_group) fix that choice; a budget or a combination
nothing can meet raises BudgetError naming the nearest valid values.

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
from vptq.numerics import (Segments, ceil_log2, pack_bits, round_fp16, unpack_bits, weighted_assign,  # noqa: F401
                           weighted_lloyd)
from vptq.qweight import QuantizedWeight, Storage
from vptq.solver import SolverResult, error_feedback, prepare_hessian

VQ_DIMS = (1, 2, 4)
VARIANTS = ("reference", "exact")
ITERS = {"cpu": {"kmeans_iters": 10}, "paper": {"kmeans_iters": 100}}
UPDATE_ITERS = {"reference": 25, "exact": 10}  # their Adam steps | our line-search steps
ASSIGN_METRICS = ("block", "diag")
CODEBOOK_BITS = (8, 16)  # 8: int8 + one float16 scale per codebook; 16: float16 codebooks
SCALE_BITS = 16
NORM_PARAM_BITS = 32  # (min, step) of the normalisation, float32 per column block
_DIFF_CHUNK = 1 << 22  # elements of one (groups, vectors, centroids, d) difference tensor


# ----------------------------------------------------------------------------- the stored weight
class GPTVQWeight(QuantizedWeight):
    """A GPTVQ-quantized (out, in) weight.

    packed:    uint8 (ceil(out·(in/d)·m / 8),)  indices (out, in/d) row-major, m = log2 k bits each
    codebooks: int8 (n_cb, k, d) with scales float16 (n_cb,)   [codebook_bits=8]
               float16 (n_cb, k, d), scales None               [codebook_bits=16]
               with svd_basis V float16 (r, k): the factors A (n_cb, r) instead (d = 1)
    norm_codes: uint8 packed (out, in/b) codes at norm_bits, norm_params float32 (in/b, 2)
               = (min, step) per column block, or None: s[r, c] = 10^(code·step + min)
    Codebook of the vector at (row, v): (v·d // columns_per_group) · n_row_groups + row // rows_per_group.
    ŵ[row, v·d + j] = codebook[cb(row, v)][index[row, v], j] (· s[row, v·d + j])
    """

    def __init__(self, packed, codebooks, scales, *, out_features: int, in_features: int, vq_dim: int,
                 num_centroids: int, rows_per_group: int, columns_per_group: int, svd_basis=None,
                 norm_codes=None, norm_params=None, norm_blocksize: int = 0, norm_bits: int = 0):
        self.packed = packed
        self.codebooks = codebooks
        self.scales = scales
        self.svd_basis = svd_basis
        self.norm_codes, self.norm_params = norm_codes, norm_params
        self.norm_blocksize, self.norm_bits = int(norm_blocksize), int(norm_bits)
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.vq_dim = int(vq_dim)
        self.num_centroids = int(num_centroids)
        self.index_bits = ceil_log2(num_centroids)
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
        C = codebook_values(self.codebooks, self.scales)
        if self.svd_basis is not None:
            C = (C.reshape(C.shape[0], -1) @ self.svd_basis.float())[..., None]  # (n_cb, r) @ (r, k) -> (n_cb, k, 1)
        return C

    def codebook_ids(self) -> torch.Tensor:
        """(out, in/d) int64: which codebook each vector uses."""
        return codebook_ids(self.out_features, self.in_features, self.vq_dim, self.rows_per_group,
                            self.columns_per_group, self.packed.device)

    def norm_scales(self) -> Optional[torch.Tensor]:
        """(out, in) float32 normalisation scales, or None."""
        if self.norm_codes is None:
            return None
        nb = self.in_features // self.norm_blocksize
        codes = unpack_bits(self.norm_codes, self.norm_bits, self.out_features * nb).reshape(self.out_features, nb)
        return norm_scales(codes, self.norm_params).repeat_interleave(self.norm_blocksize, dim=1)

    def dequantize(self, dtype=torch.float32):
        C = self.codebook_values().reshape(-1, self.vq_dim)  # (n_cb·k, d)
        flat = self.codebook_ids() * self.num_centroids + self.indices()  # (out, in/d)
        Q = C.index_select(0, flat.reshape(-1)).reshape(self.out_features, self.in_features)
        S = self.norm_scales()
        return (Q if S is None else Q * S).to(dtype)

    def storage(self) -> Storage:
        bits = {"indices": int(self.packed.numel()) * 8,
                "codebooks": int(self.codebooks.numel()) * self.codebooks.element_size() * 8}
        if self.scales is not None:
            bits["codebook_scales"] = int(self.scales.numel()) * self.scales.element_size() * 8
        if self.svd_basis is not None:
            bits["svd_basis"] = int(self.svd_basis.numel()) * self.svd_basis.element_size() * 8
        if self.norm_codes is not None:
            bits["norms"] = int(self.norm_codes.numel()) * 8 + int(self.norm_params.numel()) * NORM_PARAM_BITS
        return Storage(self.out_features * self.in_features, bits)

    def to(self, device):
        for k in ("packed", "codebooks", "scales", "svd_basis", "norm_codes", "norm_params"):
            t = getattr(self, k)
            setattr(self, k, None if t is None else t.to(device))
        return self

    def settings(self) -> Dict[str, object]:
        s = {"vq_dim": self.vq_dim, "num_centroids": self.num_centroids,
             "group_size": self.rows_per_group * self.columns_per_group,
             "rows_per_group": self.rows_per_group, "columns_per_group": self.columns_per_group,
             "codebook_bits": 16 if self.codebooks.dtype == torch.float16 else 8}
        if self.svd_basis is not None:
            s["svd_rank"] = int(self.svd_basis.shape[0])
        if self.norm_codes is not None:
            s["vq_scaling_blocksize"] = self.norm_blocksize
        return s


def codebook_values(codebooks: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    """Stored codebooks (n, ...) [int8 with (n,) scales, or float16] -> float32 values."""
    if scales is None:
        return codebooks.float()
    return codebooks.float() * scales.float().reshape(-1, *([1] * (codebooks.dim() - 1)))


def codebook_ids(out_f: int, in_f: int, d: int, rows: int, cols: int, device) -> torch.Tensor:
    r = torch.arange(out_f, device=device) // rows  # (out,)
    c = (torch.arange(in_f // d, device=device) * d) // cols  # (in/d,)
    return c[None, :] * (out_f // rows) + r[:, None]  # (out, in/d)


def compress_codebooks(C: torch.Tensor, codebook_bits: int):
    """Ours (variant=exact): C (n, k, d) float32 -> (stored codebooks, scales or None, their exact
    float32 values); the int8 codes are taken against the float16 scale that is stored."""
    if codebook_bits == 16:
        cb = C.to(torch.float16)
        return cb, None, cb.float()
    amax = C.abs().flatten(1).amax(1)  # (n,)
    scale = (amax / 127).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero codebook / fp16 underflow
    q = torch.clamp(torch.round(C / scale.float()[:, None, None]), -128, 127).to(torch.int8)
    return q, scale, codebook_values(q, scale)


def int8_codebooks(C: torch.Tensor):
    """The reference's `quantize_centroids(C, 8, per_codebook=True)`: C (n, ...) float32 ->
    (int8 codes, float32 scale (n,), the values codes · scale it continues with). Symmetric,
    scale = max(|min|, max) / 127 per codebook (an all-zero codebook gets scale 1 here; theirs
    would divide by zero)."""
    flat = C.flatten(1)  # (n, k·d)
    scale = torch.maximum(flat.min(1).values.abs(), flat.max(1).values) / 127  # (n,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clip(torch.round(flat / scale[:, None]), -128, 127)
    return q.to(torch.int8).reshape(C.shape), scale, (q * scale[:, None]).reshape(C.shape)


# ----------------------------------------------------------------------------- the scheme / budget
@dataclass(frozen=True)
class Scheme:
    """One layer's GPTVQ settings (its layer plan): what is stored and how much."""

    vq_dim: int
    num_centroids: int
    rows_per_group: int
    columns_per_group: int
    codebook_bits: int
    scaling_blocksize: int = 0  # blockwise normalisation: columns per scale (0 = off)
    scaling_bits: int = 4
    svd_rank: float = 0.0  # SVD codebook compression: rank = int(k · svd_rank) (0 = off)

    @property
    def index_bits(self) -> int:
        return ceil_log2(self.num_centroids)

    @property
    def group_size(self) -> int:
        return self.rows_per_group * self.columns_per_group

    @property
    def rank(self) -> int:
        return int(self.num_centroids * self.svd_rank)

    def codebook_storage_bits(self) -> int:
        entries = self.rank if self.svd_rank else self.num_centroids * self.vq_dim
        return entries * self.codebook_bits + (SCALE_BITS if self.codebook_bits == 8 else 0)

    def total_bits(self, out_f: int, in_f: int) -> float:
        """Realized total bits/weight on an (out, in) layer, exactly as GPTVQWeight stores it."""
        n = out_f * in_f
        idx = math.ceil(n // self.vq_dim * self.index_bits / 8) * 8
        ncb = (out_f // self.rows_per_group) * (in_f // self.columns_per_group)
        bits = idx + ncb * self.codebook_storage_bits()
        if self.svd_rank:
            bits += self.rank * self.num_centroids * 16
        if self.scaling_blocksize:
            nb = in_f // self.scaling_blocksize
            bits += math.ceil(out_f * nb * self.scaling_bits / 8) * 8 + nb * 2 * NORM_PARAM_BITS
        return bits / n

    def describe(self) -> str:
        s = (f"d={self.vq_dim}, k={self.num_centroids}, group_size={self.group_size} "
             f"({self.rows_per_group} rows x {self.columns_per_group} columns)")
        if self.scaling_blocksize:
            s += f", normalised per {self.scaling_blocksize} columns ({self.scaling_bits} b)"
        if self.svd_rank:
            s += f", SVD rank {self.rank}"
        return s

    def short(self) -> str:
        s = f"d{self.vq_dim}k{self.num_centroids}/{self.rows_per_group}x{self.columns_per_group}"
        if self.scaling_blocksize:
            s += f"/s{self.scaling_blocksize}"
        if self.svd_rank:
            s += f"/svd{self.rank}"
        return s


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
                  max_centroids: int = 4096, codebook_bits: int = 8, scaling_blocksize: int = 0,
                  scaling_bits: int = 4, svd_rank: float = 0.0, _hints: bool = True) -> Scheme:
    """The budget rule (see the module docstring) for one (out, in) layer shape. The optional
    blockwise normalisation (scaling_*) and SVD codebook compression (svd_rank) are counted in
    every candidate's bits; they are never switched on by the rule itself."""
    extras = dict(scaling_blocksize=int(scaling_blocksize or 0), scaling_bits=int(scaling_bits),
                  svd_rank=float(svd_rank or 0.0))
    if extras["scaling_blocksize"] and in_f % extras["scaling_blocksize"]:
        raise BudgetError(f"method.vq_scaling_blocksize={scaling_blocksize} does not divide in_features={in_f}; "
                          f"valid: {[b for b in _divisors(in_f) if b <= 256]}")
    if extras["svd_rank"] and vq_dim not in (None, 1):
        raise BudgetError(f"method.svd_rank={svd_rank} needs vq_dim=1 (GPTVQ's SVD compresses 1-D codebooks); "
                          f"got vq_dim={vq_dim}")
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
    dims = [vq_dim] if vq_dim is not None else ([1] if extras["svd_rank"] else list(VQ_DIMS))
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
                if extras["scaling_blocksize"] and c % extras["scaling_blocksize"]:
                    continue
                if extras["svd_rank"] and int(k * extras["svd_rank"]) < 1:
                    continue
                candidates.append(Scheme(d, k, r, c, codebook_bits, **extras))
    if not candidates and extras["scaling_blocksize"]:
        raise BudgetError(f"method.vq_scaling_blocksize={scaling_blocksize}: no codebook block of this layer "
                          f"({out_f}, {in_f}) has a multiple of it as its column count; valid: a divisor of "
                          f"columns_per_group={columns_per_group}" if columns_per_group else
                          f"method.vq_scaling_blocksize={scaling_blocksize} fits no codebook block of a "
                          f"({out_f}, {in_f}) layer")
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
                                     codebook_bits, num_centroids=num_centroids, extras=extras)
        if group_size is not None and free is not None:
            hints.append(f"group_size >= {free.group_size} (e.g. {free.describe()})")
        free = choose_scheme_or_none(out_f, in_f, bits, tolerance, vq_dim, columns_per_group, max_centroids,
                                     codebook_bits, group_size=group_size, extras=extras)
        if num_centroids is not None and free is not None:
            hints.append(f"num_centroids <= {free.num_centroids} (e.g. {free.describe()})")
    hints.append(f"bits >= {need - tolerance:.3f}")
    raise BudgetError(f"bits={bits:g} (+ tolerance {tolerance:g}) is impossible for gptvq on a ({out_f}, {in_f}) "
                      f"layer: the cheapest allowed scheme ({cheapest.describe()}) needs {need:.3f} bits/weight; "
                      f"nearest valid: {'; '.join(hints)}")


def choose_scheme_or_none(out_f, in_f, bits, tolerance, vq_dim, columns_per_group, max_centroids, codebook_bits,
                          num_centroids=None, group_size=None, extras=None) -> Optional[Scheme]:
    try:
        return choose_scheme(out_f, in_f, bits=bits, tolerance=tolerance, vq_dim=vq_dim, num_centroids=num_centroids,
                             group_size=group_size, columns_per_group=columns_per_group,
                             max_centroids=max_centroids, codebook_bits=codebook_bits, _hints=False, **(extras or {}))
    except BudgetError:
        return None



# ----------------------------------------------------------------------------- EM (§3.2)
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


# ----------------------------------------------------------------------------- variant=exact
def _quantize_exact(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, *, kmeans_iters: int, update_iters: int,
                    block_size: int, percdamp: float, assign_metric: str):
    """variant=exact -> (GPTVQWeight, SolverResult). W: (out, in); H: (in, in) = E[x xᵀ].

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
            C = weighted_lloyd(X, Wt, mahalanobis_seed(X, K), kmeans_iters, empty="keep")  # (G, K, d)
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


# ----------------------------------------------------------------------------- variant=reference
def mahalanobis_init_reference(X: torch.Tensor, k: int) -> torch.Tensor:
    """Their `mahalanobis_init`: X (G, N, d) -> (G, k, d), the vectors at k evenly spaced ranks of
    (x-μ)ᵀ Σ⁻¹ (x-μ) with Σ = Σ_n (x_n-μ)(x_n-μ)ᵀ (no ridge; torch's default argsort)."""
    G, N, d = X.shape
    Xc = X - X.mean(1).unsqueeze(1)  # (G, N, d)
    Lam = torch.linalg.inv(torch.bmm(Xc.transpose(1, 2), Xc))  # (G, d, d)
    dist = (torch.bmm(Xc, Lam) * Xc).sum(-1)  # (G, N)
    order = torch.argsort(dist, dim=1)  # (G, N)
    ranks = torch.round(torch.linspace(0, N - 1, k)).long()  # (k,)
    return torch.gather(X, 1, order[:, ranks].unsqueeze(-1).expand(-1, -1, d))


def assign_reference(X: torch.Tensor, C: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """Their `get_assignments`: argmin_k Σ_j w_j (X_j - C_kj)² (w None: unweighted). X (G, N, d),
    C (G, K, d), w (N, d) or (1, d) or None -> (G, N) int64. Computed in the expanded form
    [w, w·x] @ [c², -2c]ᵀ (`weighted_assign`, one matmul; they sum the squared differences): the
    two agree but for near ties (the fidelity test measures the whole method within 0.01%)."""
    G, N, d = X.shape
    w = torch.ones(1, d, device=X.device) if w is None else w
    return weighted_assign(X, w.expand(N, d), C)


def assign_by_difference(X: torch.Tensor, C: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """Their `get_assignments` computed as they compute it, from the differences (d times the
    arithmetic of `assign_reference`; kept as its test oracle)."""
    G, N, d = X.shape
    K = C.shape[1]
    w = torch.ones(1, d, device=X.device) if w is None else w
    out = torch.empty(G, N, dtype=torch.int64, device=X.device)
    step = max(1, _DIFF_CHUNK // max(1, G * K * d))
    for n0 in range(0, N, step):
        x = X[:, n0:n0 + step].unsqueeze(2)  # (G, n, 1, d)
        wn = (w if w.shape[0] == 1 else w[n0:n0 + step]).unsqueeze(1)  # (n|1, 1, d)
        out[:, n0:n0 + step] = ((x - C.unsqueeze(1)).pow(2) * wn).sum(-1).argmin(-1)  # (G, n, K) -> (G, n)
    return out


def kmeans_reference(X: torch.Tensor, C: torch.Tensor, iters: int, w: Optional[torch.Tensor]) -> torch.Tensor:
    """Their `kmeans_vq` (E-step `get_assignments`, M-step `kmeans_m_step_3`): X (G, N, d),
    C (G, K, d), w (N, d) or None (unweighted) -> C. M-step: Σ w x / max(Σ w, 1e-10) (weighted)
    or Σ x / max(count, 1): an empty centroid becomes 0. Once an assignment repeats, the
    remaining iterations would repeat it too: they are skipped (same result)."""
    G, N, d = X.shape
    K = C.shape[1]
    wf = torch.ones(N, d, device=X.device) if w is None else w
    floor = 1.0 if w is None else 1e-10
    base = (torch.arange(G, device=X.device) * K)[:, None]  # (G, 1)
    WX = (wf.unsqueeze(0) * X).reshape(G * N, d)
    Wf = wf.unsqueeze(0).expand(G, N, d).reshape(G * N, d)
    prev = None
    for _ in range(iters):
        a = assign_reference(X, C, w)  # (G, N)
        if prev is not None and torch.equal(a, prev):
            break
        prev = a
        seg = Segments((a + base).reshape(-1), G * K)
        C = (seg.sum(WX) / seg.sum(Wf).clamp_min(floor)).reshape(G, K, d)
    return C


def blockwise_normalize(X: torch.Tensor, b: int, nbits: int):
    """Their `blockwise_normalize_data` (norm "max", domain "log", nbits < 16): X (out, m) ->
    (X / s, s (out, m), codes (out, m/b) int64, params (m/b, 2) float32 = (min, step)).
    s = 10^(step · code + min) per row and b columns: log10 of the max |x|, shifted by its
    minimum over rows, quantized to nbits per column block (step = max / (2^nbits - 1))."""
    out_f, m = X.shape
    Xb = X.reshape(out_f, m // b, b)
    s = Xb.abs().max(dim=2).values  # (out, m/b)
    log = torch.log10(s)
    log[s.abs() < 1.0e-8] = 0.0
    mn = log.min(dim=0, keepdim=True).values  # (1, m/b)
    log = log - mn
    step = torch.clamp(torch.maximum(log.min(dim=0, keepdim=True).values.abs(),
                                     log.max(dim=0, keepdim=True).values) / (2.0 ** nbits - 1), min=1e-8)
    codes = torch.clamp(torch.round(log / step), 0, 2 ** nbits - 1)  # (out, m/b)
    params = torch.cat([mn, step], 0).t().contiguous()  # (m/b, 2)
    S = norm_scales(codes, params)  # (out, m/b)
    Xn = torch.div(Xb, S.unsqueeze(2)).reshape(out_f, m)
    return Xn, S.repeat_interleave(b, dim=1), codes.long(), params


def norm_scales(codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """codes (out, nb), params (nb, 2) = (min, step) -> scales (out, nb) = 10^(step·code + min)."""
    mn, step = params[:, 0][None, :], params[:, 1][None, :]
    return torch.pow(10.0, step * codes.float() + mn)


def _quad_loss(W: torch.Tensor, Q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Their `quad_loss_2` (float32): tr((W - Q) G (W - Q)ᵀ)."""
    E = W - Q
    return (E.mm(G) * E).sum()


def adam_update_reference(W: torch.Tensor, G: torch.Tensor, params: List[torch.Tensor], make_Q, steps: int,
                          lr: float = 1e-3) -> List[torch.Tensor]:
    """Their `lut_m_step` loop: Adam (torch.optim.Adam, lr) on `params` for tr((W - Q) G (W - Q)ᵀ)
    with Q = make_Q(params); `steps` steps, restarted from the start with lr/10 whenever a step's
    loss exceeds the starting loss (or is NaN). -> the updated params (detached)."""
    with torch.no_grad():
        start = _quad_loss(W, make_Q(params), G)
    while True:
        cur = [p.detach().clone().requires_grad_() for p in params]
        opt = torch.optim.Adam(cur, lr=lr)
        restart = False
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = _quad_loss(W, make_Q(cur), G)
                if loss > start or torch.isnan(loss):
                    lr *= 1e-1
                    restart = True
                    break
                loss.backward()
                opt.step()
        if not restart:
            return [p.detach() for p in cur]


def _stored_codebooks(C: torch.Tensor, codebook_bits: int):
    """The reference's codebooks as stored: int8 codes + float16 scales, or float16 values."""
    if codebook_bits == 16:
        return C.half(), None
    q, s, _ = int8_codebooks(C)
    return q, round_fp16(s, overflow="clamp").half()


def _quantize_reference(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, *, kmeans_iters: int,
                        update_iters: int, block_size: int, percdamp: float, update_lr: float = 1e-3):
    """variant=reference -> (GPTVQWeight, SolverResult); see the module docstring."""
    W0, G0 = W.detach().float().clone(), H.detach().float().clone()  # their update reads these
    W, H, _dead = prepare_hessian(W, H)
    out_f, in_f = W.shape
    d, K = scheme.vq_dim, scheme.num_centroids
    rows, cols = scheme.rows_per_group, scheme.columns_per_group
    b = scheme.scaling_blocksize
    if out_f % rows or in_f % cols or cols % d or (b and (block_size % b or cols % b or in_f % b)):
        raise BudgetError(f"scheme {scheme.describe()} does not tile a ({out_f}, {in_f}) layer with "
                          f"block_size={block_size}")
    if scheme.svd_rank and (d != 1 or update_iters < 1):
        raise BudgetError("SVD codebook compression (svd_rank) needs vq_dim=1 and the codebook update "
                          "(update_iters >= 1): it is part of their update step")
    n_rg, n_cg = out_f // rows, in_f // cols
    dev = W.device
    weighted = d > 1  # their --hessian-weighted-lookups acts for d > 1 only
    state: Dict[str, object] = {}
    C32 = torch.zeros(n_cg, n_rg, K, d, device=dev)  # the values the loop uses (int8 · float32 scale)
    q8 = torch.zeros(n_cg, n_rg, K, d, dtype=torch.int8, device=dev)  # their int8 codes and float32 scales
    s32 = torch.ones(n_cg, n_rg, device=dev)
    idx = torch.zeros(out_f, in_f // d, dtype=torch.int64, device=dev)  # (out, in/d)
    S = torch.ones(out_f, in_f, device=dev) if b else None  # normalisation scales used
    ncodes = torch.zeros(out_f, in_f // b if b else 0, dtype=torch.int64, device=dev)
    nparams = torch.zeros(in_f // b if b else 0, 2, device=dev)

    def expose(Wl, U):
        state["W"], state["U"] = Wl, U

    def quantize_cols(col: int, Wc: torch.Tensor) -> torch.Tensor:  # Wc: (out, d), as updated so far
        Wl, U = state["W"], state["U"]
        if b and col % block_size == 0:  # the block's normalisation, from the block start (their W1)
            i2 = min(col + block_size, in_f)
            Xn, Sb, cb, pb = blockwise_normalize(Wl[:, col:i2], b, scheme.scaling_bits)
            state["Xn"], state["i1"] = Xn, col
            S[:, col:i2] = Sb
            ncodes[:, col // b:i2 // b], nparams[col // b:i2 // b] = cb, pb
        cg = col // cols
        if col % cols == 0:  # §3.2: the stripe's codebooks, from their (lazily updated) W
            Wg = Wl[:, col:col + cols]
            if b:
                Wg = blockwise_normalize(Wg, b, scheme.scaling_bits)[0]
            X = Wg.reshape(n_rg, -1, d)  # (G, rows·cols/d, d), row-major
            w = torch.diagonal(U)[col:col + cols].reshape(1, -1, d).tile(1, rows, 1)[0] if weighted else None
            C = kmeans_reference(X, mahalanobis_init_reference(X, K), kmeans_iters, w)  # (G, K, d)
            if scheme.codebook_bits == 8:
                q8[cg], s32[cg], C = int8_codebooks(C)
            C32[cg] = C
        x = (state["Xn"][:, col - state["i1"]:col - state["i1"] + d] if b else Wc).reshape(n_rg, rows, d)
        w = (1.0 / torch.diagonal(U)[col:col + d])[None, :] if weighted else None  # (1, d)
        a = assign_reference(x, C32[cg], w)  # (G, rows)
        idx[:, col // d] = a.reshape(out_f)
        q = torch.gather(C32[cg], 1, a.unsqueeze(-1).expand(-1, -1, d)).reshape(out_f, d)  # (out, d)
        return q * S[:, col:col + d] if b else q

    res: SolverResult = error_feedback(W, H, quantize_cols, block_size=block_size, step=d, percdamp=percdamp,
                                       within_step="diagonal", expose=expose)
    state.clear()
    ids0 = codebook_ids(out_f, in_f, d, rows, cols, dev) * K  # (out, in/d) first centroid row of each vector
    C = C32.reshape(n_cg * n_rg, K, d)  # codebook id = cg·n_rg + rg
    basis = None
    if update_iters > 0:  # §3.3 (and §3.4's SVD), on the original W and H, as theirs

        def make_Q(p):
            Cv = p[0] if len(p) == 1 else (p[0] @ p[1]).unsqueeze(-1)  # (n_cb, K, d)
            Q = Cv.reshape(-1, d)[ids0 + idx].reshape(out_f, in_f)
            return Q if S is None else Q * S

        if scheme.svd_rank:
            Cm, order = torch.sort(C[..., 0], dim=1)  # (n_cb, K): every codebook sorted
            idx = torch.argsort(order, dim=1).reshape(-1)[ids0 + idx]  # old index -> its sorted position
            Us, Ss, Vh = torch.linalg.svd(Cm, full_matrices=False)
            r = scheme.rank
            V = Vh[:r]  # (r, K): in their param list, but it never gets a gradient (no requires_grad): fixed
            (A,) = adam_update_reference(W0, G0, [(Us * Ss[None])[:, :r]], lambda p: make_Q([p[0], V]),
                                         update_iters, update_lr)
            codebooks, scales = _stored_codebooks(A, scheme.codebook_bits)
            basis = V.half()
        else:
            (C,) = adam_update_reference(W0, G0, [C], make_Q, update_iters, update_lr)
            codebooks, scales = _stored_codebooks(C, scheme.codebook_bits)
    elif scheme.codebook_bits == 8:
        codebooks, scales = q8.reshape(-1, K, d), round_fp16(s32.reshape(-1), overflow="clamp").half()
    else:
        codebooks, scales = C.half(), None
    norm = {}
    if b:
        norm = dict(norm_codes=pack_bits(ncodes, scheme.scaling_bits), norm_params=nparams.float(),
                    norm_blocksize=b, norm_bits=scheme.scaling_bits)
    qw = GPTVQWeight(pack_bits(idx, scheme.index_bits), codebooks, scales, out_features=out_f, in_features=in_f,
                     vq_dim=d, num_centroids=K, rows_per_group=rows, columns_per_group=cols, svd_basis=basis, **norm)
    return qw, res


@torch.no_grad()
def gptvq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, *, variant: str = "reference",
                   kmeans_iters: int = 10, update_iters: Optional[int] = None, block_size: int = 128,
                   percdamp: float = 0.01, assign_metric: str = "block", update_lr: float = 1e-3):
    """-> (GPTVQWeight, SolverResult). W: (out, in); H: (in, in) = E[x xᵀ]. update_iters None:
    the variant's (reference 25 Adam steps, exact 10 line-search steps).

    With update_iters=0 the solver's Q (what the error feedback used) is the weight's
    dequantize() (bitwise for variant=exact; up to the float16 rounding of the stored scales for
    the reference); with updates, dequantize() is the updated codebooks'."""
    if variant not in VARIANTS:
        raise ValueError(f"method.variant={variant!r}; valid: {', '.join(VARIANTS)}")
    if update_iters is None:
        update_iters = UPDATE_ITERS[variant]
    if variant == "reference":
        return _quantize_reference(W, H, scheme, kmeans_iters=kmeans_iters, update_iters=update_iters,
                                   block_size=block_size, percdamp=percdamp, update_lr=update_lr)
    if scheme.scaling_blocksize or scheme.svd_rank:
        raise BudgetError("vq_scaling_blocksize and svd_rank are parts of variant=reference; valid with "
                          "variant=exact: neither")
    return _quantize_exact(W, H, scheme, kmeans_iters=kmeans_iters, update_iters=update_iters,
                           block_size=block_size, percdamp=percdamp, assign_metric=assign_metric)


class GPTVQ(Method):
    name = "gptvq"

    @dataclass
    class Config:
        name: str = "gptvq"
        variant: str = "reference"  # reference: Qualcomm-AI-research/gptvq as released | exact: ours
        iters: str = "cpu"  # iteration preset: cpu (10 EM iterations) | paper (100, their scripts)
        vq_dim: Optional[int] = None  # d in {1, 2, 4}: input columns per vector; null = budget
        num_centroids: Optional[int] = None  # k (power of two) per codebook; null = budget
        group_size: Optional[int] = None  # weights per codebook (rows x columns); null = budget
        columns_per_group: Optional[int] = None  # columns per codebook block; null = budget
        column_target: int = 256  # budget tie-break: preferred columns per codebook block
        max_centroids: int = 4096  # largest k the budget rule considers
        codebook_bits: int = 8  # 8: int8 codebooks + float16 scale each; 16: float16 codebooks
        kmeans_iters: Optional[int] = None  # EM iterations (at most) per codebook (§3.2); null = the preset
        update_iters: Optional[int] = None  # codebook update steps (§3.3); null = the variant's; 0 = off
        update_lr: float = 1e-3  # reference: Adam's learning rate (theirs)
        assign_metric: Optional[str] = None  # exact: block (d x d loss) | diag; null = block
        vq_scaling_blocksize: Optional[int] = None  # reference: blockwise normalisation per b columns; null = off
        vq_scaling_bits: int = 4  # reference: bits of each normalisation scale
        svd_rank: Optional[float] = None  # reference, d=1: SVD codebook compression to int(k·svd_rank); null = off
        block_size: int = 128  # lazy-update block of the error feedback (a multiple of vq_dim)
        percdamp: float = 0.01
        tolerance: float = 0.1  # realized total may exceed the target by at most this

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        c = config
        if c.variant not in VARIANTS:
            raise ValueError(f"method.variant={c.variant!r}; valid: {', '.join(VARIANTS)}")
        if c.iters not in ITERS:
            raise ValueError(f"method.iters={c.iters!r}; valid: {', '.join(ITERS)}")
        for fld in ("kmeans_iters", "update_iters"):
            v = getattr(c, fld)
            if v is not None and v < 0:
                raise ValueError(f"method.{fld}={v} must be >= 0 (or null: from the preset)")
        if c.vq_dim is not None and c.vq_dim not in VQ_DIMS:
            raise BudgetError(f"method.vq_dim={c.vq_dim} is not supported; valid: {', '.join(map(str, VQ_DIMS))}")
        if c.block_size < 1 or (c.vq_dim and c.block_size % c.vq_dim):
            raise ValueError(f"method.block_size={c.block_size} must be a positive multiple of vq_dim "
                             f"(valid: multiples of {c.vq_dim or 4}, e.g. 128)")
        if c.block_size % 4 and c.vq_dim is None:
            raise ValueError(f"method.block_size={c.block_size} must be a multiple of 4 when vq_dim is chosen by "
                             f"the budget (it may be 1, 2 or 4); e.g. 128")
        if c.assign_metric is not None and c.assign_metric not in ASSIGN_METRICS:
            raise ValueError(f"method.assign_metric={c.assign_metric!r}; valid: {', '.join(ASSIGN_METRICS)}")
        if c.variant == "reference" and c.assign_metric is not None:
            raise ValueError(f"method.assign_metric={c.assign_metric!r} is a choice of variant=exact (the reference "
                             f"looks up with its own diagonal weights); valid: null, or variant=exact")
        if c.variant != "reference" and (c.vq_scaling_blocksize or c.svd_rank):
            raise ValueError("method.vq_scaling_blocksize and method.svd_rank are parts of variant=reference; "
                             "valid with variant=exact: null")
        if c.vq_scaling_blocksize and (c.vq_scaling_blocksize < 1 or c.block_size % c.vq_scaling_blocksize):
            raise ValueError(f"method.vq_scaling_blocksize={c.vq_scaling_blocksize} must divide "
                             f"block_size={c.block_size}; e.g. 32 or 64")
        if c.svd_rank is not None and not 0 < c.svd_rank <= 1:
            raise ValueError(f"method.svd_rank={c.svd_rank}; valid: a fraction in (0, 1] of k, or null")

    @property
    def kmeans_iters(self) -> int:
        c = self.config
        return ITERS[c.iters]["kmeans_iters"] if c.kmeans_iters is None else int(c.kmeans_iters)

    @property
    def update_iters(self) -> int:
        c = self.config
        return UPDATE_ITERS[c.variant] if c.update_iters is None else int(c.update_iters)

    def layer_plan(self, out_f, in_f) -> Scheme:
        c = self.config
        return choose_scheme(
            int(out_f), int(in_f), bits=self.bits, tolerance=c.tolerance, vq_dim=c.vq_dim,
            num_centroids=c.num_centroids, group_size=c.group_size, columns_per_group=c.columns_per_group,
            column_target=c.column_target, max_centroids=c.max_centroids, codebook_bits=c.codebook_bits,
            scaling_blocksize=c.vq_scaling_blocksize or 0, scaling_bits=c.vq_scaling_bits,
            svd_rank=c.svd_rank or 0.0)

    def settings(self, plan=None):
        c = self.config
        s = {"variant": c.variant, "iters": c.iters}
        # per layer shape, compact for tables: d, k and the block of weights one codebook serves
        s.update({f"{o}x{i}": p.short() for (o, i), p in sorted((plan or {}).items())})
        s.update(codebook_bits=c.codebook_bits, kmeans_iters=self.kmeans_iters, update_iters=self.update_iters)
        if c.variant == "exact":
            s["assign_metric"] = c.assign_metric or "block"
        return s

    @torch.no_grad()
    def quantize_layer(self, W, H, *, name, plan=None):
        check_layer(W, H, name, self.name)
        c = self.config
        scheme = self.layer_plan(*W.shape) if plan is None else plan
        qw, _ = gptvq_quantize(W, H, scheme, variant=c.variant, kmeans_iters=self.kmeans_iters,
                               update_iters=self.update_iters, block_size=c.block_size, percdamp=c.percdamp,
                               assign_metric=c.assign_metric or "block", update_lr=c.update_lr)
        return qw
