"""Hessian collection: H = E[x xᵀ] of a linear layer's inputs over the calibration tokens.

The layer-wise proxy loss every second-order method minimises is
    tr((W - Ŵ) H (W - Ŵ)ᵀ)     (GPTQ eq. 1, VPTQ eq. 2)
with H the (in_features, in_features) second moment of the layer's inputs. `HessianAccumulator`
is fed by forward hooks in the layer-by-layer driver (runners/capture.py caches Hessians on disk).
"""
from __future__ import annotations

import torch


class HessianAccumulator:
    """Running E[x xᵀ] over all tokens seen. x: (..., in_features)."""

    def __init__(self, in_features: int, device, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.count = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)  # (tokens, in)
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def finalize(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer: the calibration data is empty")
        return self.sum / self.count


def damp_(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Add percdamp * mean(diag H) to the diagonal, in place (GPTQ's damping)."""
    d = torch.diagonal(H)
    d += percdamp * torch.mean(d)
    return H


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Input columns that never see a non-zero activation (diag(H) == 0): bool (in_features,)."""
    return torch.diagonal(H) == 0


QUAD_CHUNK_BYTES = 1 << 26  # float64 rows per step of `_quadratic`: 64 MB, whatever the layer's size


def _quadratic(A, H: torch.Tensor, B=None) -> float:
    """tr(X H Xᵀ) in float64, X = A (out, in) or A - B, a block of rows at a time: never a float64
    copy of a whole weight (a 53248 x 16384 layer would need 7 GB for each)."""
    Hd = H.double()
    rows = max(1, QUAD_CHUNK_BYTES // (8 * A.shape[1]))
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for r in range(0, A.shape[0], rows):
        X = A[r:r + rows].double()
        if B is not None:
            X = X - B[r:r + rows].double()
        total += ((X @ Hd) * X).sum()
    return float(total)


def proxy_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ), computed in float64."""
    return _quadratic(W, H, What)


def relative_proxy_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """Proxy loss divided by tr(W H Wᵀ): the fraction of the layer's output energy lost."""
    return proxy_loss(W, What, H) / max(_quadratic(W, H), 1e-30)
