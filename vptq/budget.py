"""VPTQ's bits budget: `bits` (target average TOTAL bits per weight) -> one `LayerConfig` per
linear shape: vector length v, codebook size k, residual codebook size k_r, permutation
(and, only when asked for explicitly, outlier columns, groups and per-column norms).

Storage is counted exactly as `VQWeight.storage()` counts what is stored (`storage_bits`):
indices packed per (group, vector row) into int32 words of log2(k)+log2(k_r) bits each,
padding rows included; float16 codebooks; int16 outlier indices (one per outlier vector);
int16 permutation only where it is stored (`stores_perm`: with one group and no outliers every
column has the same codebook, so the act order is absorbed into the stored order of the index
columns and costs nothing); float16 norms (scale and bias per input column).

The rule (per layer shape, so every layer stays within `bits + tolerance`):
  1. Enumerate the configurations the official format allows: v in 1..16 (v <= out),
     k = 2..65536 and k_r in {0} ∪ {2..k} powers of two with log2 k + log2 k_r <= 32,
     permutation on/off; one group, no outliers, no norm unless the Config fixes them.
     Explicit Config fields restrict the enumeration to their values. Outlier columns combine
     with a residual codebook on the main columns (the paper's Table 8 configurations: e.g. 1%
     outliers v=4 k=8192 beside v=12 k1=k2=4096); Microsoft's format forbids only a residual
     on the outlier codebook itself, which this harness never builds.
  2. Keep those whose exact total bits/weight is <= bits + tolerance.
  3. Pick the one with the lowest predicted relative proxy loss
         log2 L = -2 R + log2 phi(v_eff) + [perm] log2 0.83 + [norm] log2 1.15
     R = index bits per weight of the main part, (log2 k + log2 k_r) / v (the classic 2^{-2R}
     high-rate law: one more index bit quarters the loss; the padding rows and the int32 word
     rounding are stored, hence in the total bits, but carry no information: counted as rate,
     they made v=12 k1=k2=4096 (2.004 "index bits") look better than the paper's v=6 k=4096 on
     4096x4096 layers), phi(v) = the measured gain of longer vectors at
     equal R (1.25, 1, .85, .77, .71, .66, .62, .59 for v = 1..8, then x0.96 per step),
     v_eff = v for one codebook and v/2 for a residual pair (measured: a greedy two-stage
     code of length v performs like one codebook of about half that length at equal R).
     Ties: fewer total bits, then one codebook over a residual pair, then smaller k. Constants measured on SmolLM2-135M
     layers at 2 and 3 bits (relative proxy loss tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), act order:
     0.82-0.88x the loss without it; min-max norm: 1.05-1.5x, i.e. worse, and it costs
     32 bits per column; outlier columns (1-4, v=2) cost 0.015-0.07 bits/weight for 1-10%
     lower loss, groups (2-4) 0.02-0.15 bits for 2-10%: no better than spending those bits
     on the index rate, so the rule does not add them on its own. Columns that carry most
     of the Hessian (massive activations: up to 89% of diag H in one column of a down_proj)
     are served by the Hessian-weighted k-means itself, see `vptq.kmeans._subsample`).
On 4096x4096 layers at bits=2 this picks the paper's v=6, k=4096 (2.02 bits, act order free); on
SmolLM2's 576-wide layers, where a 4096x6 codebook alone costs 1.2 bits/weight, it picks
v=4, k=256 (2.03-2.08 bits) and v=2..3 for the 192x576 k/v projections.

If the Config fixes v and k and nothing fits the budget, the explicit configuration is used
as given (explicit parameters override the budget). Otherwise an impossible budget raises
`BudgetError` with the nearest valid choices.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

from vptq.numerics import ceil_log2


@dataclass(frozen=True)
class LayerConfig:
    """One layer's VPTQ parameters (official format constraints checked by `check_format`)."""

    vector_len: int
    num_centroids: int
    num_res_centroids: int = 0  # 0 = no residual stage
    group_num: int = 1
    outlier_size: int = 0  # input columns with their own codebook
    outlier_vector_len: int = 0
    outlier_num_centroids: int = 0
    perm: bool = True  # act order (stored, 16 bits per input column, only where `stores_perm`)
    norm: bool = False  # per-input-column weight_scale / weight_bias

    def short(self) -> str:
        s = f"v{self.vector_len}k{self.num_centroids}"
        if self.num_res_centroids:
            s += f"r{self.num_res_centroids}"
        if self.group_num > 1:
            s += f"g{self.group_num}"
        if self.outlier_size:
            s += f"o{self.outlier_size}v{self.outlier_vector_len}k{self.outlier_num_centroids}"
        if self.norm:
            s += "n"
        if self.perm:
            s += "p"
        return s


_log2 = ceil_log2  # bits of one index into k entries (0 for k <= 1)


def stores_perm(c: LayerConfig) -> bool:
    """Whether the column order must be stored as a permutation. Outlier columns come first in the
    stored order whatever their position, so their order is always stored (as the official format
    does, perm or not); with one group and no outliers every column shares one codebook, so a
    column's indices can sit at the column's own position and the act order costs nothing
    (`vptq.quantizer` stores them so); with several groups a column's codebook follows from its
    position in the permuted order, which must be stored."""
    return bool(c.outlier_size) or (c.perm and c.group_num > 1)


def storage_bits(out_f: int, in_f: int, c: LayerConfig) -> Dict[str, int]:
    """Bits by component, exactly as `VQWeight.storage()` counts them for this configuration."""
    v, k, kr, G = c.vector_len, c.num_centroids, c.num_res_centroids, c.group_num
    n = math.ceil(out_f / v)
    gs = (in_f - c.outlier_size) // G
    tb = _log2(k) + (_log2(kr) if kr else 0)
    words = math.ceil(gs * tb / 32)
    bits = {"indices": G * n * words * 32, "codebooks": G * k * v * 16}
    if kr:
        bits["res_codebooks"] = G * kr * v * 16
    if c.outlier_size:
        no = math.ceil(out_f / c.outlier_vector_len)
        bits["outlier_indices"] = no * c.outlier_size * 16
        bits["outlier_codebooks"] = c.outlier_num_centroids * c.outlier_vector_len * 16
    if stores_perm(c):
        bits["perm"] = in_f * 16
    if c.norm:
        bits["norms"] = 2 * in_f * 16
    return bits


def total_bits_per_weight(out_f: int, in_f: int, c: LayerConfig) -> float:
    return sum(storage_bits(out_f, in_f, c).values()) / (out_f * in_f)


def _pow2(x: int) -> bool:
    return x >= 2 and (x & (x - 1)) == 0


def check_format(out_f: int, in_f: int, c: LayerConfig) -> None:
    """Raise BudgetError unless `c` fits the official VPTQ format for an (out_f, in_f) layer."""
    from vptq.methods import BudgetError

    if not 1 <= c.vector_len <= out_f:
        raise BudgetError(f"vector_len={c.vector_len} is invalid for out_features={out_f}; valid: 1..{out_f}")
    if not _pow2(c.num_centroids) or c.num_centroids > 1 << 16:
        raise BudgetError(f"num_centroids={c.num_centroids} is invalid; valid: a power of two in 2..65536")
    if c.num_res_centroids:
        if not _pow2(c.num_res_centroids) or c.num_res_centroids > c.num_centroids:
            raise BudgetError(f"num_res_centroids={c.num_res_centroids} is invalid with num_centroids="
                              f"{c.num_centroids}; valid: 0 or a power of two in 2..{c.num_centroids}")
    if c.group_num < 1:
        raise BudgetError(f"group_num={c.group_num} is invalid; valid: >= 1")
    if c.outlier_size:
        if not 0 < c.outlier_size < in_f:
            raise BudgetError(f"outlier_size={c.outlier_size} is invalid for in_features={in_f}; valid: 0..{in_f - 1}")
        if not 2 <= c.outlier_vector_len <= out_f:
            raise BudgetError(f"outlier_vector_len={c.outlier_vector_len} is invalid; valid: 2..{out_f}")
        if not _pow2(c.outlier_num_centroids) or c.outlier_num_centroids > 1 << 16:
            raise BudgetError(f"outlier_num_centroids={c.outlier_num_centroids} is invalid; "
                              f"valid: a power of two in 2..65536")
    rest = in_f - c.outlier_size
    if rest % c.group_num:
        divs = [g for g in range(1, min(rest, 64) + 1) if rest % g == 0]
        raise BudgetError(f"group_num={c.group_num} does not divide the {rest} non-outlier columns; "
                          f"valid: {', '.join(map(str, divs))}")



# ---------------------------------------------------------------------------- the community's names
SPEC_SUFFIXES = {"woft": "without finetuning"}  # VPTQ-community's suffixes -> meaning
_SPEC = re.compile(r"v(\d+)-k(\d+)-(\d+)((?:-[A-Za-z0-9]+)*)")


def parse_spec(spec: str) -> Dict[str, Any]:
    """The VPTQ-community naming as a shorthand: "v8-k65536-256" -> vector_len 8, num_centroids 65536,
    num_res_centroids 256 (0 = no residual stage), e.g. the tail of Meta-Llama-3.1-8B-Instruct-
    v8-k65536-256-woft. Suffix "-woft" (without finetuning) is returned as {"finetune": False}; any
    other suffix, or another form, raises a one-line MethodError."""
    from vptq.methods import MethodError

    m = _SPEC.fullmatch(str(spec).strip())
    if not m:
        raise MethodError(f"method.spec={spec!r} is not of the form v<vector_len>-k<num_centroids>-<num_res_centroids>"
                          f"[-woft], e.g. v8-k65536-256 or v8-k65536-0-woft")
    out: Dict[str, Any] = {"vector_len": int(m.group(1)), "num_centroids": int(m.group(2)),
                           "num_res_centroids": int(m.group(3))}
    for suffix in filter(None, m.group(4).split("-")):
        if suffix not in SPEC_SUFFIXES:
            raise MethodError(f"method.spec={spec!r}: unknown suffix '-{suffix}'; valid: "
                              + ", ".join(f"-{k} ({v})" for k, v in SPEC_SUFFIXES.items()))
        out["finetune"] = False
    return out


# ---------------------------------------------------------------------------- the rule
PHI = {1: 1.25, 2: 1.0, 3: 0.85, 4: 0.77, 5: 0.71, 6: 0.66, 7: 0.62, 8: 0.59}
PERM_GAIN = 0.83
NORM_GAIN = 1.15
MAX_AUTO_V = 16
_FIELDS = ("vector_len", "num_centroids", "num_res_centroids", "group_num", "outlier_size",
           "outlier_vector_len", "outlier_num_centroids", "perm", "norm")


def phi(v: float) -> float:
    """Measured loss factor of vector length v at equal index rate (v=2 -> 1)."""
    if v <= 1:  # below 1 (a residual pair of scalars): continue the 1 -> 2 slope
        return PHI[1] * (PHI[1] / PHI[2]) ** (1 - v)
    lo = int(math.floor(v))
    if lo >= 8:
        return PHI[8] * 0.96 ** (v - 8)
    f = v - lo
    return PHI[lo] ** (1 - f) * PHI[lo + 1] ** f


def predicted_log2_loss(out_f: int, in_f: int, c: LayerConfig) -> float:
    """log2 of the predicted relative proxy loss (see the module docstring)."""
    R = (_log2(c.num_centroids) + (_log2(c.num_res_centroids) if c.num_res_centroids else 0)) / c.vector_len
    v_eff = c.vector_len / 2 if c.num_res_centroids else c.vector_len
    s = -2.0 * R + math.log2(phi(v_eff))
    if c.perm or c.outlier_size:
        s += math.log2(PERM_GAIN)
    if c.norm:
        s += math.log2(NORM_GAIN)
    return s


def _candidates(out_f: int, in_f: int, over: Dict[str, object]):
    vs = [over["vector_len"]] if "vector_len" in over else range(1, min(MAX_AUTO_V, out_f) + 1)
    ks = [over["num_centroids"]] if "num_centroids" in over else [1 << b for b in range(1, 17)]
    perms = [over["perm"]] if "perm" in over else [True, False]
    base = {f: over[f] for f in ("group_num", "outlier_size", "outlier_vector_len", "outlier_num_centroids", "norm")
            if f in over}
    for v in vs:
        for k in ks:
            if "num_res_centroids" in over:
                krs = [over["num_res_centroids"]]
            else:
                lk = _log2(k)
                krs = [0] + [1 << b for b in range(1, min(lk, 32 - lk) + 1)]
            for kr in krs:
                for p in perms:
                    yield LayerConfig(vector_len=int(v), num_centroids=int(k), num_res_centroids=int(kr),
                                      perm=bool(p), **base)


def choose_config(out_f: int, in_f: int, bits: Optional[float], tolerance: float = 0.1, **over) -> LayerConfig:
    """The configuration for an (out_f, in_f) layer under `bits` (+ tolerance); `over` holds
    the explicit Config fields (vector_len, num_centroids, num_res_centroids, group_num,
    outlier_size, outlier_vector_len, outlier_num_centroids, perm, norm)."""
    from vptq.methods import BudgetError

    unknown = set(over) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown VPTQ layer parameters {sorted(unknown)}; valid: {', '.join(_FIELDS)}")
    if over.get("outlier_size"):
        if "outlier_vector_len" not in over or "outlier_num_centroids" not in over:
            raise BudgetError(f"outlier_size={over['outlier_size']} needs outlier_vector_len and "
                              f"outlier_num_centroids as well (e.g. 4 and 256)")
    if "outlier_size" in over and not over["outlier_size"]:
        over = {k: v for k, v in over.items() if k not in ("outlier_vector_len", "outlier_num_centroids")}
    explicit = "vector_len" in over and "num_centroids" in over
    if explicit:  # the explicit fields must be valid on their own
        check_format(out_f, in_f, LayerConfig(**{**{"perm": True}, **over, "num_res_centroids":
                                                 over.get("num_res_centroids", 0)}))
    limit = None if bits is None else bits + tolerance
    best, best_key, cheapest = None, None, None
    for c in _candidates(out_f, in_f, over):
        try:
            check_format(out_f, in_f, c)
        except BudgetError:
            continue
        tb = total_bits_per_weight(out_f, in_f, c)
        if cheapest is None or tb < cheapest[0]:
            cheapest = (tb, c)
        if limit is not None and tb > limit + 1e-12:
            continue
        key = (round(predicted_log2_loss(out_f, in_f, c), 9), tb, c.num_res_centroids > 0, c.num_centroids,
               c.num_res_centroids, c.vector_len)
        if best_key is None or key < best_key:
            best, best_key = c, key
    if best is not None:
        return best
    if explicit:
        c = LayerConfig(**{"perm": True, "num_res_centroids": 0, **over})
        check_format(out_f, in_f, c)
        return c
    fixed = ", ".join(f"{k}={v}" for k, v in over.items()) or "no explicit parameters"
    if cheapest is None:
        raise BudgetError(f"no valid VPTQ configuration for a {out_f}x{in_f} layer with {fixed}")
    raise BudgetError(
        f"bits={bits:g} is impossible for a {out_f}x{in_f} layer with {fixed}: the smallest valid VPTQ "
        f"configuration ({cheapest[1].short()}) needs {cheapest[0]:.3f} bits/weight; valid: bits >= "
        f"{cheapest[0] - tolerance:.3f} (tolerance {tolerance:g}), or other explicit parameters")
