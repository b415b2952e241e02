"""RTN: stored tensors say exactly what dequantize returns; bits counted from storage; the budget
picks the code width and the group; the two variants. Ordering by bits on the bundled model (PPL and
KL from the same runs): tests/test_kld.py."""
from __future__ import annotations

import pytest
import torch

from baselines.rtn import RTN
from baselines.scalar import scalar_total_bits
from tests.helpers import snr_db
from vptq.methods import BudgetError


@pytest.mark.parametrize("bits,group", [(2, None), (3, None), (4, None), (3, 64), (4.25, 32)])
def test_rtn_storage_and_exact_dequant(bits, group):
    W = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    m = RTN(RTN.Config(group_size=group, tolerance=0.3), bits=bits, seed=0)
    q = m.quantize_layer(W, None, name="l")
    b = q.wbits
    # rebuild from the stored tensors independently
    g = q.group_size
    assert group is None or g == group
    ref = torch.empty_like(W)
    for c in range(256):
        s = q.scale[:, c // g].float()
        z = q.zero[:, c // g].float()
        ref[:, c] = s * (q.codes[:, c].float() - z)
    assert torch.equal(q.dequantize(), ref)
    assert int(q.codes.max()) <= 2**b - 1
    st = q.storage()
    assert st.total_bits / st.numel == pytest.approx(scalar_total_bits(b, g, 256))
    assert st.total_bits / st.numel <= bits + 0.3
    assert st.index_bits / st.numel == b


@pytest.mark.parametrize("bits,in_f,expect", [(2, 576, (2, 192)), (3, 576, (3, 192)), (2, 1536, (2, 192)),
                                              (4, 64, (3, 32)), (2.5, 576, (2, 32))])
def test_budget_chooses_the_group_too(bits, in_f, expect):
    """The widest code, then the smallest group (multiple of 32) within bits + 0.1."""
    p = RTN(RTN.Config(), bits=bits).layer_plan(64, in_f)
    assert (p.wbits, p.group_size) == expect
    assert scalar_total_bits(p.wbits, p.group_size, in_f) <= bits + 0.1
    assert RTN(RTN.Config(group_size=64), bits=bits).layer_plan(64, in_f).group_size == 64  # explicit wins
    assert RTN(RTN.Config(wbits=2), bits=8).layer_plan(64, in_f).wbits == 2


def test_variants_differ_only_in_the_scale_rounding():
    """reference codes against the float32 scale (gptq's quant.py), consistent against the stored
    float16 one: codes agree almost everywhere, and both store float16 scales."""
    W = torch.randn(64, 576, generator=torch.Generator().manual_seed(2)) * 0.02
    ref = RTN(RTN.Config(), bits=3).quantize_layer(W, None, name="l")
    con = RTN(RTN.Config(variant="consistent"), bits=3).quantize_layer(W, None, name="l")
    assert ref.storage().bits == con.storage().bits and ref.scale.dtype == torch.float16
    assert (ref.codes == con.codes).float().mean() > 0.99
    assert torch.equal(ref.zero, con.zero) or (ref.zero != con.zero).float().mean() < 0.05
    with pytest.raises(ValueError, match=r"method.variant='exact'; valid: reference, consistent"):
        RTN(RTN.Config(variant="exact"), bits=3)
    with pytest.raises(ValueError, match=r"method.iters='gpu'; valid: cpu, paper"):
        RTN(RTN.Config(iters="gpu"), bits=3)


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
