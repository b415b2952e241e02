"""GPTQ: beats RTN at equal total bits; stored tensors say exactly what the solver used (variant
consistent) or within the float16 rounding of the scales (variant reference); the rebuilt running
weight is the solver's; the plan is pure; bad input fails in one clear line (end to end through Hydra: tests/test_methods_e2e.py).
(Fidelity to IST-DASLab/gptq itself: tests/test_fidelity.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from baselines.gptq import GPTQ, RunningWeight, gptq_quantize, solver_inverse_cholesky
from baselines.rtn import RTN
from baselines.scalar import scalar_total_bits
from tests.helpers import correlated_hessian
from vptq.hessian import damp_, proxy_loss
from vptq.methods import BudgetError
from vptq.solver import error_feedback, prepare_hessian

OUT, IN = 96, 256


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g) * 0.02
    W[:, :4] *= 5  # a few heavy input columns, as in real layers
    return W, correlated_hessian(IN, seed=seed)


def _rebuild(q):
    """Ŵ from the stored codes / scales / zeros, written independently of ScalarWeight."""
    ref = torch.empty(q.out_features, q.in_features)
    for c in range(q.in_features):
        k = c // q.group_size
        ref[:, c] = q.scale[:, k].float() * (q.codes[:, c].float() - q.zero[:, k].float())
    return ref


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_at_equal_total_bits(bits, act_order):
    W, H = _layer()
    rtn = RTN(RTN.Config(), bits=bits, seed=0).quantize_layer(W, None, name="l")
    gq = GPTQ(GPTQ.Config(act_order=act_order), bits=bits, seed=0).quantize_layer(W, H, name="l")
    assert gq.storage().total_bits == rtn.storage().total_bits  # the same grid, the same bits
    assert gq.storage().per_weight()["total"] == pytest.approx(scalar_total_bits(bits, gq.group_size, IN))
    assert gq.storage().per_weight()["total"] <= bits + 0.1
    l_rtn, l_gptq = proxy_loss(W, rtn.dequantize(), H), proxy_loss(W, gq.dequantize(), H)
    assert l_gptq < 0.6 * l_rtn, (l_gptq, l_rtn)


@pytest.mark.parametrize("variant", ["reference", "consistent"])
@pytest.mark.parametrize("group,act_order", [(None, False), (None, True), (64, False), (64, True), (48, False)])
def test_gptq_stored_tensors_are_what_the_solver_used(group, act_order, variant):
    W, H = _layer(1)
    q, res = gptq_quantize(W, H, wbits=3, group_size=group, act_order=act_order, static_groups=act_order,
                           variant=variant)
    deq = q.dequantize()
    assert torch.equal(deq, _rebuild(q))  # stored tensors -> weight, independently
    if variant == "consistent":
        assert torch.equal(res.Q, deq)  # the error feedback saw exactly the stored weight
    else:  # their float32 scales, stored as float16: |Δ| <= 2^-12 relative (round to nearest)
        assert torch.allclose(res.Q, deq, rtol=2.0**-11, atol=0)
    assert res.loss == pytest.approx(proxy_loss(W, res.Q, damp_(H.clone(), 0.01)), rel=1e-3)
    ngroups = math.ceil(IN / (group or IN))
    assert q.scale.shape == (OUT, ngroups) and int(q.codes.max()) <= 7
    st = q.storage()
    assert st.index_bits == OUT * IN * 3 and st.total_bits == OUT * IN * 3 + OUT * ngroups * (16 + 3)
    q2, _ = gptq_quantize(W, H, wbits=3, group_size=group, act_order=act_order, static_groups=act_order,
                          variant=variant)
    assert torch.equal(q.codes, q2.codes) and torch.equal(q.scale, q2.scale)  # deterministic


def test_plan_is_a_pure_value():
    """check_budget/plan change nothing: the same weight whether or not it was called first;
    each shape is planned on its own; settings(plan) reports the plan."""
    W, H = _layer(4)
    fresh = GPTQ(GPTQ.Config(), bits=2, seed=0).quantize_layer(W, H, name="l")
    m = GPTQ(GPTQ.Config(), bits=2, seed=0)
    plan = m.check_budget([(OUT, IN), (OUT, 576), (8, 64)])
    assert plan == m.plan([(8, 64), (OUT, IN), (OUT, 576)]) and len(plan) == 3
    assert plan[(OUT, 576)].group_size == 192 and plan[(8, 64)].wbits == 1
    assert torch.equal(m.quantize_layer(W, H, name="l").codes, fresh.codes)
    assert torch.equal(m.quantize_layer(W, H, name="l", plan=plan[(OUT, IN)]).codes, fresh.codes)
    st = m.settings(plan)
    assert st["variant"] == "reference" and st[f"{OUT}x576"] == "w2g192" and m.settings()["wbits"] is None


@pytest.mark.parametrize("wbits", [2, 3])
def test_act_order_with_static_groups_helps(wbits):
    """Act-order (static groups) beats the natural order (grids fitted on the updated weights as
    the pass reaches each group) at the same storage: why act_order is the default."""
    W, H = _layer(2)
    nat, _ = gptq_quantize(W, H, wbits=wbits, group_size=32, act_order=False, static_groups=False)
    ao, _ = gptq_quantize(W, H, wbits=wbits, group_size=32, act_order=True, static_groups=True)
    assert nat.storage().total_bits == ao.storage().total_bits
    assert proxy_loss(W, ao.dequantize(), H) < 0.8 * proxy_loss(W, nat.dequantize(), H)


def test_running_weight_is_the_solvers_weight():
    W, H = _layer(3)
    W, H, _ = prepare_hessian(W, H)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    rw = RunningWeight(W[:, perm], solver_inverse_cholesky(H, 0.01, perm))
    errs = []

    def quantize_cols(col, Wc):  # Wc is the solver's updated column
        errs.append(float((rw.columns(col, col + 1) - Wc).norm() / Wc.norm()))
        q = torch.round(Wc * 40) / 40
        rw.record(col, q)
        return q

    error_feedback(W, H, quantize_cols, block_size=32, perm=perm)
    assert max(errs) < 1e-4


def test_gptq_bad_input():
    W, H = _layer()
    m = GPTQ(GPTQ.Config(), bits=3, seed=0)
    bad = W.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"blk\.q_proj.*NaN or Inf"):
        m.quantize_layer(bad, H, name="blk.q_proj")
    bad[3, 7] = float("inf")
    with pytest.raises(ValueError, match=r"blk\.q_proj.*NaN or Inf"):
        m.quantize_layer(bad, H, name="blk.q_proj")
    with pytest.raises(ValueError, match="needs the layer's Hessian"):
        m.quantize_layer(W, None, name="blk.q_proj")
    with pytest.raises(BudgetError, match=r"bits=0.5 is impossible.*valid: bits >="):
        GPTQ(GPTQ.Config(), bits=0.5, seed=0).check_budget([(OUT, IN)])
    with pytest.raises(ValueError, match="static_groups=true"):
        GPTQ(GPTQ.Config(act_order=True, group_size=64, static_groups=False), bits=3, seed=0)
    with pytest.raises(BudgetError, match="valid: 1..8"):
        GPTQ(GPTQ.Config(wbits=9), bits=3, seed=0).check_budget([(OUT, IN)])
    with pytest.raises(ValueError, match=r"method.variant='exact'; valid: reference, consistent"):
        GPTQ(GPTQ.Config(variant="exact"), bits=3, seed=0)
    # act-order with dynamic groups has no stored layout: the budget keeps it per channel
    p = GPTQ(GPTQ.Config(act_order=True, static_groups=False), bits=3, seed=0).layer_plan(OUT, 576)
    assert p.group_size is None


def test_dead_columns():
    W, H = _layer()
    H[5, :] = 0
    H[:, 5] = 0
    q = GPTQ(GPTQ.Config(), bits=3, seed=0).quantize_layer(W, H, name="l")
    assert torch.isfinite(q.dequantize()).all()
