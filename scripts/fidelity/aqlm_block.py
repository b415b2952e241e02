"""The seeded tiny block the AQLM block-finetuning comparison starts from (ours and the authors'
`finetune_groupwise` alike), and its block-output error. The synthetic layer of the per-layer
comparison is the shared one: scripts/fidelity/layer.py.
"""
from __future__ import annotations

import torch


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
