"""Weighted k-means on (N, v) vectors: VPTQ's Hessian-weighted codebook initialisation.

VPTQ (arXiv 2409.17066) §3.3, "Hessian-weighted centroid initialisation": the codebook of a
layer minimises Σ_n w_n ||x_n - c_{a(n)}||² over the layer's vectors x_n, where w_n is the
Hessian diagonal H_cc of the input column the vector lies in (all v entries of a vector share
that column, so the weight is per vector). This module owns the clustering itself:

  * seeded greedy k-means++ initialisation (Arthur & Vassilvitskii 2007, sampling ∝ w·D²,
    best of 2 + ln k candidates per step as in scikit-learn) on a seeded uniform subsample of
    at most `init_sample` vectors;
  * weighted Lloyd iterations on a subsample of at most `max_train` vectors (the heaviest
    quarter always, a seeded uniform sample of the rest with importance weights)
    (assignment: chunked matmul distances ||c||² - 2 x·c, never an (N, k) matrix at once;
    update: Σ w x / Σ w per cluster through a sort + float64 cumulative sum, which is
    deterministic on every device, unlike atomics-based scatter-adds);
  * empty clusters re-seeded deterministically at the training vectors with the largest
    weighted error (ties broken by index);
  * early stop when the relative change of the objective falls below `tol`.

Vectors may be *partial*: `valid[n] = d` says only the first d coordinates of x_n exist (the
padding rows of a column whose length is not a multiple of v). Partial vectors are clustered
on their existing coordinates only: their distance ignores the padded coordinates and they
contribute to a centroid coordinate only where they have one.

Every random choice comes from a CPU `torch.Generator` seeded by `seed`, so the result is a
function of (data, weights, seed, settings) only: bitwise reproducible on a given device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from vptq.numerics import Segments

CHUNK_ELEMS = 1 << 22  # distances computed per chunk: chunk_rows * k ≈ 4M floats (16 MB)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, v) float32
    labels: torch.Tensor  # (N,) int64, nearest centroid of every input vector
    inertia: float  # Σ_n w_n ||x_n - c_{labels_n}||² over all N vectors (existing coords only)
    n_iter: int  # Lloyd iterations run


def _subsample(w: torch.Tensor, m: int, gen: torch.Generator):
    """m of the N vectors: the m//4 heaviest (by weight; ties by index) always, and a seeded
    uniform sample of the others whose weights are scaled by (#others / #sampled), so the
    subsample's weighted objective estimates the full one without bias. A plain uniform
    sample misses the few vectors that carry most of the weight (a column holding 89% of a
    down_proj's Hessian diagonal, measured on SmolLM2) -> (idx (m,) sorted, weights (m,))."""
    N = w.shape[0]
    h = m // 4
    order = torch.sort(w.cpu(), descending=True, stable=True).indices  # (N,)
    heavy, rest = order[:h], order[h:]
    pick = rest[torch.randperm(N - h, generator=gen)[: m - h]]
    idx = torch.cat([heavy, pick])
    scale = torch.ones(m, dtype=torch.float32)
    scale[h:] = (N - h) / (m - h)
    srt = torch.sort(idx)
    idx = srt.values.to(w.device)
    return idx, w[idx] * scale[srt.indices].to(w.device)


def _chunk_rows(k: int) -> int:
    return max(256, CHUNK_ELEMS // max(k, 1))


@torch.no_grad()
def assign(X: torch.Tensor, C: torch.Tensor, valid: Optional[torch.Tensor] = None,
           return_dist: bool = False):
    """Nearest centroid (plain L2) of every row of X.

    X: (N, v); C: (k, v); valid: optional (N,) int, number of existing leading coordinates
    of each row (padding coordinates are ignored). Returns labels (N,) int64 and, if asked,
    the squared distances (N,) float32. Ties go to the lowest index (argmin's rule).
    """
    X = X.float()
    C = C.float()
    N, v = X.shape
    k = C.shape[0]
    labels = torch.empty(N, dtype=torch.int64, device=X.device)
    dist = torch.empty(N, dtype=torch.float32, device=X.device) if return_dist else None
    cn = (C * C).sum(1)  # (k,)
    step = _chunk_rows(k)
    for s in range(0, N, step):
        xs = X[s:s + step]  # (n, v)
        d = torch.addmm(cn, xs, C.t(), beta=1.0, alpha=-2.0)  # (n, k) = ||c||² - 2 x·c
        m, a = d.min(dim=1)  # min(dim) is ~2x faster than argmin on CPU; ties -> first index
        labels[s:s + step] = a
        if return_dist:
            dist[s:s + step] = (m + (xs * xs).sum(1)).clamp_min(0)
    if valid is not None:
        part = torch.nonzero(valid < v).flatten()
        if part.numel():
            for dv in torch.unique(valid[part]).tolist():
                rows = part[valid[part] == dv]
                xs, cs = X[rows, :dv], C[:, :dv]
                d = torch.addmm((cs * cs).sum(1), xs, cs.t(), beta=1.0, alpha=-2.0)  # (r, k)
                m, a = d.min(dim=1)
                labels[rows] = a
                if return_dist:
                    dist[rows] = (m + (xs * xs).sum(1)).clamp_min(0)
    return (labels, dist) if return_dist else labels


def _coord_mask(valid: Optional[torch.Tensor], N: int, v: int, device) -> Optional[torch.Tensor]:
    if valid is None:
        return None
    return torch.arange(v, device=device)[None, :] < valid[:, None]  # (N, v) bool


def _weighted_means(X, w, labels, k, mask, old):
    """Per-cluster weighted means, deterministic on every device (`vptq.numerics.Segments`).

    X (N, v), w (N,), labels (N,), mask (N, v) bool or None -> (k, v) means, (k,) weight sums.
    A centroid coordinate no vector contributes to keeps its `old` value. Sums in float64."""
    N, v = X.shape
    wd = w.double()
    wx = X.double() * wd[:, None]  # (N, v)
    wc = wd[:, None].expand(N, v)
    if mask is not None:
        wx = wx * mask
        wc = wc * mask
    seg = Segments(labels, k)
    S = seg.sum(wx, torch.float64)  # (k, v)
    Wt = seg.sum(wc.contiguous(), torch.float64)
    means = torch.where(Wt > 0, S / Wt.clamp_min(1e-300), old.double()).float()
    return means, Wt.max(dim=1).values  # (k, v), (k,)


def _kmeanspp(X, w, k, gen, valid):
    """Weighted greedy k-means++ seeding on X (S, v): -> (k, v). The first centre is drawn
    ∝ w; at each later step 2 + ln(k) candidates are drawn ∝ w · D² (D: distance to the
    nearest centre so far, existing coordinates only for partial vectors) and the one that
    lowers Σ w · D² most is kept (scikit-learn's "greedy k-means++")."""
    S, v = X.shape
    trials = 2 + int(math.log(k)) if k > 1 else 1
    u = torch.rand(k, trials, generator=gen, dtype=torch.float64).to(X.device)  # pre-drawn uniforms
    mask = _coord_mask(valid, S, v, X.device)
    Xm = X if mask is None else X * mask
    xn = (Xm * Xm).sum(1)  # (S,)
    wd = w.double()
    C = torch.empty(k, v, dtype=X.dtype, device=X.device)
    best = torch.full((S,), float("inf"), dtype=torch.float64, device=X.device)
    p = wd.clone()
    for i in range(k):
        cdf = torch.cumsum(p, 0)
        total = cdf[-1]
        if not bool(total > 0):  # every vector coincides with a centre: fill with copies
            C[i:] = C[i - 1] if i else Xm[0]
            break
        m = 1 if i == 0 else trials
        j = torch.searchsorted(cdf, u[i, :m] * total).clamp_max(S - 1)  # (m,) candidates
        cand = Xm[j]  # (m, v)
        if mask is None:
            d = xn[None, :] + (cand * cand).sum(1)[:, None] - 2.0 * cand @ Xm.t()  # (m, S)
        else:  # partial vectors: only their existing coordinates
            cm = mask[None, :, :] * cand[:, None, :]  # (m, S, v)
            d = xn[None, :] + (cm * cm).sum(2) - 2.0 * (Xm[None] * cm).sum(2)
        d = torch.minimum(best[None, :], d.clamp_min(0).double())  # (m, S)
        pot = (d * wd[None, :]).sum(1)  # (m,)
        b = int(torch.argmin(pot))
        C[i] = cand[b]
        best = d[b]
        p = wd * best
    return C


@torch.no_grad()
def kmeans(
    X: torch.Tensor,
    k: int,
    *,
    weights: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    seed: int = 0,
    iters: int = 20,
    tol: float = 1e-4,
    init_sample: int = 32768,
    max_train: Optional[int] = None,
    init: Optional[torch.Tensor] = None,
    final_assign: bool = True,
    init_method: str = "kmeans++",
) -> KMeansResult:
    """Weighted k-means of X (N, v) into k centroids.

    weights: (N,) non-negative (None = uniform; all zero = uniform); valid: (N,) existing
    leading coordinates per row (None = all v); init: optional (k, v) starting centroids
    (skips k-means++); max_train: Lloyd runs on a seeded subsample of at most this many
    vectors (None = all); final_assign: label all N vectors at the end (else labels/inertia
    refer to the training subsample only and labels is that subsample's); init_method:
    "kmeans++" (weighted greedy k-means++) or "random" (k distinct training vectors drawn
    uniformly, as cuml's KMeans(init="random") that microsoft/VPTQ's algorithm branch calls).
    """
    if init_method not in ("kmeans++", "random"):
        raise ValueError(f"init_method={init_method!r}; valid: kmeans++, random")
    if X.dim() != 2:
        raise ValueError(f"kmeans expects (N, v) vectors, got shape {tuple(X.shape)}")
    N, v = X.shape
    if k < 1:
        raise ValueError(f"k={k} centroids; valid: k >= 1")
    if N == 0:
        raise ValueError("kmeans got no vectors")
    X = X.float()
    if not torch.isfinite(X).all():
        raise ValueError("kmeans input contains NaN or Inf")
    dev = X.device
    w = torch.ones(N, device=dev) if weights is None else weights.float().to(dev)
    if w.shape != (N,) or bool((w < 0).any()) or not torch.isfinite(w).all():
        raise ValueError("kmeans weights must be (N,) finite and non-negative")
    if not bool(w.sum() > 0):
        w = torch.ones(N, device=dev)
    if valid is not None:
        valid = valid.to(dev).long()
        if bool((valid < 1).any()) or bool((valid > v).any()):
            raise ValueError(f"valid coordinate counts must lie in 1..{v}")
    gen = torch.Generator().manual_seed(int(seed))

    # training subsample: the heaviest vectors always, a seeded uniform sample of the rest
    if max_train is not None and N > max_train:
        tidx, wt = _subsample(w, max_train, gen)
    else:
        tidx, wt = None, w
    Xt = X if tidx is None else X[tidx]
    vt = None if valid is None else (valid if tidx is None else valid[tidx])
    T = Xt.shape[0]
    mask_t = _coord_mask(vt, T, v, dev)
    Xt_m = Xt if mask_t is None else Xt * mask_t

    if init is not None:
        if tuple(init.shape) != (k, v):
            raise ValueError(f"init centroids shape {tuple(init.shape)} != {(k, v)}")
        C = init.float().to(dev).clone()
    elif init_method == "random":
        pick = torch.randperm(T, generator=gen)[torch.arange(k) % T].to(dev)  # (k,) distinct while k <= T
        C = Xt_m[pick].clone()
    else:
        if T > init_sample:
            sidx, ws = _subsample(wt, init_sample, gen)
            C = _kmeanspp(Xt[sidx], ws, k, gen, None if vt is None else vt[sidx])
        else:
            C = _kmeanspp(Xt, wt, k, gen, vt)

    prev = None
    n_iter = 0
    for it in range(iters):
        labels, d = assign(Xt_m, C, vt, return_dist=True)
        obj = float((wt.double() * d.double()).sum())
        n_iter = it + 1
        Cn, wsum = _weighted_means(Xt_m, wt, labels, k, mask_t, C)
        empty = torch.nonzero(wsum <= 0).flatten()
        if empty.numel():
            # re-seed empty clusters at the worst-served vectors (largest weighted error)
            err = (wt.double() * d.double())
            order = torch.sort(err, descending=True, stable=True).indices
            take = order[: empty.numel()]
            Cn[empty[: take.numel()]] = Xt_m[take]
        C = Cn
        if prev is not None and abs(prev - obj) <= tol * max(abs(prev), 1e-30):
            break
        prev = obj
    if final_assign:
        labels, d = assign(X if valid is None else X * _coord_mask(valid, N, v, dev), C, valid, return_dist=True)
        inertia = float((w.double() * d.double()).sum())
    else:
        labels, d = assign(Xt_m, C, vt, return_dist=True)
        inertia = float((wt.double() * d.double()).sum())
    return KMeansResult(centroids=C, labels=labels, inertia=inertia, n_iter=n_iter)
