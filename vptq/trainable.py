"""Trainable views of quantized weights, for finetuning (VPTQ, arXiv 2409.17066, §4: layer-wise
finetuning in vptq/finetune.py, end-to-end finetuning in runners/finetune.py).

One interface for every stored weight type, kept out of the weight classes' own files: an adapter
per type (REGISTRY: "module:Class" of the weight -> adapter class, resolved lazily) that holds

    params     {name: float32 leaf tensor}: the weight's continuous tensors, exactly as stored
    weight()   the dense (out, in) float32 weight, differentiable in `params`; before any update it
               equals `q.dequantize()` bitwise (tests/test_finetune.py checks every type)
    store()    the trained values rounded back into the weight in its stored dtypes

Every index, code, integer zero point and permutation stays frozen. What is trained:

    VQWeight      centroids, res_centroids, outlier_centroids (G, k, v); weight_scale, weight_bias (in,)
                  (all float16 when stored)
    GPTVQWeight   codebooks (n_cb, k, d) [or the SVD factors A (n_cb, r) and V (r, k)]: float16 ones
                  directly; int8 ones as float32 values on their int8 grid (below), with their float16
                  scale (n_cb,) trained too; the normalisation's (min, step) (nb, 2), float32 as stored
    AQLMWeight    codebooks (M, 2^B, g), scales (out,) (float16)
    ScalarWeight  scale (out, groups) (float16, stored by baselines.scalar.stored_scale);
                  the integer codes and zero points stay (RTN, GPTQ)

Rounding is straight-through: the forward pass sees exactly what `store()` would write (a
float16 tensor p is used as p + (fp16(p) - p).detach(); an int8 codebook c with scale s as
clamp(round(c / fp16(s)), -128, 127) · fp16(s) with round's gradient taken as 1, LSQ-style), and
the gradients reach the float32 values. So a loss measured during training is the loss of the
stored weights, and small updates below float16 resolution still accumulate in float32.
int8 codebooks: the values train on their own grid, and so does the scale that defines the grid;
`store()` writes the int8 codes of the trained values and the trained scale (no re-derivation:
max|c|/127 of the trained values could move every code at once).

Determinism: every codebook lookup is a gather whose backward sums the gradients per codebook
row with `vptq.numerics.Segments` (index order on the CPU, a stable sort + float64 cumulative sum
elsewhere), never atomics; broadcast scales are expanded views (their backward is a sum).

Memory: an adapter keeps only its float32 parameters. What it derives from the frozen codes (flat
int64 indices, unpacked codes, centred integer codes) is computed inside `weight()` and is
transient: under per-block activation checkpointing it exists for one layer at a time (int64
indices would be 8 bytes per vector, 1.3 bytes per weight at v = 6: 9 GB for a 7B model if kept).

`Trainables` gathers the adapters of every QuantLinear under a module (a block or the whole
model) and, optionally, the RMSNorm weights (float32 masters, cast to the model's dtype in the
forward pass); `with trainables.active():` routes the forward passes through them.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F
from torch import nn

from vptq.numerics import Segments

# weight class ("module:Class") -> adapter class (in this module)
REGISTRY: Dict[str, str] = {
    "vptq.vqweight:VQWeight": "VQTrainable",
    "baselines.gptvq:GPTVQWeight": "GPTVQTrainable",
    "baselines.aqlm:AQLMWeight": "AQLMTrainable",
    "baselines.scalar:ScalarWeight": "ScalarTrainable",
}


# ----------------------------------------------------------------------------- differentiable pieces
class _Gather(torch.autograd.Function):
    """table (K, v)[index] -> (M, v); the backward sums each row's gradients with `Segments`
    (deterministic on every device; F.embedding's and index_add_'s CUDA backwards use atomics).
    The index is saved as a tensor, so under activation checkpointing it is recomputed, not kept."""

    @staticmethod
    def forward(ctx, table, index: torch.Tensor):
        ctx.save_for_backward(index)
        ctx.K = table.shape[0]
        return table[index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return Segments(index, ctx.K).sum(grad, grad.dtype), None


def gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (K, v), index (...) of row numbers -> (index.numel(), v), deterministic backward."""
    return _Gather.apply(table, index.reshape(-1).long())


def fp16_ste(p: torch.Tensor) -> torch.Tensor:
    """p as float16 would store it (float32 values), gradient straight through."""
    return p + (p.detach().half().float() - p.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x.detach()) - x.detach())


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().clone().requires_grad_(True)


def _half(name: str, p: torch.Tensor) -> torch.Tensor:
    h = p.detach().half()
    if not torch.isfinite(h).all():
        raise FloatingPointError(f"finetuned {name} overflows float16")
    return h


# ----------------------------------------------------------------------------- the adapters
class Trainable:
    """One quantized weight's trainable view (see the module docstring)."""

    def __init__(self, q):
        self.q = q
        self.params: Dict[str, torch.Tensor] = {}

    def weight(self) -> torch.Tensor:  # (out, in) float32, differentiable in self.params
        raise NotImplementedError

    @torch.no_grad()
    def store(self) -> None:
        raise NotImplementedError

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


class VQTrainable(Trainable):
    """VQWeight (vptq/vqweight.py): codebooks and norms; indices, permutation frozen."""

    TENSORS = ("centroids", "res_centroids", "outlier_centroids", "weight_scale", "weight_bias")
    LOOKUPS = (("centroids", "indices"), ("res_centroids", "res_indices"), ("outlier_centroids", "outlier_indices"))

    def __init__(self, q):
        super().__init__(q)
        for name in self.TENSORS:
            t = getattr(q, name)
            if t is not None:
                self.params[name] = _leaf(t)
        self._index = {c: i for c, i in self.LOOKUPS if c in self.params and getattr(q, i) is not None}
        self._inv = torch.argsort(q.perm) if q.perm is not None else None

    def _columns(self, cname: str) -> torch.Tensor:
        C = fp16_ste(self.params[cname])  # (G, k, v)
        idx = getattr(self.q, self._index[cname])  # (G, n, gs) in [0, k)
        G, n, gs = idx.shape
        k, v = C.shape[1:]
        flat = idx.long() + (torch.arange(G, device=idx.device) * k)[:, None, None]  # into the (G*k, v) table
        vec = gather(C.reshape(-1, v), flat).reshape(G, n, gs, v)
        W = vec.permute(0, 1, 3, 2).reshape(G, n * v, gs).permute(1, 0, 2).reshape(n * v, G * gs)
        return W[: self.q.out_features]  # (out, G*gs)

    def weight(self) -> torch.Tensor:
        W = self._columns("centroids")
        if "res_centroids" in self._index:
            W = W + self._columns("res_centroids")
        if "outlier_centroids" in self._index:
            W = torch.cat([self._columns("outlier_centroids"), W], dim=1)
        if self._inv is not None:
            W = W[:, self._inv]
        if "weight_scale" in self.params:
            W = W * fp16_ste(self.params["weight_scale"])[None, :] + fp16_ste(self.params["weight_bias"])[None, :]
        return W  # (out, in)

    @torch.no_grad()
    def store(self) -> None:
        for name, p in self.params.items():
            setattr(self.q, name, _half(name, p))


class GPTVQTrainable(Trainable):
    """GPTVQWeight (baselines/gptvq.py): codebooks (int8 on their grid, or float16), their scales,
    the SVD factors, the normalisation's (min, step); indices and normalisation codes frozen."""

    def __init__(self, q):
        super().__init__(q)
        self.int8 = q.scales is not None
        if self.int8:
            s = q.scales.float().reshape(-1, *([1] * (q.codebooks.dim() - 1)))
            self.params["codebooks"] = (q.codebooks.float() * s).detach().clone().requires_grad_(True)
            self.params["scales"] = _leaf(q.scales)
        else:
            self.params["codebooks"] = _leaf(q.codebooks)
        if q.svd_basis is not None:
            self.params["svd_basis"] = _leaf(q.svd_basis)
        if q.norm_codes is not None:
            self.params["norm_params"] = _leaf(q.norm_params)

    def _codebook_values(self) -> torch.Tensor:
        """(n_cb, k, d) float32 as `GPTVQWeight.codebook_values` computes them from the stored tensors."""
        C = self.params["codebooks"]
        if self.int8:
            s = fp16_ste(self.params["scales"]).reshape(-1, *([1] * (C.dim() - 1)))
            C = torch.clamp(round_ste(C / s), -128, 127) * s
        else:
            C = fp16_ste(C)
        if "svd_basis" in self.params:
            C = (C.reshape(C.shape[0], -1) @ fp16_ste(self.params["svd_basis"]))[..., None]
        return C

    def weight(self) -> torch.Tensor:
        q = self.q
        C = self._codebook_values().reshape(-1, q.vq_dim)  # (n_cb·k, d)
        flat = q.codebook_ids() * q.num_centroids + q.indices()  # (out, in/d) rows of C
        W = gather(C, flat).reshape(q.out_features, q.in_features)
        if "norm_params" in self.params:
            from vptq.numerics import unpack_bits

            P = self.params["norm_params"]
            nb = q.in_features // q.norm_blocksize
            codes = unpack_bits(q.norm_codes, q.norm_bits, q.out_features * nb).reshape(q.out_features, nb).float()
            S = torch.pow(10.0, P[:, 1][None, :] * codes + P[:, 0][None, :])  # (out, nb)
            b = q.norm_blocksize
            W = W * S[:, :, None].expand(*S.shape, b).reshape(q.out_features, -1)
        return W

    @torch.no_grad()
    def store(self) -> None:
        q, C = self.q, self.params["codebooks"]
        if self.int8:
            s16 = _half("codebook scales", self.params["scales"])
            s = s16.float().reshape(-1, *([1] * (C.dim() - 1)))
            q.codebooks = torch.clamp(torch.round(C / s), -128, 127).to(torch.int8)
            q.scales = s16
        else:
            q.codebooks = _half("codebooks", C)
        if "svd_basis" in self.params:
            q.svd_basis = _half("svd_basis", self.params["svd_basis"])
        if "norm_params" in self.params:
            q.norm_params = self.params["norm_params"].detach().to(q.norm_params.dtype).clone()


class AQLMTrainable(Trainable):
    """AQLMWeight (baselines/aqlm.py): codebooks (M, 2^B, g) and per-row scales; codes frozen."""

    def __init__(self, q):
        super().__init__(q)
        self.params["codebooks"] = _leaf(q.codebooks)
        self.params["scales"] = _leaf(q.scales)

    def weight(self) -> torch.Tensor:
        q = self.q
        C = fp16_ste(self.params["codebooks"])  # (M, K, g)
        codes = q.codes()  # (out, n, M)
        U = gather(C[0], codes[..., 0])
        for m in range(1, C.shape[0]):  # summed in codebook order, as `baselines.aqlm.decode`
            U = U + gather(C[m], codes[..., m])
        U = U.reshape(*codes.shape[:2], C.shape[-1])  # (out, n, g)
        W = fp16_ste(self.params["scales"])[:, None, None] * U
        return W.reshape(q.out_features, q.in_features)

    @torch.no_grad()
    def store(self) -> None:
        self.q.codebooks = _half("codebooks", self.params["codebooks"])
        self.q.scales = _half("scales", self.params["scales"])


class ScalarTrainable(Trainable):
    """ScalarWeight (baselines/scalar.py, RTN and GPTQ): the float16 scales; codes and integer zero
    points frozen."""

    def __init__(self, q):
        super().__init__(q)
        self.params["scale"] = _leaf(q.scale)

    @staticmethod
    def _stored(p: torch.Tensor) -> torch.Tensor:
        from baselines.scalar import stored_scale

        return stored_scale(p.detach()).float()

    def weight(self) -> torch.Tensor:
        q, p = self.q, self.params["scale"]
        s = p + (self._stored(p) - p.detach())  # (out, groups), straight through the float16 rounding
        out, ng = s.shape
        s = s[:, :, None].expand(out, ng, q.group_size).reshape(out, ng * q.group_size)[:, :q.in_features]
        col_group = torch.arange(q.in_features, device=q.codes.device) // q.group_size
        return s * (q.codes.float() - q.zero.float()[:, col_group])  # (out, in)

    @torch.no_grad()
    def store(self) -> None:
        from baselines.scalar import stored_scale

        s = self.params["scale"].detach()
        if not torch.isfinite(s.half()).all():
            raise FloatingPointError("finetuned scale overflows float16")
        self.q.scale = stored_scale(s)


def trainable(q) -> Trainable:
    """The adapter of a quantized weight (REGISTRY); one line naming the type when there is none."""
    key = f"{type(q).__module__}:{type(q).__qualname__}"
    if key not in REGISTRY:
        raise TypeError(f"no finetuning adapter for {key}; adapters exist for: {', '.join(sorted(REGISTRY))}")
    return getattr(importlib.import_module(__name__), REGISTRY[key])(q)


# ----------------------------------------------------------------------------- a module's trainables
def rms_norms(root: nn.Module) -> Dict[str, nn.Module]:
    """The RMSNorm modules under root (input/post-attention norms, the final norm, q/k norms), by name."""
    return {n: m for n, m in root.named_modules()
            if "RMSNorm" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter)}


class _Cast(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


class Trainables:
    """Every quantized linear's adapter under `root` (and its RMSNorm weights when norms=True).

    norm weights: float32 masters (`self.norm_params`), used in the forward pass cast to the
    module's dtype (a parametrization while active); `store()` writes that cast."""

    def __init__(self, root: nn.Module, *, norms: bool = True):
        from vptq.qlinear import QuantLinear

        self.root = root
        self.linears = {n: m for n, m in root.named_modules() if isinstance(m, QuantLinear)}
        self.layers: Dict[str, Trainable] = {n: trainable(m.qweight) for n, m in self.linears.items()}
        self.norms = rms_norms(root) if norms else {}
        self.norm_params: Dict[str, nn.Parameter] = {
            n: nn.Parameter(m.weight.detach().float().clone()) for n, m in self.norms.items()}

    def named_parameters(self) -> Dict[str, torch.Tensor]:
        out = {f"{n}.{k}": p for n, t in self.layers.items() for k, p in t.params.items()}
        out.update({f"{n}.weight": p for n, p in self.norm_params.items()})
        return out

    def parameters(self) -> List[torch.Tensor]:
        return list(self.named_parameters().values())

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def snapshot(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters().items()}

    @torch.no_grad()
    def restore(self, snap: Dict[str, torch.Tensor]) -> None:
        for n, p in self.named_parameters().items():
            p.copy_(snap[n])

    @torch.no_grad()
    def store(self) -> None:
        """Round every trained tensor into its weight / norm module (the stored dtypes)."""
        for t in self.layers.values():
            t.store()
        for n, m in self.norms.items():
            w = self.norm_params[n].detach().to(m.weight.dtype)
            if not torch.isfinite(w).all():
                raise FloatingPointError(f"finetuned {n}.weight overflows {m.weight.dtype}")
            m.weight.copy_(w)

    @contextlib.contextmanager
    def active(self) -> Iterator["Trainables"]:
        """Forward passes of `root` through the trainable tensors: each QuantLinear computes its weight
        with its adapter (no kernel, no dense cache), each RMSNorm reads its float32 master cast to
        its dtype; every other parameter of root is frozen (requires_grad False) meanwhile."""
        from torch.nn.utils import parametrize

        frozen = [(p, p.requires_grad) for p in self.root.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        for n, m in self.linears.items():
            m.forward = types.MethodType(_trainable_forward(self.layers[n]), m)
        originals = {}
        try:
            for n, m in self.norms.items():
                originals[n] = m.weight
                m.weight = self.norm_params[n]
                parametrize.register_parametrization(m, "weight", _Cast(originals[n].dtype), unsafe=True)
            yield self
        finally:
            for n, orig in originals.items():
                m = self.norms[n]
                if parametrize.is_parametrized(m, "weight"):
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
                m.weight = orig
            for m in self.linears.values():
                m.__dict__.pop("forward", None)  # back to QuantLinear.forward
            for p, rg in frozen:
                p.requires_grad_(rg)


def _trainable_forward(t: Trainable):
    def forward(self, x):
        W = t.weight().to(x.dtype)
        return F.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))
    return forward

