"""The seeded synthetic layer the AQLM fidelity check runs on (ours and the authors' code alike).

W (out, in): Gaussian rows with a log-normal per-row scale (rows of real LLM linears differ in
norm, and AQLM's per-row scales must matter). H (in, in) = E[x xᵀ] of activations with an
AR(1)-like covariance across features (decay 0.9), log-normal per-feature scales and a few heavy
outlier channels (x6): the recipe of `correlated_hessian` in tests/conftest.py, written out here so
that the script needs no pytest. Computed in float64 on the CPU, returned as float32.
"""
from __future__ import annotations

from typing import Tuple

import torch


def synthetic_layer(out_f: int, in_f: int, seed: int = 0, tokens: int = 4096,
                    decay: float = 0.9) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> W (out_f, in_f) float32, H (in_f, in_f) float32 (symmetric positive definite)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    W = W * torch.exp(torch.randn(out_f, 1, generator=g, dtype=torch.float64) * 0.3)
    idx = torch.arange(in_f, dtype=torch.float64)
    cov = decay ** (idx[:, None] - idx[None, :]).abs()  # (in, in)
    scale = torch.exp(torch.randn(in_f, generator=g, dtype=torch.float64) * 0.7)
    scale[torch.randperm(in_f, generator=g)[: max(1, in_f // 32)]] *= 6.0  # outlier channels
    L = torch.linalg.cholesky(cov)
    x = (torch.randn(tokens, in_f, generator=g, dtype=torch.float64) @ L.T) * scale  # (tokens, in)
    H = x.T @ x / tokens
    return W.float(), H.float()


def proxy_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) in float64."""
    R = (W.double() - What.double())
    return float(((R @ H.double()) * R).sum())
