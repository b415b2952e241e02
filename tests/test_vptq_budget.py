"""VPTQ bits budget (vptq/budget.py): exact storage counting, the rule's choices, overrides,
format constraints and impossible budgets."""
from __future__ import annotations

import pytest
import torch
from conftest import correlated_hessian

from vptq.budget import (LayerConfig, check_format, choose_config, predicted_log2_loss, storage_bits,
                         total_bits_per_weight)
from vptq.methods import BudgetError, build_method
from vptq.quantizer import VPTQ, quantize_weight

SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("cfg", [
    LayerConfig(4, 16),
    LayerConfig(3, 8, 4, perm=False),
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
        assert c.num_centroids <= 256  # a 4096x6 codebook alone would cost >1 bit/weight here
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
    (dict(vector_len=4, num_centroids=256, num_res_centroids=4, outlier_size=4, outlier_vector_len=2,
          outlier_num_centroids=16), "residual"),
    (dict(vector_len=700, num_centroids=256), "vector_len"),
])
def test_format_constraints(over, match):
    with pytest.raises(BudgetError, match=match):
        choose_config(576, 576, 2.0, 0.1, **over)
