"""Layer-wise finetuning of a quantized decoder block (VPTQ, arXiv 2409.17066, §4 "layer-wise
finetuning", Table 9; never released upstream).

After every linear of a block is quantized (indices and codes fixed), the block's continuous
parameters are trained with Adam to minimise

    MSE( block_q(X), Y )      X = the block's calibration inputs (ctx.inputs),
                              Y = the float block's outputs on them (ctx.float_outputs)

Under `hessian.protocol=float` X is the float model's own activation at this block, so Y is the
float model's own next activation: the paper's target. Under `protocol=quantized` X comes from
the quantized blocks before, and Y is the float block's answer to it.

What is trained, for every weight type (vptq/trainable.py adapters): codebooks (main, residual,
outlier), norms and scales; with norms=True also the block's RMSNorm weights (the paper's recipe).
The forward pass sees exactly the stored (float16 / int8) values (straight-through rounding), and
at the end the trained tensors are rounded into the weights; the block-output MSE is measured again
with them, and if it is not lower than before finetuning the original tensors are restored
(finetuning never leaves a block worse on its calibration data).

Two call shapes:
  * `finetune=layer` (runners/finetune.py, every method): the paper's recipe, `steps` Adam steps
    (100) with the learning rate decaying from `lr` (1e-4) to `lr_min` (5e-6) on a cosine,
    `batch` windows per step, RMSNorm weights trained;
  * `VPTQ.finetune_block` (method.finetune=true outside the runner, users' scripts): `epochs`
    passes over the windows at a constant `lr` (the method's finetune_epochs/lr/batch), codebooks
    and norms only, as before.

Determinism: the window order of each epoch comes from a CPU generator seeded by `seed`; one
window per forward (the driver's block kwargs are captured for batch size 1) with gradients
accumulated over `batch` windows per Adam step; codebook lookups have a deterministic backward.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vptq.qlinear import QuantLinear
from vptq.trainable import Trainables


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


def cosine_lr(step: int, total: int, lr: float, lr_min: Optional[float]) -> float:
    """lr at `step` of `total`: constant when lr_min is None, else a cosine from lr to lr_min."""
    if lr_min is None or total <= 1:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * step / (total - 1)))


def window_batches(N: int, batch: int, steps: int, gen: torch.Generator):
    """`steps` lists of window indices: each epoch a fresh permutation from `gen`, cut into
    ceil(N / batch) batches (the last one shorter)."""
    per_epoch = math.ceil(N / batch)
    order = []
    for s in range(steps):
        if s % per_epoch == 0:
            order = torch.randperm(N, generator=gen).tolist()
        j = s % per_epoch
        yield order[j * batch:(j + 1) * batch]


def finetune_block(block: nn.Module, ctx, *, lr: float, batch: int, seed: int, steps: Optional[int] = None,
                   epochs: Optional[int] = None, lr_min: Optional[float] = None,
                   norms: bool = False) -> Dict[str, float]:
    """Train the continuous parameters of `block`'s quantized linears (and its RMSNorm weights when
    norms=True) on the block-output MSE (see the module docstring). Give `steps` (Adam steps) or
    `epochs` (passes of ceil(N / batch) steps).

    Returns {"ft_mse_before", "ft_mse_after", "ft_steps", "ft_kept", "ft_params"} for the block's log."""
    if ctx.float_outputs is None or ctx.inputs is None or ctx.inputs.shape[0] == 0:
        raise ValueError("layer-wise finetuning needs the block's calibration inputs and float outputs")
    if (steps is None) == (epochs is None):
        raise ValueError("give finetuning steps or epochs (one of them)")
    n = steps if steps is not None else epochs
    if n < 0 or lr <= 0 or batch < 1 or (lr_min is not None and not 0 <= lr_min <= lr):
        raise ValueError(f"finetuning steps/epochs={n}, lr={lr}, lr_min={lr_min}, batch={batch}; "
                         f"valid: steps >= 0, lr > 0, 0 <= lr_min <= lr, batch >= 1")
    if not any(isinstance(m, QuantLinear) for m in block.modules()):
        return {}
    X, Y, kw = ctx.inputs, ctx.float_outputs, ctx.block_kwargs
    N = X.shape[0]
    total = steps if steps is not None else epochs * math.ceil(N / batch)
    tr = Trainables(block, norms=norms)
    before = block_mse(block, X, Y, kw)
    old_tensors = {n_: {k: v for k, v in vars(t.q).items() if isinstance(v, torch.Tensor)}
                   for n_, t in tr.layers.items()}
    old_norms = {n_: m.weight.detach().clone() for n_, m in tr.norms.items()}
    opt = torch.optim.Adam(tr.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    was_training = block.training
    block.train(False)  # no dropout: the objective is deterministic
    try:
        with tr.active(), torch.enable_grad():
            for s, chunk in enumerate(window_batches(N, batch, total, gen)):
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(s, total, lr, lr_min)
                opt.zero_grad(set_to_none=True)
                for i in chunk:
                    y = _out(block(X[i:i + 1], **kw))
                    loss = F.mse_loss(y.float(), Y[i:i + 1].float()) / len(chunk)
                    loss.backward()
                opt.step()
    finally:
        block.train(was_training)
    tr.store()
    after = block_mse(block, X, Y, kw)
    kept = after < before
    if not kept:  # never leave a block worse than before
        for n_, t in tr.layers.items():
            for k, v in old_tensors[n_].items():
                setattr(t.q, k, v)
        with torch.no_grad():
            for n_, m in tr.norms.items():
                m.weight.copy_(old_norms[n_])
        after = before
    return {"ft_mse_before": before, "ft_mse_after": after, "ft_steps": float(total), "ft_kept": float(kept),
            "ft_params": float(tr.numel())}
