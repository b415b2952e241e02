"""The seeded synthetic layer the fidelity references are measured on (issue 13).

`synthetic_layer(seed)` -> (W (out, in) float32, H (in, in) float32): the same tensors for
`scripts/fidelity/run_reference.py` (which runs the authors' code) and `tests/test_fidelity.py`
(which runs ours). Everything is drawn and computed in float64 from one CPU generator, then
rounded to float32 once; the only BLAS step is the float64 Gram matrix x xᵀ, whose summation
order can move an entry by ~1e-16 relative (below float32 resolution).

W: Gaussian weights of typical LLM scale (std 0.02) with log-normal row and column scales and
a few large entries. H = E[x xᵀ] of `tokens` activation vectors with an AR(1)-like correlation
across features, log-normal channel scales and a few heavy (x6) channels, as
`tests/conftest.correlated_hessian` draws it.
"""
from __future__ import annotations

from typing import Tuple

import torch

OUT_FEATURES, IN_FEATURES, TOKENS = 256, 512, 4096


def synthetic_layer(seed: int = 0, out_f: int = OUT_FEATURES, in_f: int = IN_FEATURES,
                    tokens: int = TOKENS, decay: float = 0.9) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    # W (out, in)
    W = torch.randn(out_f, in_f, generator=g, dtype=f64) * 0.02
    W = W * torch.exp(0.3 * torch.randn(out_f, 1, generator=g, dtype=f64))  # row scales
    W = W * torch.exp(0.2 * torch.randn(1, in_f, generator=g, dtype=f64))  # column scales
    big = torch.randperm(out_f * in_f, generator=g)[: out_f * in_f // 500]  # 0.2% large entries
    W.view(-1)[big] *= 4.0
    # H (in, in)
    idx = torch.arange(in_f, dtype=f64)
    cov = decay ** (idx[:, None] - idx[None, :]).abs()  # (in, in)
    scale = torch.exp(torch.randn(in_f, generator=g, dtype=f64) * 0.7)  # (in,)
    scale[torch.randperm(in_f, generator=g)[: max(1, in_f // 32)]] *= 6.0  # heavy channels
    L = torch.linalg.cholesky(cov)
    x = (torch.randn(tokens, in_f, generator=g, dtype=f64) @ L.T) * scale  # (tokens, in)
    H = x.T @ x / tokens
    return W.float().contiguous(), H.float().contiguous()


def proxy_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) in float64."""
    R = (W.double() - What.double())
    return float(((R @ H.double()) * R).sum())


def weight_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H Wᵀ) in float64 (the denominator of the relative proxy loss)."""
    Wd = W.double()
    return float(((Wd @ H.double()) * Wd).sum())
