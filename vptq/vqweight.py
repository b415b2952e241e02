"""`VQWeight`: a VPTQ-quantized linear weight, in the layout of the official VPTQ format
(microsoft/VPTQ `VQuantLinear`, vector_quant_dim="out"), indices kept unpacked here.

Vectors run along the OUTPUT dimension within one input column: for column c of group g,
rows [r*v, (r+1)*v) hold centroid `centroids[g, indices[g, r, c]]` (+ the residual centroid).

Stored tensors (G = group_num, v = vector_len, k = num_centroids, n = ceil(out/v)):
    centroids        (G, k, v)           float16
    indices          (G, n, group_size)  in [0, k), uint8/int16/uint16/int32 in memory (`index_dtype`);
                                         stored packed, log2(k) bits each
    res_centroids    (G, k_r, v)         float16   | None        residual VQ (second stage)
    res_indices      (G, n, group_size)  in [0, k_r) (`index_dtype`)  packed with `indices`
    outlier_centroids(1, k_o, v_o)       float16   | None        outlier columns' codebook
    outlier_indices  (1, n_o, outlier_size) in [0, k_o), n_o = ceil(out/v_o); stored int16 (unpacked)
    perm             (in,)               int64     | None        stored column j = column perm[j]
                                         (None also where an act order was absorbed: with one
                                         group and no outliers the quantizer stores each column's
                                         indices at the column's own position)
    weight_scale     (in,)               float16   | None        per-input-column norm
    weight_bias      (in,)               float16   | None
Column layout before un-permuting: [outlier_size outlier columns | G groups of group_size],
so outlier_size + G * group_size == in_features. Rows beyond out_features are padding.

Dequantization (the torch reference for every kernel):
    Wp = [outlier part | main part (+ residual)]      (out, in), permuted column order
    W  = Wp[:, argsort(perm)]                          if perm
    W  = W * weight_scale + weight_bias                if norm (broadcast over rows)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from vptq.qweight import QuantizedWeight, Storage


def index_dtype(k: int) -> torch.dtype:
    """The in-memory integer type of indices into a k-entry codebook: 1 byte up to 256 entries, 2 up to
    65536 (torch.uint16 above 32768: torch has no arithmetic, min or max for it, but every consumer
    widens indices first, and copies and views work on CPU and CUDA), else 4."""
    if k <= 256:
        return torch.uint8
    if k <= 32768:
        return torch.int16
    return torch.uint16 if k <= 65536 else torch.int32


def _gather_columns(centroids: torch.Tensor, indices: torch.Tensor, rows: int) -> torch.Tensor:
    """centroids (G, k, v), indices (G, n, gs) -> (rows, G*gs) in float32."""
    indices = indices.long()  # uint8 would index as a mask; int16 does not index at all
    G, n, gs = indices.shape
    v = centroids.shape[-1]
    g = torch.arange(G, device=indices.device)[:, None, None]
    vec = centroids.float()[g, indices]  # (G, n, gs, v)
    W = vec.permute(0, 1, 3, 2).reshape(G, n * v, gs)  # (G, n*v, gs)
    W = W.permute(1, 0, 2).reshape(n * v, G * gs)  # (n*v, G*gs)
    return W[:rows]


@dataclass(eq=False)
class VQWeight(QuantizedWeight):
    out_features: int
    in_features: int
    vector_len: int
    num_centroids: int
    group_num: int
    group_size: int
    centroids: torch.Tensor
    indices: torch.Tensor
    num_res_centroids: int = 0
    res_centroids: Optional[torch.Tensor] = None
    res_indices: Optional[torch.Tensor] = None
    outlier_size: int = 0
    outlier_vector_len: int = 0
    outlier_num_centroids: int = 0
    outlier_centroids: Optional[torch.Tensor] = None
    outlier_indices: Optional[torch.Tensor] = None
    perm: Optional[torch.Tensor] = None
    weight_scale: Optional[torch.Tensor] = None
    weight_bias: Optional[torch.Tensor] = None

    def __post_init__(self):
        # indices are held in memory in the narrowest integer type their codebook size allows
        # (`index_dtype`: uint8 for k <= 256, int16 for k <= 32768, uint16 for k <= 65536, else int32):
        # int64 was 8 bytes per v weights, 4x a 2-bit model's own size; every consumer widens them itself
        for name, k in (("indices", self.num_centroids), ("res_indices", self.num_res_centroids),
                        ("outlier_indices", self.outlier_num_centroids)):
            t = getattr(self, name)
            if t is None:
                continue
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
            dt = index_dtype(k)
            if t.dtype != dt:
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= max(k, 1)):
                    raise ValueError(f"{name} values outside [0, {k}): min {int(t.min())}, max {int(t.max())}")
                setattr(self, name, t.to(dt))
        self.validate()

    # ------------------------------------------------------------------ shape checks
    @property
    def num_indices(self) -> int:
        return math.ceil(self.out_features / self.vector_len)

    @property
    def padding(self) -> int:
        return self.num_indices * self.vector_len - self.out_features

    def validate(self) -> None:
        G, k, v = self.group_num, self.num_centroids, self.vector_len
        if self.outlier_size + G * self.group_size != self.in_features:
            raise ValueError(f"outlier_size {self.outlier_size} + group_num {G} x group_size {self.group_size} "
                             f"!= in_features {self.in_features}")
        if tuple(self.centroids.shape) != (G, k, v):
            raise ValueError(f"centroids shape {tuple(self.centroids.shape)} != {(G, k, v)}")
        if tuple(self.indices.shape) != (G, self.num_indices, self.group_size):
            raise ValueError(f"indices shape {tuple(self.indices.shape)} != {(G, self.num_indices, self.group_size)}")
        if self.num_res_centroids:
            if self.res_centroids is None or self.res_indices is None:
                raise ValueError("num_res_centroids > 0 needs res_centroids and res_indices")
            if tuple(self.res_centroids.shape) != (G, self.num_res_centroids, v):
                raise ValueError(f"res_centroids shape {tuple(self.res_centroids.shape)}")
            if self.res_indices.shape != self.indices.shape:
                raise ValueError("res_indices must have the shape of indices")
        if self.outlier_size:
            no = math.ceil(self.out_features / self.outlier_vector_len)
            if tuple(self.outlier_centroids.shape) != (1, self.outlier_num_centroids, self.outlier_vector_len):
                raise ValueError(f"outlier_centroids shape {tuple(self.outlier_centroids.shape)}")
            if tuple(self.outlier_indices.shape) != (1, no, self.outlier_size):
                raise ValueError(f"outlier_indices shape {tuple(self.outlier_indices.shape)} != {(1, no, self.outlier_size)}")
        if (self.weight_scale is None) != (self.weight_bias is None):
            raise ValueError("weight_scale and weight_bias come together")

    # ------------------------------------------------------------------ the reference
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        W = _gather_columns(self.centroids, self.indices, self.out_features)  # (out, G*gs)
        if self.num_res_centroids:
            W = W + _gather_columns(self.res_centroids, self.res_indices, self.out_features)
        if self.outlier_size:
            Wo = _gather_columns(self.outlier_centroids, self.outlier_indices, self.out_features)
            W = torch.cat([Wo, W], dim=1)
        if self.perm is not None:
            W = W[:, torch.argsort(self.perm)]
        if self.weight_scale is not None:
            W = W * self.weight_scale.float()[None, :] + self.weight_bias.float()[None, :]
        return W.to(dtype)

    # ------------------------------------------------------------------ storage, as stored
    @property
    def index_bits(self) -> int:
        return int(math.ceil(math.log2(self.num_centroids)))

    @property
    def res_index_bits(self) -> int:
        return int(math.ceil(math.log2(self.num_res_centroids))) if self.num_res_centroids else 0

    def storage(self) -> Storage:
        """Bits as stored in the packed format: each (group, vector row) packs group_size
        indices of (log2 k + log2 k_r) bits into int32 words; codebooks, norms float16;
        outlier indices and the permutation int16."""
        tb = self.index_bits + self.res_index_bits
        words = math.ceil(self.group_size * tb / 32)
        bits: Dict[str, int] = {
            "indices": self.group_num * self.num_indices * words * 32,
            "codebooks": self.centroids.numel() * 16,
        }
        if self.num_res_centroids:
            bits["res_codebooks"] = self.res_centroids.numel() * 16
        if self.outlier_size:
            bits["outlier_indices"] = self.outlier_indices.numel() * 16
            bits["outlier_codebooks"] = self.outlier_centroids.numel() * 16
        if self.perm is not None:
            bits["perm"] = self.perm.numel() * 16
        if self.weight_scale is not None:
            bits["norms"] = (self.weight_scale.numel() + self.weight_bias.numel()) * 16
        return Storage(self.out_features * self.in_features, bits)

    def to(self, device):
        for name in ("centroids", "indices", "res_centroids", "res_indices", "outlier_centroids",
                     "outlier_indices", "perm", "weight_scale", "weight_bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def short(self) -> str:
        """The stored configuration in `vptq.budget.LayerConfig.short()`'s notation, e.g. "v8k65536r256"
        ("p": a permutation is stored; an absorbed act order stores none)."""
        s = f"v{self.vector_len}k{self.num_centroids}"
        if self.num_res_centroids:
            s += f"r{self.num_res_centroids}"
        if self.group_num > 1:
            s += f"g{self.group_num}"
        if self.outlier_size:
            s += f"o{self.outlier_size}v{self.outlier_vector_len}k{self.outlier_num_centroids}"
        if self.weight_scale is not None:
            s += "n"
        if self.perm is not None:
            s += "p"
        return s

    def settings(self) -> Dict[str, object]:
        s = {"v": self.vector_len, "k": self.num_centroids, "groups": self.group_num}
        if self.num_res_centroids:
            s["k_res"] = self.num_res_centroids
        if self.outlier_size:
            s.update(outliers=self.outlier_size, v_out=self.outlier_vector_len, k_out=self.outlier_num_centroids)
        if self.weight_scale is not None:
            s["norm"] = True
        if self.perm is not None:
            s["perm"] = True
        return s
