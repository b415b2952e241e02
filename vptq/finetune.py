"""Layer-wise finetuning of a quantized decoder block (VPTQ, arXiv 2409.17066, §4 "layer-wise
finetuning"; never released upstream, where only end-to-end finetuning was mentioned).

After every linear of a block is quantized (indices fixed), the block's codebooks — main,
residual and outlier centroids — and its per-column norms (weight_scale, weight_bias) are
trained with Adam to minimise

    MSE( block_q(X), block_float(X) )      X = the block's calibration inputs (ctx.inputs)

where block_float(X) is `ctx.float_outputs`. The indices stay frozen; everything else in the
block (norm layers, biases) is left alone. `VQWeight.dequantize` stays the reference: the
differentiable dequantization here (`DiffDequant`) recomputes exactly the same weight from
float32 copies of the trainable tensors. Its codebook lookup has a deterministic backward on
every device (`_SortedGather`: gradients summed per centroid through a precomputed sort of
the frozen indices and a float64 cumulative sum; F.embedding's and index_add_'s CUDA
backward use atomics and are not reproducible, measured on an H200). At the end the trained tensors are rounded to float16
and written back into the `VQWeight`s, the block-output MSE is measured again with those
stored values, and if it is not lower than before finetuning the original tensors are
restored (finetuning never makes a block worse on its calibration data).

Determinism: the window order of each epoch comes from a CPU generator seeded by `seed`;
one window per forward (the driver's block kwargs are captured for batch size 1) with
gradients accumulated over `batch` windows per Adam step.
"""
from __future__ import annotations

import types
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from vptq.qlinear import QuantLinear
from vptq.vqweight import VQWeight

TRAINABLE = ("centroids", "res_centroids", "outlier_centroids", "weight_scale", "weight_bias")


class _SortedIndex:
    """A frozen flat index (M,) into a table of K rows, sorted once for the backward pass."""

    def __init__(self, flat: torch.Tensor, K: int):
        self.flat = flat
        self.order = torch.sort(flat, stable=True).indices  # (M,)
        srt = flat[self.order]
        ar = torch.arange(K, device=flat.device)
        self.starts = torch.searchsorted(srt, ar, right=False)  # (K,)
        self.ends = torch.searchsorted(srt, ar, right=True)


class _SortedGather(torch.autograd.Function):
    """table (K, v)[index] -> (M, v); backward sums the gradients of each row deterministically."""

    @staticmethod
    def forward(ctx, table, sidx: _SortedIndex):
        ctx.sidx = sidx
        ctx.K = table.shape[0]
        return table[sidx.flat]

    @staticmethod
    def backward(ctx, grad):
        s = ctx.sidx
        cs = grad[s.order].double().cumsum(0)  # (M, v)
        cs = torch.cat([torch.zeros(1, grad.shape[1], dtype=cs.dtype, device=cs.device), cs])
        return (cs[s.ends] - cs[s.starts]).to(grad.dtype), None


class DiffDequant(nn.Module):
    """Differentiable twin of `VQWeight.dequantize` for one weight: trainable float32 copies
    of the codebooks (and norms), frozen indices."""

    def __init__(self, q: VQWeight):
        super().__init__()
        self.q = q
        self.params = nn.ParameterDict()
        for name in TRAINABLE:
            t = getattr(q, name)
            if t is not None:
                self.params[name] = nn.Parameter(t.detach().float().clone())
        self._flat = {}
        for name, cname in (("indices", "centroids"), ("res_indices", "res_centroids"),
                            ("outlier_indices", "outlier_centroids")):
            idx = getattr(q, name)
            if idx is not None and cname in self.params:
                G, k = self.params[cname].shape[:2]
                off = (torch.arange(G, device=idx.device) * k)[:, None, None]
                # (G, n, gs) indices into the flattened (G*k, v) codebook
                self._flat[cname] = (tuple(idx.shape), _SortedIndex((idx + off).reshape(-1), G * k))
        self._inv = torch.argsort(q.perm) if q.perm is not None else None

    def _columns(self, cname: str) -> torch.Tensor:
        C = self.params[cname]  # (G, k, v)
        (G, n, gs), sidx = self._flat[cname]
        v = C.shape[-1]
        vec = _SortedGather.apply(C.reshape(-1, v), sidx).reshape(G, n, gs, v)
        W = vec.permute(0, 1, 3, 2).reshape(G, n * v, gs).permute(1, 0, 2).reshape(n * v, G * gs)
        return W[: self.q.out_features]  # (out, G*gs)

    def forward(self) -> torch.Tensor:
        W = self._columns("centroids")
        if "res_centroids" in self._flat:
            W = W + self._columns("res_centroids")
        if "outlier_centroids" in self._flat:
            W = torch.cat([self._columns("outlier_centroids"), W], dim=1)
        if self._inv is not None:
            W = W[:, self._inv]
        if "weight_scale" in self.params:
            W = W * self.params["weight_scale"][None, :] + self.params["weight_bias"][None, :]
        return W  # (out, in) float32

    @torch.no_grad()
    def write_back(self) -> Dict[str, torch.Tensor]:
        """Round the trained tensors to float16 into the VQWeight; return the old ones."""
        old = {}
        for name, p in self.params.items():
            old[name] = getattr(self.q, name)
            h = p.detach().half()
            if not torch.isfinite(h).all():
                raise FloatingPointError(f"finetuned {name} overflows float16")
            setattr(self.q, name, h)
        return old


def _vq_linears(block: nn.Module) -> Dict[str, QuantLinear]:
    return {n: m for n, m in block.named_modules()
            if isinstance(m, QuantLinear) and isinstance(m.qweight, VQWeight)}


def _patched_forward(dd: DiffDequant):
    def forward(self, x):
        W = dd().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, W, b)
    return forward


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@torch.no_grad()
def block_mse(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs) -> float:
    """Mean squared error of block(inputs) against targets, one window at a time."""
    tot = 0.0
    for i in range(inputs.shape[0]):
        y = _out(block(inputs[i:i + 1], **kwargs))
        tot += float(((y.float() - targets[i:i + 1].float()) ** 2).mean())
    return tot / inputs.shape[0]


def finetune_block(block: nn.Module, ctx, *, epochs: int, lr: float, batch: int, seed: int) -> Dict[str, float]:
    """Train the codebooks/norms of the VQ linears of `block` (see the module docstring).

    Returns {"ft_mse_before", "ft_mse_after", "ft_steps", "ft_kept"} for the block's log."""
    if ctx.float_outputs is None or ctx.inputs is None or ctx.inputs.shape[0] == 0:
        raise ValueError("layer-wise finetuning needs the block's calibration inputs and float outputs")
    if epochs < 0 or lr <= 0 or batch < 1:
        raise ValueError(f"finetune_epochs={epochs}, finetune_lr={lr}, finetune_batch={batch}; "
                         f"valid: epochs >= 0, lr > 0, batch >= 1")
    lins = _vq_linears(block)
    if not lins:
        return {}
    X, Y, kw = ctx.inputs, ctx.float_outputs, ctx.block_kwargs
    before = block_mse(block, X, Y, kw)
    dds = {n: DiffDequant(m.qweight) for n, m in lins.items()}
    params: List[nn.Parameter] = [p for dd in dds.values() for p in dd.params.values()]
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for n, m in lins.items():
        m.forward = types.MethodType(_patched_forward(dds[n]), m)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    N = X.shape[0]
    steps = 0
    was_training = block.training
    block.train(False)  # no dropout: the objective is deterministic
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(N, generator=gen).tolist()
                for s in range(0, N, batch):
                    chunk = order[s:s + batch]
                    opt.zero_grad(set_to_none=True)
                    for i in chunk:
                        y = _out(block(X[i:i + 1], **kw))
                        loss = F.mse_loss(y.float(), Y[i:i + 1].float()) / len(chunk)
                        loss.backward()
                    opt.step()
                    steps += 1
    finally:
        for m in lins.values():
            del m.forward  # back to QuantLinear.forward
        for p, rg in frozen:
            p.requires_grad_(rg)
        block.train(was_training)
    olds = {n: dd.write_back() for n, dd in dds.items()}
    after = block_mse(block, X, Y, kw)
    kept = after < before
    if not kept:  # never leave a block worse than before
        for n, old in olds.items():
            for name, t in old.items():
                setattr(lins[n].qweight, name, t)
        after = before
    return {"ft_mse_before": before, "ft_mse_after": after, "ft_steps": float(steps), "ft_kept": float(kept)}
