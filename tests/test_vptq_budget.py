"""VPTQ bits budget (vptq/budget.py): exact storage counting, the rule's choices, overrides,
format constraints and impossible budgets."""
from __future__ import annotations

import pytest
import torch
from tests.helpers import correlated_hessian

from vptq.budget import (LayerConfig, check_format, choose_config, predicted_log2_loss, storage_bits,
                         total_bits_per_weight)
from vptq.methods import BudgetError, build_method
from vptq.quantizer import VPTQ, quantize_weight

SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("cfg", [
    LayerConfig(4, 16),
    LayerConfig(3, 8, 4, perm=False),
    LayerConfig(4, 8, 4, group_num=2),
    LayerConfig(4, 8, 4, outlier_size=4, outlier_vector_len=2, outlier_num_centroids=8),
    LayerConfig(5, 16, 2, group_num=2, norm=True),
    LayerConfig(4, 8, outlier_size=5, outlier_vector_len=3, outlier_num_centroids=16),
], ids=lambda c: c.short())
@pytest.mark.parametrize("shape", [(40, 32), (42, 38)])  # 42: padding rows for v=4, 5
def test_storage_bits_match_vqweight_storage(cfg, shape):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g)
    q, _ = quantize_weight(W, correlated_hessian(in_f), cfg, seed=0)
    assert q.storage().bits == storage_bits(out_f, in_f, cfg)


@pytest.mark.parametrize("bits", [2.0, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("shape", SMOL + [(4096, 4096), (11008, 4096)])
def test_choice_is_within_budget_and_valid(bits, shape):
    c = choose_config(*shape, bits, 0.1)
    check_format(*shape, c)
    assert total_bits_per_weight(*shape, c) <= bits + 0.1
    assert c.outlier_size == 0 and c.group_num == 1 and not c.norm  # only when asked for


def test_paper_config_on_4096_and_small_codebooks_on_smollm2():
    c = choose_config(4096, 4096, 2.0, 0.1)
    assert (c.vector_len, c.num_centroids, c.num_res_centroids) == (6, 4096, 0)
    for shape in SMOL:
        c = choose_config(*shape, 2.0, 0.1)
        assert c.num_centroids <= 1024  # a 4096x6 codebook alone would cost >1 bit/weight here
        assert 2.0 <= total_bits_per_weight(*shape, c) <= 2.1


def test_more_bits_never_predicts_worse():
    for shape in SMOL:
        prev = None
        for bits in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
            c = choose_config(*shape, bits, 0.1)
            p = predicted_log2_loss(*shape, c)
            assert prev is None or p <= prev
            prev = p


def test_explicit_parameters_override_the_budget():
    # the paper's config on a small layer: 3.2 bits, used as given
    c = choose_config(576, 576, 2.0, 0.1, vector_len=6, num_centroids=4096)
    assert (c.vector_len, c.num_centroids) == (6, 4096)
    assert total_bits_per_weight(576, 576, c) > 3
    # partial overrides: the rest is chosen within the budget
    c = choose_config(576, 576, 2.0, 0.1, vector_len=6)
    assert c.vector_len == 6 and total_bits_per_weight(576, 576, c) <= 2.1
    c = choose_config(576, 576, 3.0, 0.1, num_res_centroids=16, perm=False)
    assert c.num_res_centroids == 16 and not c.perm
    c = choose_config(1536, 576, 2.0, 0.2, outlier_size=8, outlier_vector_len=4, outlier_num_centroids=256)
    assert c.outlier_size == 8 and c.num_res_centroids == 0


def test_method_config_fields_reach_the_layer():
    m = build_method("vptq", VPTQ.Config(vector_len=3, num_centroids=32, num_res_centroids=4, group_num=2,
                                         enable_perm=False, enable_norm=True), bits=2.0)
    c = m.layer_config(96, 64)
    assert c == LayerConfig(3, 32, 4, group_num=2, perm=False, norm=True)


@pytest.mark.parametrize("bits", [0.01, 0.05])
def test_impossible_budget_names_nearest_valid(bits):
    with pytest.raises(BudgetError, match=r"bits=.* is impossible .* valid: bits >= "):
        choose_config(576, 576, bits, 0.0)
    m = build_method("vptq", VPTQ.Config(tolerance=0.0), bits=bits)
    with pytest.raises(BudgetError):
        m.check_budget([(576, 576)])


def test_partial_override_that_cannot_fit():
    with pytest.raises(BudgetError, match="vector_len=2"):
        choose_config(576, 576, 0.3, 0.1, vector_len=2, perm=True)


@pytest.mark.parametrize("over,match", [
    (dict(vector_len=4, num_centroids=100), "power of two"),
    (dict(vector_len=4, num_centroids=1 << 17), "power of two"),
    (dict(vector_len=4, num_centroids=256, num_res_centroids=512), "num_res_centroids"),
    (dict(vector_len=4, num_centroids=256, num_res_centroids=3), "num_res_centroids"),
    (dict(vector_len=4, num_centroids=256, group_num=5), "valid: 1, 2, 3, 4, 6"),
    (dict(vector_len=4, num_centroids=256, outlier_size=4), "outlier_vector_len"),
    (dict(vector_len=4, num_centroids=256, outlier_size=4, outlier_vector_len=1, outlier_num_centroids=16),
     "outlier_vector_len"),
    (dict(vector_len=700, num_centroids=256), "vector_len"),
])
def test_format_constraints(over, match):
    with pytest.raises(BudgetError, match=match):
        choose_config(576, 576, 2.0, 0.1, **over)


def test_act_order_is_free_with_one_group_and_counted_otherwise():
    """One group, no outliers: the permutation is absorbed into the index order (nothing stored); with
    several groups or outlier columns it is stored, 16 bits per input column."""
    from vptq.budget import stores_perm

    one = LayerConfig(4, 256)
    assert stores_perm(one) is False and "perm" not in storage_bits(576, 576, one)
    assert storage_bits(576, 576, one) == storage_bits(576, 576, LayerConfig(4, 256, perm=False))
    for c in (LayerConfig(4, 256, group_num=2),
              LayerConfig(4, 256, perm=False, outlier_size=6, outlier_vector_len=4, outlier_num_centroids=16)):
        assert stores_perm(c) and storage_bits(576, 576, c)["perm"] == 576 * 16
    assert not stores_perm(LayerConfig(4, 256, group_num=2, perm=False))
    # so the budget always takes the act order where it is free
    for shape in SMOL + [(4096, 4096)]:
        for bits in (2.0, 3.0):
            c = choose_config(*shape, bits, 0.1)
            assert c.perm and "perm" not in storage_bits(*shape, c)


def test_padding_rows_are_not_index_rate():
    """The predicted loss reads the index rate log2(k k_r)/v: the padding rows a vector length that does
    not divide out_features stores (counted in the total) carry no information."""
    a, b = LayerConfig(6, 4096), LayerConfig(12, 4096, 4096)  # both 2 index bits per weight
    assert storage_bits(4096, 4096, b)["indices"] > 2 * 4096 * 4096  # 342 vector rows of 12 for 4096
    assert predicted_log2_loss(4096, 4096, a) == predicted_log2_loss(4096, 4096, b)


def test_outliers_with_a_residual_codebook():
    """The paper's Table 8 configurations: outlier columns (own codebook, no residual: the format's
    only restriction) beside a residual pair on the other columns. Explicit, and enumerated by the
    budget when only the outliers are given."""
    t8 = dict(vector_len=12, num_centroids=4096, num_res_centroids=4096, group_num=4, outlier_size=40,
              outlier_vector_len=4, outlier_num_centroids=8192)  # LLaMA-2-7B 2.26 b row, on a 4096x4096 layer
    c = choose_config(4096, 4096, None, 0.1, **t8)
    assert c == LayerConfig(perm=True, **t8)
    bits = storage_bits(4096, 4096, c)
    assert bits["res_codebooks"] == 4 * 4096 * 12 * 16 and bits["outlier_indices"] == 1024 * 40 * 16
    assert bits["perm"] == 4096 * 16  # outliers first: the order is stored
    assert 2.4 < total_bits_per_weight(4096, 4096, c) < 2.45  # 2.435 counted from what is stored
    out = dict(outlier_size=6, outlier_vector_len=4, outlier_num_centroids=256)
    picks = {choose_config(*shape, 2.5, 0.1, **out).num_res_centroids for shape in SMOL}
    assert max(picks) > 0  # a residual pair is chosen beside the outliers where it predicts best
    for shape in SMOL:
        c = choose_config(*shape, 2.5, 0.1, **out)
        assert c.outlier_size == 6 and total_bits_per_weight(*shape, c) <= 2.6
        check_format(*shape, c)


def test_community_spec_is_a_shorthand_for_explicit_settings():
    """method.spec=v8-k65536-256 (VPTQ-community naming) == the three explicit fields; -woft accepted."""
    from vptq.budget import parse_spec

    assert parse_spec("v8-k65536-256") == {"vector_len": 8, "num_centroids": 65536, "num_res_centroids": 256}
    assert parse_spec("v8-k65536-0-woft") == {"vector_len": 8, "num_centroids": 65536, "num_res_centroids": 0,
                                              "finetune": False}
    a = build_method("vptq", VPTQ.Config(spec="v8-k65536-256"), bits=3.0)
    b = build_method("vptq", VPTQ.Config(vector_len=8, num_centroids=65536, num_res_centroids=256), bits=3.0)
    for shape in [(4096, 4096), (576, 576)]:
        assert a.layer_plan(*shape) == b.layer_plan(*shape)
        c = a.layer_plan(*shape)
        assert (c.vector_len, c.num_centroids, c.num_res_centroids) == (8, 65536, 256)
    assert a.settings()["spec"] == "v8-k65536-256"
    # the same value given twice is fine; a different one is a one-line conflict
    build_method("vptq", VPTQ.Config(spec="v8-k65536-256-woft", vector_len=8), bits=3.0)


@pytest.mark.parametrize("kw,needle", [
    (dict(spec="v8-k65536-256", vector_len=6), "method.spec=v8-k65536-256 sets vector_len=8 but method.vector_len=6"),
    (dict(spec="v8-k65536-256", num_res_centroids=0), "sets num_res_centroids=256 but method.num_res_centroids=0"),
    (dict(spec="v8-k65536-256-woft", finetune=True), "sets finetune=False but method.finetune=True"),
    (dict(spec="v8-k65536-256-ft"), "unknown suffix '-ft'; valid: -woft"),
    (dict(spec="Meta-Llama-3.1-8B-Instruct-v8-k65536-256-woft"), "is not of the form v<vector_len>-k"),
    (dict(spec="v8k65536"), "e.g. v8-k65536-256"),
])
def test_community_spec_errors_are_one_line(kw, needle):
    from vptq.methods import MethodError

    with pytest.raises(MethodError) as e:
        build_method("vptq", VPTQ.Config(**kw), bits=2.0)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_community_spec_with_invalid_sizes_fails_in_the_format_check():
    m = build_method("vptq", VPTQ.Config(spec="v8-k65536-131072"), bits=3.0)
    with pytest.raises(BudgetError, match="num_res_centroids=131072"):
        m.layer_plan(4096, 4096)
