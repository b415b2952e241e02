"""The one second-order error-feedback loop (GPTQ, arXiv 2210.17323, Alg. 1; VPTQ §3.2, eq. 5-7).

Columns of W are quantized left to right (optionally in an act-order permutation). After a
column is quantized its error, divided by the matching diagonal entry of the upper Cholesky
factor of H⁻¹, is propagated to the columns still to be quantized; updates outside the current
block of `block_size` columns are applied lazily, once per block (GPTQ's trick).

The loop knows nothing about grids: the caller hands it `quantize_cols(col, Wc) -> Qc`, which
quantizes `step` consecutive columns jointly (step=1: scalar GPTQ and VPTQ, whose vectors run
along the output dimension within one column; step=d: GPTVQ's d-dimensional vectors across
d columns) and returns their dequantized values. `col` is the index of the first column in the
(permuted) order, so the caller can pick a codebook per column group or for outlier columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vptq.hessian import damp_

QuantizeCols = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class SolverResult:
    Q: torch.Tensor  # (out, in) dequantized weight, ORIGINAL column order
    loss: float  # Σ_c ||err_c||² = tr((W-Q) H_damped (W-Q)ᵀ) in exact arithmetic
    perm: Optional[torch.Tensor]  # (in,) the column order used, or None


def inverse_cholesky(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)⁻¹; raises damping tenfold on failure."""
    damp = percdamp
    for _ in range(max_tries):
        Hd = damp_(H.clone(), damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = max(damp * 10, 1e-6)
    raise ValueError(f"Hessian is not positive definite even with damping {damp:g}")


def prepare_hessian(W: torch.Tensor, H: torch.Tensor):
    """Handle dead columns: diag(H)=0 gets H_ii=1 and W[:, i]=0 (the column never matters).

    Returns float32 copies (W, H) and the bool mask of dead columns."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf")
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or Inf")
    dead = torch.diagonal(H) == 0
    if bool(dead.all()):
        raise ValueError("Hessian is all zero: the calibration data never reached this layer")
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


@torch.no_grad()
def error_feedback(
    W: torch.Tensor,
    H: torch.Tensor,
    quantize_cols: QuantizeCols,
    *,
    block_size: int = 128,
    step: int = 1,
    percdamp: float = 0.01,
    perm: Optional[torch.Tensor] = None,
    within_step: str = "sequential",
    expose: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
) -> SolverResult:
    """Quantize W (out, in) column by column with second-order error feedback.

    H: (in, in) = E[x xᵀ], already cleaned of dead columns (see `prepare_hessian`).
    perm: optional (in,) column order (e.g. act-order: descending diag(H)).
    within_step: how the `step` columns quantized jointly pass their errors on.
        "sequential": column c's error updates columns c+1.. (the later columns of the same
            step included) before their errors are taken: the exact joint OBS update.
        "diagonal": every column of the step takes its error from the values the step started
            with, and the errors reach only the columns after the step (GPTVQ's released code,
            Qualcomm-AI-research/gptvq `gptq.py`). Identical for step=1.
    expose: called once, before the loop, with the solver's working weight (out, in) (solver
        column order) and U: its columns from the current lazy block on hold the errors of all
        earlier blocks, updated in place at each block end (IST-DASLab/gptq's `W`, which its
        group grids and GPTVQ's codebooks are fitted on).
    """
    out_f, in_f = W.shape
    if within_step not in ("sequential", "diagonal"):
        raise ValueError(f"within_step={within_step!r}; valid: diagonal, sequential")
    if block_size % step:
        raise ValueError(f"block_size={block_size} must be a multiple of step={step}")
    if in_f % step:
        raise ValueError(f"in_features={in_f} must be a multiple of step={step}")
    W = W.float().clone()
    H = H.float()
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    U = inverse_cholesky(H, percdamp)  # (in, in) upper
    if expose is not None:
        expose(W, U)
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(0, i2 - i1, step):
            q = quantize_cols(i1 + j, W1[:, j:j + step])  # (out, step)
            Q1[:, j:j + step] = q
            if within_step == "diagonal" and step > 1:
                err = (W1[:, j:j + step] - q) / torch.diagonal(U1)[j:j + step]  # (out, step)
                loss += (err.double() ** 2).sum()
                W1[:, j + step:] -= err @ U1[j:j + step, j + step:]
                E1[:, j:j + step] = err
                continue
            for c in range(j, j + step):
                d = U1[c, c]
                err = (W1[:, c] - Q1[:, c]) / d  # (out,)
                loss += (err.double() ** 2).sum()
                W1[:, c + 1:] -= err[:, None] * U1[c, c + 1:][None, :]
                E1[:, c] = err
        Q[:, i1:i2] = Q1
        if i2 < in_f:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    return SolverResult(Q=Q, loss=float(loss), perm=perm)
