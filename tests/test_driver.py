"""The layer-by-layer driver: Hessians it collects equal E[x xᵀ] computed by hand; shared inputs."""
from __future__ import annotations

import torch

from runners.arch import arch_of, blocks_of, hessian_groups, linears_of
from runners.driver import capture_block0_inputs, collect_hessians
from runners.models import tiny_model
from runners.schema import ModelConfig, TinyModelConfig


def _tiny(arch="llama"):
    m, tok = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(arch=arch)))
    return m.eval(), tok


def test_block0_hessians_match_hand_computation():
    model, _ = _tiny()
    calib = torch.randint(0, 200, (3, 32), generator=torch.Generator().manual_seed(0))
    arch = arch_of(model)
    inputs, kwargs = capture_block0_inputs(model, calib, "cpu", arch)
    # block 0's input is the embedding of the tokens
    assert torch.equal(inputs, model.model.embed_tokens(calib))
    block = blocks_of(model, arch)[0]
    lin = linears_of(block)
    keys = hessian_groups(lin, arch)
    assert keys["self_attn.k_proj"] == keys["self_attn.v_proj"] == "self_attn.q_proj"
    assert keys["mlp.up_proj"] == "mlp.gate_proj" and keys["mlp.down_proj"] == "mlp.down_proj"
    H, out = collect_hessians(block, inputs, kwargs, keys, lin)
    assert set(H) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    x = block.input_layernorm(inputs).reshape(-1, inputs.shape[-1]).double()
    ref = x.T @ x / x.shape[0]
    torch.testing.assert_close(H["self_attn.q_proj"].double(), ref, rtol=1e-5, atol=1e-6)
    # the recorded outputs are the float block's outputs
    full = model(calib, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_mistral_arch_in_table():
    model, _ = _tiny("mistral")
    assert arch_of(model).shared_inputs
    assert len(linears_of(blocks_of(model, arch_of(model))[0])) == 7
