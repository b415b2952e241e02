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


def finetune_setup(seed: int = 0, windows: int = 8, tokens: int = 32, nbits: int = 6, group: int = 4):
    """The seeded starting point of the block-finetuning comparison: a 1-block tiny Llama (hidden
    64, MLP 160; runners.models.tiny_model), calibration inputs of its block, the float block's
    outputs on them, and every linear of the block replaced by an AQLM 1xB/g weight whose
    codebook is seeded Gaussian (scale of the row-normalised weights), scales the row L2
    norms and codes the nearest codeword of W/s (plain assignment: nothing BLAS-amplified).
    -> (block, inputs (N, L, D), float outputs (N, L, D), block kwargs); needs the repo on sys.path."""
    from baselines.aqlm import AQLMWeight
    from runners.arch import arch_of, blocks_of, linears_of, set_module
    from runners.driver import capture_block0_inputs, run_block
    from runners.models import tiny_model
    from runners.schema import ModelConfig, TinyModelConfig
    from vptq.kmeans import assign
    from vptq.qlinear import QuantLinear

    model, _ = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=1,
                                                                                     init_seed=seed)))
    model.eval()
    g = torch.Generator().manual_seed(seed)
    calib = torch.randint(0, 200, (windows, tokens), generator=g)
    with torch.no_grad():
        X, kwargs = capture_block0_inputs(model, calib, "cpu", arch_of(model))
        block = blocks_of(model, arch_of(model))[0]
        Y = run_block(block, X, kwargs)
        for name, lin in linears_of(block).items():
            W = lin.weight.detach().float()
            s = W.norm(dim=1)  # (out,)
            C = torch.randn(1, 2**nbits, group, generator=g) / W.shape[1] ** 0.5  # (1, K, g)
            codes = assign((W / s[:, None]).reshape(-1, group), C[0]).reshape(W.shape[0], -1, 1)
            set_module(block, name, QuantLinear(AQLMWeight(codes, C, s, nbits), lin.bias))
    return block, X, Y, kwargs


def block_rel_mse(block, X, Y, kwargs) -> float:
    """Σ (block(X) - Y)² / Σ Y² over all windows (float64 sums)."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(X.shape[0]):
            y = block(X[i:i + 1], **kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            num += float((y.double() - Y[i:i + 1].double()).pow(2).sum())
            den += float(Y[i:i + 1].double().pow(2).sum())
    return num / den
