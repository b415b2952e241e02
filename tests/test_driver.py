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


def test_run_block_in_place_and_hessians_without_outputs_are_identical():
    from runners.driver import run_block

    model, _ = _tiny()
    arch = arch_of(model)
    windows = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_block0_inputs(model, windows, "cpu", arch)
    block = blocks_of(model, arch)[0]
    lins = linears_of(block)
    hk = hessian_groups(lins, arch)
    h_keep, out = collect_hessians(block, inputs, kwargs, hk, lins)
    h_none, none = collect_hessians(block, inputs, kwargs, hk, lins, keep_outputs=False)
    assert none is None and h_keep.keys() == h_none.keys()
    assert all(torch.equal(h_keep[k], h_none[k]) for k in h_keep)
    ref = run_block(block, inputs, kwargs)
    assert torch.equal(ref, out)
    buf = inputs.clone()
    res = run_block(block, buf, kwargs, out=buf)  # each window's output over its own input
    assert res is buf and torch.equal(buf, ref)


def test_perplexity_chunks_equal_one_log_softmax_over_the_window(monkeypatch):
    import math

    import torch.nn.functional as F

    import runners.ppl as P

    model, _ = _tiny()
    windows = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0]
            nll += float(F.cross_entropy(logits[:-1].double(), w[1:], reduction="sum"))
    ref = math.exp(nll / (2 * 39))
    assert P._decoder_and_head(model) is not None  # llama: the head runs per chunk of hidden states
    vals = []
    for chunk in (7, 39, 128):
        monkeypatch.setattr(P, "CHUNK", chunk)
        vals.append(P.perplexity(model, windows, "cpu"))
    monkeypatch.setattr(P, "LM_HEAD_ONLY", ())  # any other architecture: from the model's full logits
    assert P._decoder_and_head(model) is None
    vals.append(P.perplexity(model, windows, "cpu"))
    assert all(abs(v - ref) <= 1e-6 * ref for v in vals), (vals, ref)  # fp32 log-softmax vs fp64
    # chunks 39 and 128 both hold the whole 39-token window: the same GEMMs on the same shapes, bitwise
    assert vals[1] == vals[2]
    # chunk 7 runs the head's GEMM on 7-row slices: another BLAS kernel and summation order (seen: 1.2e-8
    # relative on an AMD EPYC), so agreement within fp32 rounding of the logits, not bitwise
    assert max(vals) - min(vals) <= 1e-6 * ref, vals
