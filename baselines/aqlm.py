"""AQLM additive quantization (Egiazarian et al., arXiv 2401.06118; Vahe1994/AQLM): a
re-implementation behind the common `Method` interface, as the authors' code runs it
(`variant=reference`, the default) and with our changes kept as a named variant (`weighted`).

Owns: the AQLM budget rule, the additive weight format `AQLMWeight` (codes packed B bits each,
fp16 codebooks, fp16 per-output-channel scales), both variants' initialisation, the alternation
of Adam codebook/scale updates and beam search over codes on the layer proxy loss, and the
block finetuning.

The representation (the paper's additive form, §3). Each row o of W (out, in) is cut into
n = in/g groups of g consecutive input weights; group j of row o is the sum of one codeword
from each of M codebooks C_m (2^B entries of g values), times the row's scale s_o:

    Ŵ[o, j*g:(j+1)*g] = s_o · Σ_m C_m[b_{o,j,m}]              b: (out, n, M) in [0, 2^B)

Scheme "MxB" (paper naming: "1x16", "2x8"): index bits/weight = M·B/g. Storage per layer:
out·n·M·B bits of codes + M·2^B·g·16 bits of codebooks + out·16 bits of scales, all counted
(the same for both variants).

The objective (the paper's layer output error on the calibration inputs, through the Hessian)
    L = tr((W - Ŵ) H (W - Ŵ)ᵀ),   H = E[x xᵀ]   (never the raw activations).

Beam search over codes (paper §3, Phase 1; both variants): for every group j, for every codebook
m, each hypothesis of each row is extended by all 2^B codewords; the change of L is exact,
ΔL = -2 δᵀ(H r)_j + δᵀ H_jj δ  (r = row residual, δ = s·(C_m[c] - C_m[b])), and the `beam_width`
best hypotheses per row survive. Rows are independent (L is a sum over rows), groups within a
row are not (H couples them): hence the search runs over groups in sequence, groups outside,
codebooks inside, as Vahe1994/AQLM's `beam_search_xtx` does.

variant=reference: Vahe1994/AQLM (commit e79a896: `aq_engine.AQEngine.quantize`, `src/aq.py`,
`src/kmeans.py`, `src/finetune.py`, main.py defaults) step for step:
  1. s_o = ||W_o||₂ (+1e-9; their `scale_nbits=0` row scales), then residual k-means on W/s:
     plain (unweighted) Lloyd on all groups, started at 2^B distinct groups drawn at random,
     an empty cluster keeps its centroid, stop when the centroids stop moving (allclose at
     rtol 1e-6, atol 1e-8, checked every 10 iterations) or after `kmeans_iters`.
  2. one Adam optimiser for the whole layer (state kept across epochs): lr 1e-4 on codebooks and
     scales alike, betas (0, 0.95), amsgrad, on L / out_features. Each epoch: `adam_steps` Adam
     steps with the codes fixed, then one beam search whose group order and, per group,
     codebook order are shuffled (Python `random.Random`, seeded per layer). Before an epoch's
     first step, stop when L / (best L at earlier epoch starts) > 1 - `rel_tol` (their
     relative_mse_tolerance); at most `max_iterations` epochs. The result is the last state
     (after a beam search; no best-state bookkeeping); codebooks and scales are optimised in
     float32 and rounded to fp16 only when stored (as their fp16 checkpoints are).
  3. block finetuning (their `finetune_groupwise`, always on in their main.py), after all the
     block's linears are quantized: Adam (lr 1e-5, betas (0.9, 0.95)) on every float parameter
     of the block (codebooks, scales, norm weights, biases; codes fixed) on the mean squared
     error of the block's output against the float block's, `finetune_batch` windows per step,
     `finetune_epochs` passes in one seeded random order; the result is kept as it ends
     (their default has no validation split, hence no best-state check).

variant=weighted (our earlier choices, labelled so in every table through `settings()`):
  1. s_o = RMS of row o; residual k-means on the normalised groups weighted by s_o²·diag(H) per
     coordinate, on a subsample of at most 64 points per centroid; then the closed-form
     per-row scale that minimises L for these codes.
  2. each iteration: beam search in fixed order (H r updated lazily: inside a block of
     LAZY_COLUMNS columns at every step, beyond it once per block, GPTQ's trick, same result),
     then `adam_steps` steps of a fresh Adam (betas (0.9, 0.999), lr 3e-3 relative to the
     parameter's scale) on analytic gradients; codebooks and scales are rounded to fp16 after
     every update and the best stored state is kept, so more iterations never give a higher
     stored loss; stop when an iteration improves L by less than `rel_tol`.
  3. block finetuning off unless `finetune_steps` > 0 (Adam on codebooks, scales, norm
     weights; kept only if it lowers the block's output MSE).

Iteration counts are a separate axis (`iters`): `cpu` (4 epochs × 5 Adam steps, 6 k-means
iterations, 1 finetuning epoch for the reference) or `paper` (their main.py: up to 1000 epochs
× 100 Adam steps, 100 k-means iterations, 5 finetuning epochs; rel_tol 0.01 as in their README).
Explicit counts (`max_iterations`, `adam_steps`, ...) override the preset.

Fidelity (tests/test_fidelity_aqlm.py): on the seeded synthetic layer of scripts/fidelity/layer.py
at 128x256, `variant=reference, iters=paper` gives the proxy loss of their code (run by
scripts/fidelity/run_reference_aqlm.py, recorded in tests/data/fidelity_reference_aqlm.json):
mean over 6 seeds 0.993 (1x8/g4), 0.987 (2x8/g8), 0.999 (2x8/g8, beam 4) of theirs, whose seeds
spread ±2.7-3.1% (std); the block finetuning matches their `finetune_groupwise` to ~1e-8 with
the whole calibration set in one batch.

Why not the column-wise error-feedback loop of `vptq.solver`: it fixes columns left to right
and pushes each column's error onto the columns not yet quantized, which needs a quantizer that
commits one column (or `step` adjacent columns) at a time. AQLM's codes are not column-local:
its M codewords add up inside a group, its codebooks are shared by every row and are
re-optimised after the codes, and the objective is joint over the whole row. The paper
therefore optimises L directly, with beam search over codes (which already accounts for the
cross-group coupling through H r) alternating with codebook updates.

Determinism: every random choice (k-means seeding, search order, finetuning order) comes from a
generator seeded by `layer_seed(name)` (or the block index); segment sums (k-means and codebook
gradients) use `index_add_` on the CPU and a sort + float64 cumulative sum elsewhere, never
atomics, so a layer's result is a function of (W, H, config, seed) on a given device (the
weighted variant checked on an H200: two runs bitwise equal, and the loss history equal to the
CPU's to ~1e-8). On the CPU a layer runs on one thread (`vptq.threads.single_thread`).
"""
from __future__ import annotations

import logging
import math
import random
import re
import sys
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vptq.kmeans import assign
from vptq.methods import BlockContext, BudgetError, Method
from vptq.numerics import (Segments, pack_bits, round_fp16, segment_sum, unpack_bits,  # noqa: F401 (re-exported)
                           weighted_assign, weighted_lloyd)
from vptq.qweight import QuantizedWeight, Storage
from vptq.threads import single_thread

log = logging.getLogger(__name__)

VALUE_BITS = 16  # codebook entries and scales are stored as fp16
MAX_CODEBOOKS = 8
MAX_CODE_BITS = 16
GROUP_SIZES = tuple(range(2, 17))  # g the budget may choose (those dividing in_features)
CHUNK_ELEMS = 1 << 24  # candidate scores / distances evaluated per chunk
LAZY_COLUMNS = 128  # beam search: H r is updated on later columns once per block of this many
KMEANS_POINTS_PER_CLUSTER = 64  # k-means trains on at most this many points per centroid

VARIANTS = ("reference", "weighted")
# Iteration presets (`iters`): counts only; the variant decides the algorithm. `paper` is
# Vahe1994/AQLM main.py's defaults (max_epochs 1000, steps_per_epoch 100, init_max_iter 100,
# beam_size 1, finetune_max_epochs 5) with relative_mse_tolerance 0.01 from their README.
# finetune_epochs is the reference variant's count (the weighted one counts finetune_steps).
ITER_PRESETS: Dict[str, Dict[str, float]] = {
    "cpu": dict(max_iterations=4, adam_steps=5, kmeans_iters=6, rel_tol=0.01, beam_width=1, finetune_epochs=1),
    "paper": dict(max_iterations=1000, adam_steps=100, kmeans_iters=100, rel_tol=0.01, beam_width=1,
                  finetune_epochs=5),
}
# What the variant decides when the config leaves it unset (reference: their main.py defaults).
VARIANT_DEFAULTS: Dict[str, Dict[str, float]] = {
    "reference": dict(lr=1e-4, finetune_lr=1e-5, finetune_batch=1),
    "weighted": dict(lr=3e-3, finetune_lr=1e-4, finetune_batch=4, finetune_steps=0),
}


# ----------------------------------------------------------------------------- budget

def parse_scheme(scheme: str) -> Tuple[int, int]:
    """"MxB" -> (num_codebooks M, bits per codebook B)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(scheme))
    if not m:
        raise ValueError(f"method.scheme={scheme!r} is not of the form MxB (e.g. 1x16, 2x8, 1x8)")
    M, B = int(m.group(1)), int(m.group(2))
    if not (1 <= M <= MAX_CODEBOOKS and 1 <= B <= MAX_CODE_BITS):
        raise ValueError(f"method.scheme={scheme!r}: valid M is 1..{MAX_CODEBOOKS}, valid B is 1..{MAX_CODE_BITS}")
    return M, B


def packed_code_bits(out_f: int, in_f: int, M: int, B: int, g: int) -> int:
    """Bits of the stored code tensor: out·(in/g)·M codes of B bits, packed into whole bytes."""
    return math.ceil(out_f * (in_f // g) * M * B / 8) * 8


def aqlm_total_bits(M: int, B: int, g: int, out_f: int, in_f: int) -> float:
    """Realized total bits/weight of one (out_f, in_f) layer: codes + codebooks + scales."""
    bits = packed_code_bits(out_f, in_f, M, B, g) + M * (2**B) * g * VALUE_BITS + out_f * VALUE_BITS
    return bits / (out_f * in_f)


def scheme_name(M: int, B: int, g: int) -> str:
    return f"{M}x{B}/g{g}"


def valid_group_sizes(in_f: int, limit: int = 32) -> List[int]:
    return [g for g in range(1, min(limit, in_f) + 1) if in_f % g == 0]


def _rank_key(M: int, B: int, g: int):
    """Expected accuracy, best first: more index bits (rate dominates: ~6 dB per bit), then the
    larger codebook per stage B, then fewer codebooks (at equal rate and B, the shorter group).
    Measured on SmolLM2-135M layers with real Hessians at 2 bits, all candidates with the CPU
    defaults: 1x6/g3 < 3x4/g6 < 2x4/g4 < 1x4/g2 < ... < 8x2/g8 (k_proj), 1x8/g4 < 2x8/g8 (down_proj),
    1x8/g4 best on q/gate; AQLM Table 1 likewise ranks 1x16 above 2x8."""
    return (-(M * B) / g, -B, M, -g)


def choose_scheme(bits: Optional[float], tolerance: float, out_f: int, in_f: int,
                  scheme: Optional[str] = None, group_size: Optional[int] = None) -> Tuple[int, int, int]:
    """The (M, B, g) expected to be most accurate whose realized total fits bits + tolerance.

    An explicit `scheme` fixes (M, B) and an explicit `group_size` fixes g; a budget that they
    cannot meet raises BudgetError naming the nearest valid choices. bits=None: no budget (an
    explicit scheme is then required; g defaults to 8)."""
    if group_size is not None:
        if group_size < 1 or in_f % group_size:
            raise ValueError(f"method.in_group_size={group_size} does not divide in_features={in_f}; "
                             f"valid: {', '.join(map(str, valid_group_sizes(in_f)))}")
        gs: Sequence[int] = (group_size,)
    else:
        gs = [g for g in GROUP_SIZES if in_f % g == 0]
        if not gs:
            raise ValueError(f"no default in_group_size in {GROUP_SIZES} divides in_features={in_f}; "
                             f"set method.in_group_size to one of {', '.join(map(str, valid_group_sizes(in_f)))}")
    fixed = parse_scheme(scheme) if scheme is not None else None
    if bits is None:
        if fixed is None:
            raise BudgetError("method=aqlm needs bits or an explicit method.scheme (e.g. 2x8)")
        return fixed[0], fixed[1], (group_size or (8 if in_f % 8 == 0 else max(gs)))
    limit = bits + tolerance + 1e-12
    combos = [(M, B, g) for g in gs for M in range(1, MAX_CODEBOOKS + 1) for B in range(1, MAX_CODE_BITS + 1)]
    fits = [c for c in combos if aqlm_total_bits(*c, out_f, in_f) <= limit]
    if fixed is not None:
        mine = [c for c in fits if (c[0], c[1]) == fixed]
        if mine:
            return min(mine, key=lambda c: _rank_key(*c))
        need = min(aqlm_total_bits(fixed[0], fixed[1], g, out_f, in_f) for g in gs)
        near = sorted(fits, key=lambda c: _rank_key(*c))[:4]  # the best the budget allows, best first
        raise BudgetError(
            f"method.scheme={scheme} cannot meet bits={bits:g} (+{tolerance:g}) on a {out_f}x{in_f} layer: "
            f"it needs >= {need:.3f} bits/weight (codebooks {fixed[0]}x2^{fixed[1]}xg fp16 included); valid here: "
            + (", ".join(f"{scheme_name(*c)} ({aqlm_total_bits(*c, out_f, in_f):.3f} b)" for c in near) or "none")
            + f", or bits >= {need - tolerance:.3f}")
    if not fits:
        low = min((c for c in combos), key=lambda c: aqlm_total_bits(*c, out_f, in_f))
        need = aqlm_total_bits(*low, out_f, in_f)
        raise BudgetError(f"bits={bits:g} is impossible for method=aqlm on a {out_f}x{in_f} layer: the cheapest "
                          f"scheme ({scheme_name(*low)}) needs {need:.3f} bits/weight; "
                          f"valid: bits >= {need - tolerance:.3f}")
    return min(fits, key=lambda c: _rank_key(*c))


# ----------------------------------------------------------------------------- storage format

def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """codes (...) ints in [0, 2^nbits) -> uint8 bit stream (`vptq.numerics.pack_bits`),
    little-endian: bit p of the i-th code (row-major order) is stream bit i*nbits + p, stream
    bit q is bit q%8 of byte q//8. (For nbits = 8 or 16 the stream is the codes as little-endian
    bytes.) -> (ceil(N*nbits/8),)"""
    return pack_bits(codes, nbits)


def unpack_codes(packed: torch.Tensor, nbits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_codes`: -> int64 codes of `shape`."""
    return unpack_bits(packed, nbits, math.prod(shape)).reshape(tuple(shape))


def decode(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Σ_m codebooks[m][codes[..., m]]: codebooks (M, K, g), codes (..., M) -> (..., g), summed
    in codebook order m = 0, 1, ... (float32)."""
    cb = codebooks.float()
    U = F.embedding(codes[..., 0], cb[0])  # a row gather, faster than advanced indexing on the CPU
    for m in range(1, codebooks.shape[0]):
        U = U + F.embedding(codes[..., m], cb[m])
    return U


class AQLMWeight(QuantizedWeight):
    """One additive-quantized weight (out_features, in_features).

    packed_codes: (ceil(out·n·M·B / 8),) uint8, the codes (out, n, M) packed B bits each
    codebooks:    (M, 2^B, g) float16
    scales:       (out,) float16
    dequantize:   Ŵ[o, j·g:(j+1)·g] = float(scales[o]) · Σ_m float(codebooks[m, codes[o, j, m]])
    """

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int):
        out_f, n, M = codes.shape
        Mc, K, g = codebooks.shape
        if Mc != M or K != 2**nbits or scales.shape != (out_f,):
            raise ValueError(f"inconsistent AQLM tensors: codes {tuple(codes.shape)}, codebooks "
                             f"{tuple(codebooks.shape)}, scales {tuple(scales.shape)}, nbits={nbits}")
        self.nbits = int(nbits)
        self.num_codebooks = M
        self.in_group_size = g
        self.out_features, self.in_features = out_f, n * g
        self.codes_shape = (out_f, n, M)
        self.packed_codes = pack_codes(codes, nbits)
        self.codebooks = codebooks.to(torch.float16)
        self.scales = scales.to(torch.float16)

    def codes(self) -> torch.Tensor:
        """(out, n, M) int64, unpacked from the stored bit stream."""
        return unpack_codes(self.packed_codes, self.nbits, self.codes_shape)

    def dequantize(self, dtype=torch.float32):
        U = decode(self.codebooks, self.codes())  # (out, n, g)
        W = self.scales.float()[:, None, None] * U
        return W.reshape(self.out_features, self.in_features).to(dtype)

    def storage(self) -> Storage:
        return Storage(self.out_features * self.in_features, {
            "codes": int(self.packed_codes.numel()) * 8,
            "codebooks": int(self.codebooks.numel()) * VALUE_BITS,
            "scales": int(self.scales.numel()) * VALUE_BITS,
        })

    def to(self, device):
        self.packed_codes = self.packed_codes.to(device)
        self.codebooks = self.codebooks.to(device)
        self.scales = self.scales.to(device)
        return self

    def settings(self) -> Dict[str, object]:
        return {"scheme": f"{self.num_codebooks}x{self.nbits}", "in_group_size": self.in_group_size}

    def kernel_layout(self):
        """The fast kernels' view (`vptq.qweight.KernelLayout`): Ŵᵀ (in, out) is a VQWeight, vectors of
        length g along its rows within each column o, codebook C_0, C_1 as the residual when M >= 2,
        C_2 .. C_{M-1} as the layout's `extra` codebooks (kernel=cpu only), and a per-column scale
        (bias 0) = the per-row scale of Ŵ."""
        from vptq.qweight import KernelLayout
        from vptq.vqweight import VQWeight

        M, k = self.num_codebooks, 2 ** self.nbits
        codes = self.codes().transpose(0, 1)[None]  # (1, n, out, M): vector row j of Ŵᵀ's column o
        res = dict(num_res_centroids=k, res_centroids=self.codebooks[1:2], res_indices=codes[..., 1]) if M >= 2 else {}
        extra = tuple((self.codebooks[m:m + 1], codes[..., m]) for m in range(2, M))
        vq = VQWeight(out_features=self.in_features, in_features=self.out_features, vector_len=self.in_group_size,
                      num_centroids=k, group_num=1, group_size=self.out_features, centroids=self.codebooks[0:1],
                      indices=codes[..., 0], weight_scale=self.scales, weight_bias=torch.zeros_like(self.scales), **res)
        return KernelLayout(vq, transposed=True, codes=self.stored_codes(), extra=extra)

    def stored_codes(self) -> Optional[torch.Tensor]:
        """The stored bit stream viewed as the (out, n, M) codes, without a copy, where B = 8 or 16 makes it
        whole little-endian bytes / words (`pack_codes`); else None."""
        p = self.packed_codes
        if self.nbits not in (8, 16) or not p.is_contiguous() or p.storage_offset() % 2 or sys.byteorder != "little":
            return None
        return (p if self.nbits == 8 else p.view(torch.uint16)).view(self.codes_shape)


# ----------------------------------------------------------------------------- numerics

def weighted_kmeans(X: torch.Tensor, w: torch.Tensor, k: int, iters: int, gen: torch.Generator):
    """Lloyd's k-means minimising Σ_i Σ_d w_id (x_id - c_{a(i),d})².

    X, w: (N, g) points and per-coordinate weights (w >= 0). -> centroids (k, g), labels (N,).
    Lloyd iterations run on a seeded subsample of at most KMEANS_POINTS_PER_CLUSTER·k points
    (the beam search refines the codes afterwards); the final labels cover all N points.
    Seeding: k distinct training points drawn with `gen` (cycled when there are fewer than
    k). An empty cluster keeps its previous centroid, and so does a coordinate no member weighs."""
    N, g = X.shape
    perm = torch.randperm(N, generator=gen).to(X.device)
    C = X[perm[torch.arange(k, device=X.device) % N]].clone()  # (k, g)
    train = perm[: min(N, KMEANS_POINTS_PER_CLUSTER * k)]
    C = weighted_lloyd(X[train][None], w[train], C[None], iters, empty="keep", stop_when_stable=False)[0]
    return C, weighted_assign(X[None], w, C[None])[0]


def plain_kmeans(X: torch.Tensor, k: int, max_iter: int, gen: torch.Generator, *, check_every: int = 10,
                 rtol: float = 1e-6, atol: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unweighted Lloyd's k-means on all points, as Vahe1994/AQLM `fit_kmeans` (greedy_init off):
    start at k distinct points drawn with `gen` (cycled when N < k), assign each point to the
    nearest centroid (ties: lowest index), move each centroid to its members' mean (an empty
    cluster keeps its centroid), stop at an iteration i with i % check_every == 0 whose update
    moved no centroid beyond allclose(rtol, atol), or after max_iter iterations.
    X: (N, g) -> centroids (k, g), labels (N,) int64 (the final assignment)."""
    N = X.shape[0]
    C = X[torch.randperm(N, generator=gen).to(X.device)[torch.arange(k, device=X.device) % N]].clone()  # (k, g)
    ones = torch.ones(N, 1, device=X.device)
    for i in range(max_iter):
        seg = Segments(assign(X, C), k)
        count = seg.sum(ones)  # (k, 1)
        new = torch.where(count > 0, seg.sum(X) / count.clamp_min(1), C)
        if i % check_every == 0 and torch.allclose(new, C, rtol=rtol, atol=atol):
            break
        C = new
    return C, assign(X, C)


def reference_init(W: torch.Tensor, M: int, B: int, g: int, kmeans_iters: int, gen: torch.Generator):
    """AQLM's initialisation (`QuantizedWeight.__init__` + `init_aq_kmeans`, scale_nbits=0):
    s_o = ||W_o||₂ + 1e-9, then M stages of `plain_kmeans` on the residual of W/s cut into groups
    of g. -> codes (out, n, M) int64, codebooks (M, 2^B, g) float32, scales (out,) float32."""
    out_f, in_f = W.shape
    n, K = in_f // g, 2**B
    s = W.norm(dim=1) + 1e-9  # (out,)
    R = (W / s[:, None]).reshape(out_f * n, g)  # (out*n, g) normalised groups, row-major
    Cs, labels = [], []
    for _ in range(M):
        Cm, lab = plain_kmeans(R, K, kmeans_iters, gen)
        R = R - Cm[lab]
        Cs.append(Cm)
        labels.append(lab)
    return torch.stack(labels, -1).reshape(out_f, n, M), torch.stack(Cs), s


def shuffled_order(n: int, M: int, rng: random.Random) -> List[Tuple[int, int]]:
    """The (group, codebook) visiting order of AQLM's beam search with a `dim_rng`: the groups
    shuffled, and for each group in turn its codebooks shuffled anew."""
    groups = list(range(n))
    rng.shuffle(groups)
    order = []
    for j in groups:
        books = list(range(M))
        rng.shuffle(books)
        order.extend((j, m) for m in books)
    return order


def row_losses(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(out,) float64: r_oᵀ H r_o per row (float32 product, float64 reduction)."""
    R = W - What
    return ((R @ H) * R).double().sum(1)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept as float32); clamps to the fp16 range."""
    return round_fp16(t, overflow="clamp")


def optimal_scales(W: torch.Tensor, H: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Per-row s minimising (w - s u)ᵀ H (w - s u): s = wᵀHu / uᵀHu. W, U: (out, in) -> (out,)."""
    UH = U @ H
    num = (UH * W).sum(1)
    den = (UH * U).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def _extend(Qj, P, Cm, cur, s3, loss, beam_width: int):
    """One beam-search step on group j / codebook m: score every codeword for every hypothesis
    and keep the `beam_width` best extensions per row.

    Qj: (rows, beam, g) = (H r)_j of each hypothesis; P: (K, g) = C_m H_jj; Cm: (K, g);
    cur: (rows, beam) current codes; s3: (rows, 1, 1) scales; loss: (rows, beam).
    -> new losses (rows, kk), parent hypothesis (rows, kk), chosen codeword (rows, kk)."""
    K, g = Cm.shape
    Gd = (P * Cm).sum(1)  # (K,): c H_jj cᵀ of every codeword
    CG = torch.cat([Cm, Gd[:, None]], 1).T  # (g+1, K)
    # ΔL(c) = f(c) - f(cur), f(c) = v·C_c + s² C_c H_jj C_cᵀ, v = -2s((H r)_j + s C_cur H_jj)
    v = torch.cat([-2 * s3 * (Qj + s3 * P[cur]), (s3 * s3).expand(-1, cur.shape[1], 1)], 2)
    f = (v.reshape(-1, g + 1) @ CG).reshape(v.shape[0], v.shape[1], K)  # (rows, beam, K)
    base = loss - (v * CG.T[cur]).sum(2)  # (rows, beam): L - f(cur)
    kk = min(beam_width, f.shape[1] * K)
    if kk == 1:
        fmin, idx = f[:, 0].min(1, keepdim=True)  # (rows, 1)
        val = base + fmin
    else:
        val, idx = torch.topk((f + base[..., None]).reshape(f.shape[0], -1), kk, dim=1, largest=False, sorted=True)
    return val, idx // K, idx % K


@torch.no_grad()
def beam_search(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, s: torch.Tensor, codes: torch.Tensor,
                beam_width: int, order: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
    """New codes (out, n, M) that lower Σ_o r_oᵀ H r_o with `beam_width` hypotheses per row (AQLM
    Phase 1). order=None: groups j = 0..n-1 and, within a group, codebooks m = 0..M-1 in turn
    (Vahe1994/AQLM beam_search_xtx without a dim_rng: groups outside, codebooks inside), with H r
    updated lazily; else the (group, codebook) pairs in `order` (e.g. `shuffled_order`, their
    dim_rng), with H r updated on every column after each step.

    W: (out, in); H: (in, in); C: (M, K, g) float32; s: (out,);
    codes: (out, n, M) int64, the starting point (always one of the hypotheses' ancestors, so
    the best final hypothesis is never worse than it, up to float rounding)."""
    out_f, in_f = W.shape
    _, n, M = codes.shape
    K, g = C.shape[1], C.shape[2]
    rows = max(1, CHUNK_ELEMS // max(beam_width * K, 1))
    new_codes = torch.empty_like(codes)
    for a in range(0, out_f, rows):
        b_ = slice(a, min(a + rows, out_f))
        Wc, sc = W[b_], s[b_]
        r = Wc - sc[:, None] * decode(C, codes[b_]).reshape(Wc.shape[0], in_f)
        Q = (r @ H)[:, None]  # (rows, beam, in): H r of every hypothesis
        loss = (Q[:, 0] * r).sum(1)[:, None]  # (rows, beam)
        hyp = codes[b_][:, None].clone()  # (rows, beam, n, M)
        s3 = sc[:, None, None]
        if order is not None:
            for j, m in order:
                sl = slice(j * g, (j + 1) * g)
                Cm = C[m]  # (K, g)
                loss, parent, c = _extend(Q[:, :, sl], Cm @ H[sl, sl], Cm, hyp[:, :, j, m], s3, loss, beam_width)
                if hyp.shape[1] > 1 or c.shape[1] > 1:
                    hyp = hyp.gather(1, parent[:, :, None, None].expand(-1, -1, n, M)).clone()
                    Q = Q.gather(1, parent[:, :, None].expand(-1, -1, in_f))
                old = hyp[:, :, j, m].clone()
                hyp[:, :, j, m] = c
                dvec = s3 * (Cm[c] - Cm[old])  # (rows, kk, g): change of Ŵ in group j
                Q = Q - (dvec.reshape(-1, g) @ H[sl]).reshape(dvec.shape[0], dvec.shape[1], in_f)
            new_codes[b_] = hyp[torch.arange(hyp.shape[0], device=W.device), loss.argmin(1)]
            continue
        gb = max(1, LAZY_COLUMNS // g)  # groups per lazy block
        for j0 in range(0, n, gb):
            j1 = min(j0 + gb, n)
            c0, c1 = j0 * g, j1 * g  # the block's columns
            Dblk = Q.new_zeros(Q.shape[0], Q.shape[1], c1 - c0)  # changes of Ŵ in this block
            for j in range(j0, j1):
                sl = slice(j * g, (j + 1) * g)
                Hj = H[sl, j * g:c1]  # (g, columns j*g .. c1)
                for m in range(M):
                    Cm = C[m]  # (K, g)
                    loss, parent, c = _extend(Q[:, :, sl], Cm @ Hj[:, :g], Cm, hyp[:, :, j, m], s3, loss,
                                              beam_width)
                    if hyp.shape[1] > 1 or c.shape[1] > 1:
                        hyp = hyp.gather(1, parent[:, :, None, None].expand(-1, -1, n, M)).clone()
                        Q = Q.gather(1, parent[:, :, None].expand(-1, -1, in_f))
                        Dblk = Dblk.gather(1, parent[:, :, None].expand(-1, -1, c1 - c0))
                    old = hyp[:, :, j, m].clone()
                    hyp[:, :, j, m] = c
                    dvec = s3 * (Cm[c] - Cm[old])  # (rows, kk, g): change of Ŵ in group j
                    Dblk[:, :, j * g - c0:(j + 1) * g - c0] += dvec
                    # H r after the change, only on the block's columns not yet searched (lazy)
                    Q[:, :, j * g:c1] -= (dvec.reshape(-1, g) @ Hj).reshape(dvec.shape[0], dvec.shape[1], -1)
            if c1 < in_f:  # the block's changes reach the later columns in one product
                Q[:, :, c1:] -= (Dblk.reshape(-1, c1 - c0) @ H[c0:c1, c1:]).reshape(Q.shape[0], Q.shape[1], -1)
        new_codes[b_] = hyp[torch.arange(hyp.shape[0], device=W.device), loss.argmin(1)]
    return new_codes


class _Adam:
    """Plain Adam (Kingma & Ba) on a list of tensors, deterministic, with per-tensor lr."""

    def __init__(self, params: List[torch.Tensor], lrs: List[float], betas=(0.9, 0.999), eps=1e-12):
        self.params, self.lrs, self.betas, self.eps = params, lrs, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: List[torch.Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.lrs):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            mh = m / (1 - b1**self.t)
            vh = v / (1 - b2**self.t)
            p.sub_(lr * mh / (vh.sqrt() + self.eps))


def loss_grads(W, H, C, s, codes, segs: List[Segments], *, scale: float = 1.0, with_loss: bool = False):
    """Gradients of scale·L with the codes fixed: -> (d/dC (M, K, g), d/ds (out,)) and, with_loss,
    L itself (float32 products, float64 sum). segs[m]: `Segments` of codes[..., m] flattened (out*n,)."""
    out_f, in_f = W.shape
    g = C.shape[2]
    U = decode(C, codes)  # (out, n, g)
    R = W - s[:, None] * U.reshape(out_f, in_f)
    RH = R @ H  # (out, in)
    G = ((-2 * scale) * RH).reshape_as(U)  # d(scale·L)/dŴ: (out, n, g)
    gs = (G * U).sum((1, 2))  # (out,)
    sG = (s[:, None, None] * G).reshape(-1, g)  # (out*n, g)
    gC = torch.stack([seg.sum(sG) for seg in segs])
    if with_loss:
        return gC, gs, float((RH * R).double().sum())
    return gC, gs


# ----------------------------------------------------------------------------- the method

@dataclass(frozen=True)
class Resolved:
    """An AQLM config with every count and rate decided: the `iters` preset, then the variant's
    defaults, then the explicit config fields (see ITER_PRESETS, VARIANT_DEFAULTS)."""
    variant: str
    iters: str
    max_iterations: int
    adam_steps: int
    kmeans_iters: int
    rel_tol: float
    beam_width: int
    lr: float
    finetune_epochs: int  # variant=reference (0 for weighted)
    finetune_steps: int  # variant=weighted (0 for reference)
    finetune_lr: float
    finetune_batch: int


_LOWER_BOUNDS = {"max_iterations": 0, "adam_steps": 0, "kmeans_iters": 0, "beam_width": 1, "finetune_epochs": 0,
                 "finetune_steps": 0, "finetune_batch": 1}


def resolve(c) -> Resolved:
    """Config -> Resolved; one-line ValueErrors naming the bad value and the valid choices."""
    if c.variant not in VARIANTS:
        raise ValueError(f"method.variant={c.variant!r}; valid: {', '.join(VARIANTS)}")
    if c.iters not in ITER_PRESETS:
        raise ValueError(f"method.iters={c.iters!r}; valid: {', '.join(ITER_PRESETS)}")
    other = {"reference": "finetune_steps", "weighted": "finetune_epochs"}[c.variant]
    if getattr(c, other) is not None:
        mine = "finetune_epochs" if other == "finetune_steps" else "finetune_steps"
        raise ValueError(f"method.{other}={getattr(c, other)} does not apply to variant={c.variant}; "
                         f"its block finetuning is counted by method.{mine}")
    vals = {**ITER_PRESETS[c.iters], **VARIANT_DEFAULTS[c.variant], other: 0}
    out = {"variant": c.variant, "iters": c.iters}
    for f in fields(Resolved)[2:]:
        given = getattr(c, f.name)
        v = vals[f.name] if given is None else given
        out[f.name] = float(v) if f.name in ("rel_tol", "lr", "finetune_lr") else int(v)
        if f.name in _LOWER_BOUNDS and out[f.name] < _LOWER_BOUNDS[f.name]:
            raise ValueError(f"method.{f.name}={given}; valid: >= {_LOWER_BOUNDS[f.name]}")
    for f in ("lr", "finetune_lr"):
        if not out[f] > 0:
            raise ValueError(f"method.{f}={getattr(c, f)}; valid: > 0")
    return Resolved(**out)


class AQLM(Method):
    name = "aqlm"

    @dataclass
    class Config:
        name: str = "aqlm"
        variant: str = "reference"  # reference = Vahe1994/AQLM's algorithm; weighted = ours (module docstring)
        iters: str = "cpu"  # iteration preset: cpu | paper (their main.py counts); the counts below override it
        scheme: Optional[str] = None  # "MxB", e.g. "1x16", "2x8"; null = chosen by the budget per layer shape
        in_group_size: Optional[int] = None  # g input weights per code group; null = chosen by the budget
        tolerance: float = 0.1  # realized total may exceed the target by at most this
        # null below = from the `iters` preset (ITER_PRESETS) or the variant (VARIANT_DEFAULTS)
        max_iterations: Optional[int] = None  # Adam + beam-search epochs (their max_epochs)
        rel_tol: Optional[float] = None  # stop when an epoch lowers the proxy loss by less than this fraction
        beam_width: Optional[int] = None  # hypotheses kept per row (their beam_size)
        adam_steps: Optional[int] = None  # Adam steps on codebooks + scales per epoch (their steps_per_epoch)
        lr: Optional[float] = None  # reference: 1e-4 (theirs); weighted: 3e-3, relative to the parameter's scale
        kmeans_iters: Optional[int] = None  # Lloyd iterations per residual k-means stage (their init_max_iter)
        finetune_epochs: Optional[int] = None  # reference: block finetuning passes over the calibration set (0 = off)
        finetune_steps: Optional[int] = None  # weighted: block finetuning Adam steps (default 0 = off)
        finetune_lr: Optional[float] = None  # reference: 1e-5 (theirs); weighted: 1e-4
        finetune_batch: Optional[int] = None  # calibration windows per finetuning step (reference: 1; weighted: 4)

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        self.resolved = resolve(config)
        if config.scheme is not None:
            parse_scheme(config.scheme)

    def layer_plan(self, out_f: int, in_f: int) -> Tuple[int, int, int]:
        """(M, B, g) for an (out_f, in_f) layer (pure; BudgetError if `bits` cannot be met)."""
        c = self.config
        return choose_scheme(self.bits, c.tolerance, int(out_f), int(in_f), c.scheme, c.in_group_size)

    def settings(self, plan=None):
        c, r = self.config, self.resolved
        s = {"variant": r.variant, "iters": r.iters, "scheme": c.scheme or "auto",
             "in_group_size": c.in_group_size or "auto", "max_iterations": r.max_iterations, "rel_tol": r.rel_tol,
             "beam_width": r.beam_width, "adam_steps": r.adam_steps, "lr": r.lr, "kmeans_iters": r.kmeans_iters}
        if r.variant == "reference":
            s["finetune_epochs"] = r.finetune_epochs
        else:
            s["finetune_steps"] = r.finetune_steps
        if r.finetune_epochs or r.finetune_steps:
            s.update(finetune_lr=r.finetune_lr, finetune_batch=r.finetune_batch)
        if plan:
            s["chosen"] = " ".join(f"{o}x{i}:{scheme_name(*v)}" for (o, i), v in sorted(plan.items()))
        return s

    # -- per layer
    @torch.no_grad()
    def quantize_layer(self, W, H, *, name, plan=None):
        if W.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
        out_f, in_f = W.shape
        M, B, g = self.layer_plan(out_f, in_f) if plan is None else plan
        W = W.detach().float()
        if H is None:
            H = torch.eye(in_f, device=W.device)
        H = H.detach().float().to(W.device)
        if H.shape != (in_f, in_f):
            raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match in_features={in_f}")
        if not torch.isfinite(H).all():
            raise ValueError(f"{name}: Hessian contains NaN or Inf")
        dead = torch.diagonal(H) <= 0
        if bool(dead.any()):  # columns that never see an activation do not matter: zero them
            H = H.clone()
            H[dead, dead] = 1.0
            W = W.clone()
            W[:, dead] = 0.0
        with single_thread(W.device):  # small ops: one thread on CPU (vptq.threads)
            codes, C, s, hist = self.quantize(W, H, M, B, g, seed=self.layer_seed(name))
        log.debug("%s: aqlm %s proxy loss %s", name, scheme_name(M, B, g), hist)
        q = AQLMWeight(codes, C, s, B)
        q.history = hist  # proxy losses during the search, the stored weight's last (not stored)
        return q

    def quantize(self, W, H, M, B, g, *, seed: int):
        """-> codes (out, n, M), codebooks (M, 2^B, g) and scales (out,), both holding fp16
        values, and a history of proxy losses whose last entry is the stored weight's."""
        if self.resolved.variant == "reference":
            return self._quantize_reference(W, H, M, B, g, seed=seed)
        return self._quantize_weighted(W, H, M, B, g, seed=seed)

    def _quantize_reference(self, W, H, M, B, g, *, seed: int):
        """variant=reference (see the module docstring): their init, one persistent Adam
        (betas (0, 0.95), amsgrad) on L / out, then a shuffled beam search, per epoch. The
        history holds L at every epoch start (float32 codebooks and scales), then the stored
        (fp16) weight's L."""
        r = self.resolved
        out_f, in_f = W.shape
        n, K = in_f // g, 2**B
        gen = torch.Generator().manual_seed(seed)  # k-means seeding
        rng = random.Random(seed)  # beam-search order
        codes, C, s = reference_init(W, M, B, g, r.kmeans_iters, gen)  # C (M, K, g), s (out,) float32
        opt = torch.optim.Adam([C, s], lr=r.lr, betas=(0.0, 0.95), amsgrad=True)
        best_start = math.inf  # their previous_best_loss
        hist = []
        for _ in range(r.max_iterations):
            segs = [Segments(codes[..., m].reshape(-1), K) for m in range(M)]
            gC, gs, L = loss_grads(W, H, C, s, codes, segs, scale=1.0 / out_f, with_loss=True)
            hist.append(L)
            if L / best_start > 1.0 - r.rel_tol:  # their relative_mse_tolerance, at an epoch's first step
                break
            best_start = min(best_start, L)
            for step in range(r.adam_steps):
                if step:
                    gC, gs = loss_grads(W, H, C, s, codes, segs, scale=1.0 / out_f)
                C.grad, s.grad = gC, gs
                opt.step()
            codes = beam_search(W, H, C, s, codes, r.beam_width, order=shuffled_order(n, M, rng))
        C, s = _fp16(C), _fp16(s)
        hist.append(float(row_losses(W, s[:, None] * decode(C, codes).reshape(out_f, in_f), H).sum()))
        return codes, C, s, hist

    def _quantize_weighted(self, W, H, M, B, g, *, seed: int):
        """variant=weighted (see the module docstring). -> as `quantize`; the history holds the
        stored proxy loss [init, iteration 1, ...]."""
        c = self.resolved
        out_f, in_f = W.shape
        n, K = in_f // g, 2**B
        gen = torch.Generator().manual_seed(seed)
        # 1. init: per-row RMS scale, residual k-means on the normalised groups
        s = W.pow(2).mean(1).sqrt().clamp_min(1e-8)  # (out,)
        Rn = (W / s[:, None]).reshape(-1, g)  # (out*n, g) normalised groups, row-major
        wts = (s[:, None, None] ** 2 * torch.diagonal(H).clamp_min(0).reshape(1, n, g)).reshape(-1, g)
        Cs, labels = [], []
        for _ in range(M):
            Cm, lab = weighted_kmeans(Rn, wts, K, c.kmeans_iters, gen)
            Rn = Rn - Cm[lab]
            Cs.append(Cm)
            labels.append(lab)
        codes = torch.stack(labels, -1).reshape(out_f, n, M)  # (out, n, M)
        C = _fp16(torch.stack(Cs))  # (M, K, g)
        s = _fp16(optimal_scales(W, H, decode(C, codes).reshape(out_f, in_f)))

        def stored_loss(C_, s_, codes_):
            return float(row_losses(W, s_[:, None] * decode(C_, codes_).reshape(out_f, in_f), H).sum())

        best = (stored_loss(C, s, codes), codes, C, s)
        hist = [best[0]]
        s_unit = float(s.abs().mean().clamp_min(1e-12))
        for _ in range(c.max_iterations):
            prev = best[0]
            # (b) beam search over codes against the stored codebooks/scales
            codes = beam_search(W, H, C, s, codes, c.beam_width)
            L = stored_loss(C, s, codes)
            if L <= best[0]:
                best = (L, codes, C, s)
            else:
                codes = best[1]
            # (a) Adam on codebooks and scales (codes fixed), fp16-rounded after each step
            if c.adam_steps:
                Cw, sw = best[2].clone(), best[3].clone()
                opt = _Adam([Cw, sw], [c.lr, c.lr * s_unit])
                segs = [Segments(codes[..., m].reshape(-1), K) for m in range(M)]
                for _ in range(c.adam_steps):
                    gC, gs = loss_grads(W, H, Cw, sw, codes, segs)
                    opt.step([gC, gs])
                C2, s2 = _fp16(Cw), _fp16(sw)
                L = stored_loss(C2, s2, codes)
                if L <= best[0]:
                    best = (L, codes, C2, s2)
            L, codes, C, s = best
            hist.append(L)
            if prev <= 0 or (prev - L) / prev < c.rel_tol:
                break
        return best[1], best[2], best[3], hist

    # -- per block
    @property
    def uses_float_outputs(self) -> bool:
        return (self.resolved.finetune_epochs if self.resolved.variant == "reference" else self.resolved.finetune_steps) > 0

    def finetune_block(self, block: torch.nn.Module, ctx: BlockContext) -> Dict[str, float]:
        """Block finetuning (AQLM Phase 3) after the block's linears are quantized, as the variant does it."""
        if self.resolved.variant == "reference":
            return self._finetune_reference(block, ctx)
        return self._finetune_weighted(block, ctx)

    def _finetune_reference(self, block: torch.nn.Module, ctx: BlockContext) -> Dict[str, float]:
        """variant=reference, their `finetune_groupwise` with main.py's defaults (no validation
        split): Adam (betas (0.9, 0.95)) on every float parameter of the block, codes fixed,
        minimising the mean squared error of the block's output against the float block's;
        the windows in one seeded random order, cycled, `finetune_batch` per step,
        len(windows) // finetune_batch steps per epoch. The result is kept as it ends.
        Returns the relative training MSE of the first and last epoch and the step count."""
        r = self.resolved
        if r.finetune_epochs <= 0 or ctx.float_outputs is None:
            return {}
        from vptq.qlinear import QuantLinear

        qws = [m.qweight for m in block.modules() if isinstance(m, QuantLinear) and isinstance(m.qweight, AQLMWeight)]
        if not qws:
            return {}
        params = [p for p in block.parameters() if p.is_floating_point()]  # norm weights, biases, ...
        req = [p.requires_grad for p in params]
        for q in qws:
            q.codebooks = q.codebooks.float().clone().requires_grad_(True)
            q.scales = q.scales.float().clone().requires_grad_(True)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam([t for q in qws for t in (q.codebooks, q.scales)] + params, lr=r.finetune_lr,
                               betas=(0.9, 0.95))
        X, Y = ctx.inputs, ctx.float_outputs  # (N, L, D)
        N, b = X.shape[0], r.finetune_batch
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(self.layer_seed(f"finetune.{ctx.index}")))
        batches = [perm[i:i + b].tolist() for i in range(0, N, b)]  # one order, cycled over the epochs
        per_epoch = max(1, N // b)
        den = float(Y.float().pow(2).mean().clamp_min(1e-30))
        epoch_mse, t = [], 0
        try:
            with torch.enable_grad():
                for _ in range(r.finetune_epochs):
                    tot = 0.0
                    for _ in range(per_epoch):
                        chunk = batches[t % len(batches)]
                        t += 1
                        opt.zero_grad(set_to_none=True)
                        for i in chunk:  # one window at a time: the batch mean, by gradient accumulation
                            y = _first(block(X[i:i + 1], **ctx.block_kwargs))
                            loss = F.mse_loss(y.float(), Y[i:i + 1].float()) / len(chunk)
                            loss.backward()
                            tot += float(loss.detach())
                        opt.step()
                    epoch_mse.append(tot / per_epoch / den)
        finally:
            with torch.no_grad():
                for q in qws:  # store fp16, exactly what dequantize will use
                    q.codebooks = q.codebooks.detach().to(torch.float16)
                    q.scales = q.scales.detach().to(torch.float16)
            for p, rq in zip(params, req):
                p.grad = None
                p.requires_grad_(rq)
        return {"ft_rel_mse_first_epoch": epoch_mse[0], "ft_rel_mse_last_epoch": epoch_mse[-1], "ft_steps": float(t)}

    def _finetune_weighted(self, block: torch.nn.Module, ctx: BlockContext) -> Dict[str, float]:
        """variant=weighted: Adam on the block-output MSE vs the float block: codebooks, scales and
        the block's norm weights are tuned, codes stay fixed. The tuned state is kept only if it
        lowers the MSE on the calibration windows."""
        c = self.resolved
        if c.finetune_steps <= 0 or ctx.float_outputs is None:
            return {}
        from vptq.qlinear import QuantLinear

        qws = [m.qweight for m in block.modules() if isinstance(m, QuantLinear) and isinstance(m.qweight, AQLMWeight)]
        if not qws:
            return {}
        norms = [p for n_, p in block.named_parameters() if "norm" in n_.lower()]
        saved = [(q.codebooks, q.scales) for q in qws], [p.detach().clone() for p in norms]
        req = [p.requires_grad for p in norms]
        X, Y = ctx.inputs, ctx.float_outputs  # (N, L, D)
        N = X.shape[0]

        def block_mse() -> float:
            with torch.no_grad():
                num = den = 0.0
                for i in range(N):
                    y = _first(block(X[i:i + 1], **ctx.block_kwargs))
                    num += float((y.float() - Y[i:i + 1].float()).pow(2).sum())
                    den += float(Y[i:i + 1].float().pow(2).sum())
            return num / max(den, 1e-30)

        before = block_mse()
        params, groups = [], []
        for q in qws:
            q.codebooks = q.codebooks.float().clone().requires_grad_(True)
            q.scales = q.scales.float().clone().requires_grad_(True)
            groups.append({"params": [q.codebooks], "lr": c.finetune_lr})
            groups.append({"params": [q.scales], "lr": c.finetune_lr * float(q.scales.detach().abs().mean())})
        for p in norms:
            p.requires_grad_(True)
        if norms:
            groups.append({"params": norms, "lr": c.finetune_lr})
        opt = torch.optim.Adam(groups)
        den = float(Y.float().pow(2).mean().clamp_min(1e-30))
        with torch.enable_grad():
            for step in range(c.finetune_steps):
                opt.zero_grad(set_to_none=True)
                for k in range(c.finetune_batch):
                    i = (step * c.finetune_batch + k) % N
                    y = _first(block(X[i:i + 1], **ctx.block_kwargs))
                    loss = (y.float() - Y[i:i + 1].float()).pow(2).mean() / den / c.finetune_batch
                    loss.backward()
                opt.step()
        with torch.no_grad():
            for q in qws:  # store fp16, exactly what dequantize will use
                q.codebooks = q.codebooks.detach().to(torch.float16)
                q.scales = q.scales.detach().to(torch.float16)
        for p, r in zip(norms, req):
            p.requires_grad_(r)
        after = block_mse()
        if not after < before:
            for q, (cb, sc) in zip(qws, saved[0]):
                q.codebooks, q.scales = cb, sc
            with torch.no_grad():
                for p, v in zip(norms, saved[1]):
                    p.copy_(v)
        return {"ft_rel_mse_before": before, "ft_rel_mse_after": min(after, before)}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
