"""VPTQ, the quantizer side (arXiv 2409.17066): `method=vptq`.

One linear W (out, in) with its Hessian H = E[x xᵀ] (in, in) becomes a `VQWeight`:

 1. Budget (`vptq.budget`): `bits` -> (v, k, k_res, outliers, groups, perm, norm) per shape;
    explicit Config fields override it.
 2. Dead columns (diag H = 0: never active) are zeroed and get H_cc = 1 (`prepare_hessian`).
 3. Optional per-input-column norm (the reference's `enable_norm`, norm_dim=0):
    s_c = max_r W_rc - min_r W_rc, b_c = min_r W_rc, both stored float16, and the
    normalised weight W' = (W - b) / s is quantized. Since W = W' diag(s) + b, the layer's
    proxy loss tr(ΔW H ΔWᵀ) equals tr(ΔW' diag(s) H diag(s) ΔW'ᵀ): variant=scaled
    (`norm_hessian: scaled`) quantizes W' under H' = diag(s) H diag(s) (k-means weights
    s_c² H_cc, error feedback with H'); variant=reference (`norm_hessian: raw`) does what
    microsoft/VPTQ's `algorithm` branch does: the raw H for the normalised weight.
 4. Column order: the `outlier_size` columns with the largest Hessian diagonal (of the
    Hessian the weight is quantized under) come first, with their own codebook; the other
    columns follow in act order (descending diagonal, as the reference's `enable_perm`) or
    in their original order. With one group and no outliers every column has the same codebook,
    so the act order is absorbed: the solver works in act order and the index columns are then
    stored at their original positions (`VQWeight.perm` None, nothing stored; the dequantized
    weight is bitwise the same, as each column's entries are looked up on their own). Otherwise
    (groups in act order, outlier columns first) the order is stored as `VQWeight.perm`
    (`vptq.budget.stores_perm`).
 5. Codebook initialisation, paper §3.3 ("Hessian-weighted k-means", eq. 9): vectors of
    length v run along the OUTPUT dimension within one input column (so the whole vector
    shares the Hessian weight H_cc of its column); each region (outlier columns, each of
    `group_num` contiguous column groups of the permuted order) gets its own codebook by
    weighted k-means (`vptq.kmeans`), seeded by k-means++ (variant=scaled) or, as the
    reference's cuml KMeans(init="random", n_init=1), by k random vectors. Residual VQ (§3.4):
    a second codebook, by k-means on the residual the first stage leaves: `residual_init:
    kmeans` (variant=scaled) on the residual of the k-means initialisation; `feedback`
    (variant=reference, as the algorithm branch's `fast_vector_quant`) on the residuals of a
    first error-feedback pass with the main codebook alone (one more pass). Centroids are
    rounded to float16 right away: indices are chosen against the float16 codebook that is
    stored (the reference's own run keeps float32 centroids until export).
 6. Channel-independent second-order optimisation, paper §3.2 (eq. 5-7): the shared GPTQ
    loop `vptq.solver.error_feedback` with step=1; each column's ceil(out/v) vectors are
    assigned to their nearest centroid (plain L2: every entry of a vector shares H_cc),
    greedily first stage then residual stage, and the column's error is fed back.

Padding rows (out not a multiple of v): a column is padded to n·v rows; the padding entries
are "don't care": the last vector of a column is matched on its existing coordinates only
(masked distance, in k-means and in the assignment), the solver never sees them, and
dequantization drops them. They are counted in storage (the packed indices cover n·v rows).

Variants and presets (VPTQ.Config): `variant=reference` (default) takes the algorithm branch's
choices (raw-H weighting under the norm, two-pass residual initialisation, random k-means
seeding); `variant=scaled` ours (diag(s)·H·diag(s), residual k-means at init, k-means++). Their
code needs cuml/cupy (GPU k-means) and does not run on a CPU, so these choices are read from
their source, not measured against it. `iters=cpu` (default): k-means up to 10 iterations, tol
1e-3, Lloyd on a subsample; `iters=paper`: their 100 iterations, tol 1e-5, every vector. Fields
given explicitly override both.

Layer-wise finetuning (paper §4) lives in `vptq.finetune` (`VPTQ.finetune_block`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from vptq.budget import LayerConfig, choose_config, check_format, parse_spec, stores_perm
from vptq.kmeans import kmeans
from vptq.methods import ITERS_PRESETS, Method, MethodError, check_choice
from vptq.numerics import round_fp16
from vptq.solver import error_feedback, prepare_hessian
from vptq.vqweight import VQWeight


@dataclass
class QuantOptions:
    """Algorithm knobs that do not change the storage format, as `quantize_weight` takes them
    (VPTQ.Config resolves its variant and iteration preset into these; the defaults here are
    variant=scaled with iters=cpu)."""

    percdamp: float = 0.01
    block_size: int = 128
    norm_hessian: str = "scaled"  # scaled: diag(s) H diag(s) (consistent) | raw: H (reference)
    kmeans_iters: int = 10
    kmeans_tol: float = 1e-3
    kmeans_init_sample: int = 2048
    kmeans_max_train: Optional[int] = 32768  # Lloyd trains on max(this, per_centroid*k) vectors; None: all
    kmeans_train_per_centroid: int = 64
    residual_init: str = "kmeans"  # kmeans: on the init residual | feedback: two passes (reference)
    kmeans_init: str = "kmeans++"  # kmeans++ | random (the reference's cuml KMeans(init="random"))


VARIANTS = {  # what follows from `variant` unless the Config gives it explicitly
    "reference": {"norm_hessian": "raw", "residual_init": "feedback", "kmeans_init": "random"},
    "scaled": {"norm_hessian": "scaled", "residual_init": "kmeans", "kmeans_init": "kmeans++"},
}
ITERS = {  # what follows from `iters` unless given explicitly (kmeans_max_train None = every vector)
    "cpu": {"kmeans_iters": 10, "kmeans_tol": 1e-3, "kmeans_max_train": 32768},
    "paper": {"kmeans_iters": 100, "kmeans_tol": 1e-5, "kmeans_max_train": None},
}
FROM_PRESET = -1  # kmeans_max_train's "not given" (None already means every vector)


class _Codebook:
    """A float16-rounded codebook (k, v) and fast nearest-centroid lookup for one column's
    n vectors, the last of which may have only `last_valid` < v existing coordinates."""

    def __init__(self, C: torch.Tensor, last_valid: int):
        self.C = C  # (k, v) float32 holding float16 values
        self.v = C.shape[1]
        self.Ct = C.t().contiguous()  # (v, k)
        self.cn = (C * C).sum(1)  # (k,)
        self.last_valid = last_valid
        if last_valid < self.v:
            Cv = C[:, :last_valid]  # (k, d)
            self.Ctt = Cv.t().contiguous()  # (d, k)
            self.cnt = (Cv * Cv).sum(1)

    def nearest(self, X: torch.Tensor) -> torch.Tensor:
        """X (n, v) -> indices (n,)."""
        idx = torch.addmm(self.cn, X, self.Ct, alpha=-2.0).min(1).indices  # (n,); ties -> first
        if self.last_valid < self.v:
            x = X[-1:, :self.last_valid]  # (1, d)
            idx[-1] = torch.addmm(self.cnt, x, self.Ctt, alpha=-2.0).min(1).indices[0]
        return idx


def _column_vectors(Wc: torch.Tensor, v: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Columns Wc (out, m) -> vectors (m*n, v) along the output dim (column-major: column j's
    n vectors are rows j*n .. j*n+n-1), padded with zeros, and each vector's count of
    existing coordinates (m*n,)."""
    out_f, m = Wc.shape
    n = math.ceil(out_f / v)
    pad = n * v - out_f
    X = F.pad(Wc.t(), (0, pad)).reshape(m * n, v)  # (m, n*v) -> (m*n, v)
    valid = torch.full((n,), v, dtype=torch.int64, device=Wc.device)
    valid[-1] = v - pad
    return X, valid.repeat(m)


@contextlib.contextmanager
def _single_thread(device):
    """Run on one CPU thread. The column loop issues thousands of tiny ops, and k-means many
    small ones: OpenMP fork/join costs more than it gains on them, and collapses (10-100x
    slower, measured) when the cores are shared with other processes."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _check_options(opts: QuantOptions) -> None:
    if opts.norm_hessian not in ("scaled", "raw"):
        raise ValueError(f"method.norm_hessian={opts.norm_hessian!r}; valid choices: raw, scaled")
    if opts.residual_init not in ("kmeans", "feedback"):
        raise ValueError(f"method.residual_init={opts.residual_init!r}; valid choices: feedback, kmeans")
    if opts.kmeans_init not in ("kmeans++", "random"):
        raise ValueError(f"method.kmeans_init={opts.kmeans_init!r}; valid choices: kmeans++, random")
    if opts.kmeans_iters < 1 or opts.kmeans_init_sample < 1 or opts.kmeans_train_per_centroid < 1:
        raise ValueError("method.kmeans_iters, kmeans_init_sample and kmeans_train_per_centroid must be >= 1")
    if opts.kmeans_max_train is not None and opts.kmeans_max_train < 1:
        raise ValueError(f"method.kmeans_max_train={opts.kmeans_max_train}; valid: >= 1 or null (all vectors)")


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back (what is stored is what is used); overflow is an error."""
    return round_fp16(t, overflow="raise")


def _kmeans(X, k, w, valid, seed, opts: QuantOptions, final_assign: bool):
    """k-means with the options' effort. Lloyd trains on at least `kmeans_train_per_centroid`
    vectors per centroid (measured on a 4096x4096 layer, k=4096: 8 per centroid left the
    proxy loss 25% above full-data k-means), never fewer than `kmeans_max_train` (None = all
    vectors); k-means++ seeds from at least 4 vectors per centroid."""
    mt = None if opts.kmeans_max_train is None else max(opts.kmeans_max_train, opts.kmeans_train_per_centroid * k)
    return kmeans(X, k, weights=w, valid=valid, seed=seed, iters=opts.kmeans_iters, tol=opts.kmeans_tol,
                  init_sample=max(opts.kmeans_init_sample, 4 * k), max_train=mt, final_assign=final_assign,
                  init_method=opts.kmeans_init)


def fit_codebooks(X, w, valid, k, k_res, seed, opts: QuantOptions):
    """Hessian-weighted k-means of one region's vectors X (N, v), weights w (N,):
    -> float16-rounded centroids (k, v) and residual centroids (k_res, v) or None."""
    km = _kmeans(X, k, w, valid, seed, opts, final_assign=k_res > 0)
    C = _fp16(km.centroids)
    R = None
    if k_res:
        mask = torch.arange(X.shape[1], device=X.device)[None, :] < valid[:, None]
        resid = (X - C[km.labels]) * mask  # (N, v) first-stage residual at init
        R = _fp16(_kmeans(resid, k_res, w, valid, seed + 7919, opts, final_assign=False).centroids)
    return C, R


@torch.no_grad()
def quantize_weight(W: torch.Tensor, H: torch.Tensor, cfg: LayerConfig, *, seed: int = 0,
                    opts: Optional[QuantOptions] = None, name: str = "layer") -> Tuple[VQWeight, Dict[str, Any]]:
    """Quantize W (out, in) under H (in, in) with the layer configuration `cfg`.

    Returns the VQWeight and an info dict (solver loss, configuration). On CPU it runs on one
    thread (see `_single_thread`)."""
    with _single_thread(W.device):
        return _quantize_weight(W, H, cfg, seed=seed, opts=opts, name=name)


def _quantize_weight(W, H, cfg, *, seed, opts, name):
    opts = opts or QuantOptions()
    if W.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (out, in), got shape {tuple(W.shape)}")
    out_f, in_f = W.shape
    if H is None:
        raise ValueError(f"{name}: VPTQ needs the layer's Hessian (calibration data), got None")
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} != {(in_f, in_f)}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: weight contains NaN or Inf")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: Hessian contains NaN or Inf")
    _check_options(opts)
    check_format(out_f, in_f, cfg)
    try:
        W, H, dead = prepare_hessian(W, H)  # float32 copies; dead columns zeroed, H_cc = 1
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    dev = W.device

    # 3. per-input-column norm
    scale16 = bias16 = None
    Hq = H
    if cfg.norm:
        wmin, wmax = W.min(0).values, W.max(0).values  # (in,)
        rng = wmax - wmin
        s = _fp16(torch.where(rng > 0, rng, torch.ones_like(rng)))
        s = torch.where(s > 0, s, torch.ones_like(s))  # a range that underflows float16
        b = _fp16(wmin)
        scale16, bias16 = s.half(), b.half()
        W = (W - b[None, :]) / s[None, :]
        if opts.norm_hessian == "scaled":
            Hq = H * s[:, None] * s[None, :]

    # 4. column order
    d = torch.diagonal(Hq).clone()
    d[dead] = 0.0  # dead columns never matter: zero k-means weight, last in act order
    o = cfg.outlier_size
    if cfg.perm or o:
        desc = torch.sort(d, descending=True, stable=True).indices  # (in,)
        if cfg.perm:
            order = desc
        else:
            is_out = torch.zeros(in_f, dtype=torch.bool, device=dev)
            is_out[desc[:o]] = True
            order = torch.cat([desc[:o], torch.nonzero(~is_out).flatten()])
    else:
        order = None
    Wp = W if order is None else W[:, order]  # (out, in), permuted
    dp = d if order is None else d[order]

    # 5. codebooks per region
    v, k, kr, G = cfg.vector_len, cfg.num_centroids, cfg.num_res_centroids, cfg.group_num
    gs = (in_f - o) // G
    n = math.ceil(out_f / v)
    res_at_init = kr > 0 and opts.residual_init == "kmeans"
    cents, rcents, regions = [], [], []
    for g in range(G):
        c0 = o + g * gs
        X, valid = _column_vectors(Wp[:, c0:c0 + gs], v)  # (gs*n, v)
        wv = dp[c0:c0 + gs].repeat_interleave(n)  # (gs*n,) H_cc of each vector's column
        C, R = fit_codebooks(X, wv, valid, k, kr if res_at_init else 0, seed + 1000 * g, opts)
        cents.append(C)
        rcents.append(R)
        regions.append((wv, valid))
    if o:
        vo, ko = cfg.outlier_vector_len, cfg.outlier_num_centroids
        no = math.ceil(out_f / vo)
        X, valid = _column_vectors(Wp[:, :o], vo)
        Co, _ = fit_codebooks(X, dp[:o].repeat_interleave(no), valid, ko, 0, seed + 999_983, opts)
        out_book = _Codebook(Co, out_f - (no - 1) * vo)
        out_idx = torch.empty(1, no, o, dtype=torch.int64, device=dev)

    # 6. second-order error feedback, one column at a time
    last = out_f - (n - 1) * v
    books = [_Codebook(C, last) for C in cents]
    idx = torch.empty(G, n, gs, dtype=torch.int64, device=dev)
    ridx = torch.empty(G, n, gs, dtype=torch.int64, device=dev) if kr else None
    pad = n * v - out_f

    def make_quantize_cols(rbooks, record=None):
        def quantize_cols(col: int, Wc: torch.Tensor) -> torch.Tensor:
            x = Wc[:, 0]  # (out,) the error-fed column
            if col < o:
                X = F.pad(x, (0, no * vo - out_f)).reshape(no, vo)
                a = out_book.nearest(X)
                out_idx[0, :, col] = a
                return out_book.C[a].reshape(-1)[:out_f, None]
            g, c = divmod(col - o, gs)
            X = F.pad(x, (0, pad)).reshape(n, v) if pad else x.reshape(n, v)  # (n, v)
            a = books[g].nearest(X)
            idx[g, :, c] = a
            q = books[g].C[a]  # (n, v)
            if record is not None:  # first-stage residual of the vectors actually quantized
                record[g][c * n:(c + 1) * n] = X - q
            if rbooks is not None:
                ra = rbooks[g].nearest(X - q)  # greedy second stage
                ridx[g, :, c] = ra
                q = q + rbooks[g].C[ra]
            return q.reshape(-1)[:out_f, None]
        return quantize_cols

    def run(quantize_cols):
        return error_feedback(W, Hq, quantize_cols, block_size=opts.block_size, step=1,
                              percdamp=opts.percdamp, perm=order)

    if kr and not res_at_init:
        # the reference's order: a first pass with the main codebook only, k-means of the
        # residuals it leaves (after error feedback), then the full two-stage pass
        resid = [torch.zeros(gs * n, v, device=dev) for _ in range(G)]
        run(make_quantize_cols(None, resid))
        for g in range(G):
            wv, valid = regions[g]
            mask = torch.arange(v, device=dev)[None, :] < valid[:, None]
            km = _kmeans(resid[g] * mask, kr, wv, valid, seed + 1000 * g + 7919, opts, final_assign=False)
            rcents[g] = _fp16(km.centroids)
        del resid
    rbooks = [_Codebook(R, last) for R in rcents] if kr else None
    res = run(make_quantize_cols(rbooks))

    perm = order
    if order is not None and not stores_perm(cfg):  # one group, no outliers: absorb the act order
        inv = torch.argsort(order)  # stored (act-order) column of each original column
        idx = idx[:, :, inv]  # (1, n, in): column c's indices at position c
        ridx = ridx[:, :, inv] if kr else None
        perm = None
    qw = VQWeight(
        out_features=out_f, in_features=in_f, vector_len=v, num_centroids=k, group_num=G, group_size=gs,
        centroids=torch.stack(cents).half(), indices=idx,
        num_res_centroids=kr, res_centroids=torch.stack(rcents).half() if kr else None, res_indices=ridx,
        outlier_size=o, outlier_vector_len=cfg.outlier_vector_len if o else 0,
        outlier_num_centroids=cfg.outlier_num_centroids if o else 0,
        outlier_centroids=out_book.C[None].half() if o else None, outlier_indices=out_idx if o else None,
        perm=perm, weight_scale=scale16, weight_bias=bias16,
    )
    # Q: the solver's dequantized weight (original column order, normalised space if norm);
    # order: the column order the solver used (None = original), stored or absorbed
    info = {"config": cfg.short(), "solver_loss": res.loss, "Q": res.Q, "order": order}
    return qw, info


class VPTQ(Method):
    """Vector post-training quantization (arXiv 2409.17066) behind the common interface."""

    name = "vptq"
    needs_hessian = True

    @dataclass
    class Config:
        name: str = "vptq"
        tolerance: float = 0.1  # realized total bits may exceed the target by at most this
        # the VPTQ-community naming as a shorthand for vector_len/num_centroids/num_res_centroids, e.g.
        # v8-k65536-256 (suffix -woft: without finetuning); vptq.budget.parse_spec
        spec: Optional[str] = None
        # explicit parameters override the bits budget (null = the budget decides)
        vector_len: Optional[int] = None
        num_centroids: Optional[int] = None
        num_res_centroids: Optional[int] = None  # 0 = no residual stage
        group_num: Optional[int] = None
        outlier_size: Optional[int] = None  # input columns with their own codebook (0 = none)
        outlier_vector_len: Optional[int] = None
        outlier_num_centroids: Optional[int] = None
        enable_perm: Optional[bool] = None  # act order (free with one group and no outliers, else 16 bits per column)
        enable_norm: Optional[bool] = None  # per-input-column weight_scale / weight_bias
        # algorithm knobs: null = from `variant` / `iters` (VARIANTS, ITERS above); other
        # defaults defined once, in QuantOptions
        variant: str = "reference"  # reference: microsoft/VPTQ algorithm branch | scaled: ours
        iters: str = "cpu"  # iteration preset: cpu | paper (k-means 100 iterations, tol 1e-5, every vector)
        norm_hessian: Optional[str] = None  # scaled: diag(s) H diag(s) | raw: H (the reference's)
        residual_init: Optional[str] = None  # kmeans: on the init residual | feedback: two passes (reference's)
        kmeans_init: Optional[str] = None  # kmeans++ | random (the reference's cuml KMeans init)
        kmeans_iters: Optional[int] = None
        kmeans_tol: Optional[float] = None
        kmeans_max_train: Optional[int] = FROM_PRESET  # -1: from the preset; null: Lloyd on every vector
        percdamp: float = QuantOptions.percdamp
        block_size: int = QuantOptions.block_size
        kmeans_init_sample: int = QuantOptions.kmeans_init_sample
        kmeans_train_per_centroid: int = QuantOptions.kmeans_train_per_centroid
        # layer-wise finetuning of centroids and norms (paper §4); in the runner an alias of finetune=layer
        # (runners/finetune.py: every method, the paper's recipe); finetune_* below apply outside the runner
        finetune: bool = False
        finetune_epochs: int = 4
        finetune_lr: float = 1e-3  # measured on SmolLM2 block 11: 1e-4 too slow, 1e-2 diverges
        finetune_batch: int = 4

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        check_choice("variant", config.variant, VARIANTS)
        check_choice("iters", config.iters, ITERS_PRESETS)
        preset = {**VARIANTS[config.variant], **ITERS[config.iters]}
        given = {f.name: getattr(config, f.name) for f in fields(QuantOptions)}
        if given["kmeans_max_train"] == FROM_PRESET:
            given["kmeans_max_train"] = preset["kmeans_max_train"]
        self.opts = QuantOptions(**{k: preset[k] if (v is None and k in preset and k != "kmeans_max_train") else v
                                    for k, v in given.items()})
        _check_options(self.opts)
        self.spec = self._resolve_spec(config)

    @staticmethod
    def _resolve_spec(config) -> Dict[str, Any]:
        """method.spec -> the explicit fields it stands for; a different explicit value is a conflict."""
        if not config.spec:
            return {}
        spec = parse_spec(config.spec)
        for field, value in spec.items():
            given = getattr(config, field, None)
            if given is not None and given != value:
                raise MethodError(f"method.spec={config.spec} sets {field}={value} but method.{field}={given}; "
                                  f"give one of them (or the same value)")
        spec.pop("finetune", None)
        return spec

    def _overrides(self) -> Dict[str, Any]:
        c = self.config
        keys = {"vector_len": c.vector_len, "num_centroids": c.num_centroids,
                "num_res_centroids": c.num_res_centroids, "group_num": c.group_num,
                "outlier_size": c.outlier_size, "outlier_vector_len": c.outlier_vector_len,
                "outlier_num_centroids": c.outlier_num_centroids, "perm": c.enable_perm, "norm": c.enable_norm}
        return {**self.spec, **{k: v for k, v in keys.items() if v is not None}}

    def layer_plan(self, out_f: int, in_f: int) -> LayerConfig:
        return choose_config(int(out_f), int(in_f), self.bits, self.config.tolerance, **self._overrides())

    layer_config = layer_plan  # the older name (users' scripts)

    def settings(self, plan=None) -> Dict[str, Any]:
        s: Dict[str, Any] = {f"{o}x{i}": c.short() for (o, i), c in sorted((plan or {}).items())}
        o = self.opts
        s = {"variant": self.config.variant, "iters": self.config.iters, **s}
        if self.config.spec:
            s["spec"] = self.config.spec
        s.update(finetune=self.config.finetune, norm_hessian=o.norm_hessian, residual_init=o.residual_init,
                 kmeans_init=o.kmeans_init, kmeans_iters=o.kmeans_iters, kmeans_tol=o.kmeans_tol,
                 kmeans_max_train=o.kmeans_max_train if o.kmeans_max_train is not None else "all")
        return s

    def quantize_layer(self, W, H, *, name, plan=None):
        if W.dim() != 2:
            raise ValueError(f"{name}: weight must be 2-D (out, in), got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
        cfg = self.layer_plan(*W.shape) if plan is None else plan
        qw, _ = quantize_weight(W, H, cfg, seed=self.layer_seed(name), opts=self.opts, name=name)
        return qw

    @property
    def uses_float_outputs(self) -> bool:
        return bool(self.config.finetune)

    def finetune_block(self, block, ctx):
        if not self.config.finetune:
            return {}
        from vptq.finetune import finetune_block

        return finetune_block(block, ctx, epochs=self.config.finetune_epochs, lr=self.config.finetune_lr,
                              batch=self.config.finetune_batch, seed=self.seed * 7 + ctx.index)
