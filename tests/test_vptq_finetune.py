"""Layer-wise finetuning as `VPTQ.finetune_block` runs it (method.finetune=true outside the runner,
vptq/finetune.py): the VQWeight adapter (vptq/trainable.py) equals the reference and its gradients
equal plain autograd's, block-output MSE goes down on a tiny block, float16 write-back, determinism."""
from __future__ import annotations

import pytest
import torch
from tests.helpers import correlated_hessian

from runners.arch import arch_of, blocks_of
from runners.driver import quantize_model
from runners.models import tiny_model
from runners.schema import ModelConfig, TinyModelConfig
from vptq.budget import LayerConfig
from vptq.finetune import finetune_block
from vptq.methods import BlockContext, build_method
from vptq.quantizer import VPTQ, quantize_weight
from vptq.trainable import trainable


@pytest.mark.parametrize("cfg", [
    LayerConfig(4, 16),
    LayerConfig(3, 8, 4, perm=False, norm=True),
    LayerConfig(4, 8, group_num=2, outlier_size=4, outlier_vector_len=2, outlier_num_centroids=16, norm=True),
], ids=lambda c: c.short())
def test_differentiable_dequantize_equals_reference(cfg):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(42, 36, generator=g)  # 42 rows: padding for v=4
    q, _ = quantize_weight(W, correlated_hessian(36), cfg, seed=0)
    dd = trainable(q)
    Wd = dd.weight()
    assert torch.equal(Wd.detach(), q.dequantize())
    (Wd * torch.randn(Wd.shape, generator=g)).sum().backward()
    # gradients reach every trainable tensor, and equal plain autograd through indexing
    for name, p in dd.params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    ref = {n: t.detach().float().clone().requires_grad_(True) for n, t in dd.params.items()}
    Wr = _plain_dequant(q, ref)
    assert torch.equal(Wr.detach(), Wd.detach())
    g2 = torch.Generator().manual_seed(0)
    torch.randn(42, 36, generator=g2)
    (Wr * torch.randn(Wr.shape, generator=g2)).sum().backward()
    for name, p in dd.params.items():
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-7)


def _plain_dequant(q, t):
    """VQWeight.dequantize written with plain autograd indexing (the gradient oracle)."""
    def cols(C, idx):
        G, n, gs = idx.shape
        v = C.shape[-1]
        vec = C[torch.arange(G)[:, None, None], idx.long()]  # (G, n, gs, v)
        return vec.permute(0, 1, 3, 2).reshape(G, n * v, gs).permute(1, 0, 2).reshape(n * v, G * gs)[:q.out_features]
    W = cols(t["centroids"], q.indices)
    if "res_centroids" in t:
        W = W + cols(t["res_centroids"], q.res_indices)
    if "outlier_centroids" in t:
        W = torch.cat([cols(t["outlier_centroids"], q.outlier_indices), W], 1)
    if q.perm is not None:
        W = W[:, torch.argsort(q.perm)]
    if "weight_scale" in t:
        W = W * t["weight_scale"][None] + t["weight_bias"][None]
    return W


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _tiny_run(finetune: bool, seed: int = 0, epochs: int = 4):
    model, _ = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=1)))
    model.eval()
    calib = torch.randint(0, 250, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = VPTQ.Config(vector_len=4, num_centroids=16, finetune=finetune, finetune_epochs=epochs,
                      finetune_lr=1e-3, finetune_batch=2)
    method = build_method("vptq", cfg, bits=2.0, seed=seed)
    stats = quantize_model(model, method, calib=calib, device="cpu")
    return model, stats


def test_finetuning_lowers_block_output_mse_and_is_deterministic():
    model, stats = _tiny_run(True)
    rec = stats.blocks[0]
    assert rec["ft_steps"] == 4 * 4
    assert rec["ft_kept"] == 1.0
    assert rec["ft_mse_after"] < 0.92 * rec["ft_mse_before"], rec  # measured 0.83
    block = blocks_of(model, arch_of(model))[0]
    q = block.self_attn.q_proj.qweight
    assert q.centroids.dtype == torch.float16
    model2, stats2 = _tiny_run(True)
    q2 = blocks_of(model2, arch_of(model2))[0].self_attn.q_proj.qweight
    assert torch.equal(q.centroids, q2.centroids)
    assert stats2.blocks[0]["ft_mse_after"] == rec["ft_mse_after"]
    # finetuning only moves the codebooks: the indices are those of the run without it
    model3, _ = _tiny_run(False)
    q3 = blocks_of(model3, arch_of(model3))[0].self_attn.q_proj.qweight
    assert torch.equal(q.indices, q3.indices)
    assert not torch.equal(q.centroids, q3.centroids)


def test_finetune_needs_calibration_outputs():
    model, _ = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=1)))
    block = blocks_of(model, arch_of(model))[0]
    ctx = BlockContext(torch.zeros(0, 4, 64), None, {}, "cpu", 0)
    with pytest.raises(ValueError, match="calibration"):
        finetune_block(block, ctx, epochs=1, lr=1e-3, batch=1, seed=0)
