"""GPTVQ: beats GPTQ at 2 bits (equal total); stored tensors (packed indices, int8 or fp16
codebooks, SVD factors, normalisation codes) say exactly what dequantize uses and (variant exact)
what the error feedback used; bits counted from them; the budget rule stays within bits +
tolerance; bad schemes fail naming the nearest valid choices (end to end through Hydra: tests/test_methods_e2e.py). (Fidelity to
Qualcomm-AI-research/gptvq itself: tests/test_fidelity.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines.gptq import GPTQ
from baselines.gptvq import (GPTVQ, Scheme, choose_scheme, gptvq_quantize, pack_bits, unpack_bits,
                             update_codebooks, weighted_assign)
from tests.helpers import correlated_hessian
from vptq.hessian import proxy_loss
from vptq.methods import BudgetError
from vptq.qweight import weight_from_state, weight_state


def _layer(out_f=128, in_f=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    W[:, :4] *= 5
    return W, correlated_hessian(in_f, seed=seed)


def _rebuild(q) -> torch.Tensor:
    """Ŵ from the stored tensors, written independently of GPTVQWeight (numpy bit unpacking)."""
    d, K, m = q.vq_dim, q.num_centroids, int(math.log2(q.num_centroids))
    nvec = q.out_features * q.in_features // d
    bits = np.unpackbits(q.packed.numpy(), bitorder="little")[: nvec * m].reshape(nvec, m)
    idx = (bits.astype(np.int64) << np.arange(m)).sum(1).reshape(q.out_features, -1)
    n_rg = q.out_features // q.rows_per_group
    C = q.codebooks.float()
    if q.scales is not None:
        C = C * q.scales.float()[:, None, None]
    ref = torch.empty(q.out_features, q.in_features)
    for r in range(q.out_features):
        for v in range(q.in_features // d):
            cb = (v * d // q.columns_per_group) * n_rg + r // q.rows_per_group
            ref[r, v * d:(v + 1) * d] = C[cb, int(idx[r, v])]
    return ref


@pytest.mark.parametrize("variant,assign_metric", [("reference", None), ("exact", "block"), ("exact", "diag")])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptvq_beats_gptq_at_two_bits_equal_total(variant, assign_metric, seed):
    W, H = _layer(seed=seed)
    gq = GPTQ(GPTQ.Config(), bits=2, seed=0).quantize_layer(W, H, name="l")
    gq_total = gq.storage().per_weight()["total"]  # 2 + 18·groups/512
    # spend no more than GPTQ does: tolerance = GPTQ's overhead
    m = GPTVQ(GPTVQ.Config(variant=variant, tolerance=gq_total - 2, assign_metric=assign_metric), bits=2, seed=0)
    vq = m.quantize_layer(W, H, name="l")
    vq_total = vq.storage().per_weight()["total"]
    assert vq_total <= gq_total and vq.storage().per_weight()["index"] >= 1.99
    l_vq, l_gq = proxy_loss(W, vq.dequantize(), H), proxy_loss(W, gq.dequantize(), H)
    assert l_vq < 0.85 * l_gq, (l_vq, l_gq, vq.settings())


@pytest.mark.parametrize("d", [2, 4])
def test_block_metric_beats_the_diagonal(d):
    """The exact d x d assignment metric (our default) vs the reference code's diagonal."""
    W, H = _layer(64, 256, seed=2)
    s = choose_scheme(64, 256, bits=3 if d == 2 else 2, tolerance=0.6, vq_dim=d)
    loss = {}
    for metric in ("block", "diag"):
        q, _ = gptvq_quantize(W, H, s, variant="exact", kmeans_iters=5, update_iters=0, assign_metric=metric)
        loss[metric] = proxy_loss(W, q.dequantize(), H)
    assert loss["block"] < 0.95 * loss["diag"], loss


@pytest.mark.parametrize("d,k,cbits", [(1, 8, 8), (2, 16, 8), (4, 16, 16), (2, 32, 16)])
def test_stored_tensors_are_what_the_solver_used(d, k, cbits):
    W, H = _layer(48, 96, seed=3)
    s = Scheme(vq_dim=d, num_centroids=k, rows_per_group=16, columns_per_group=48, codebook_bits=cbits)
    q, res = gptvq_quantize(W, H, s, variant="exact", kmeans_iters=5, update_iters=0)
    deq = q.dequantize()
    assert torch.equal(deq, _rebuild(q))
    assert torch.equal(res.Q, deq)  # the error feedback used the compressed codebooks, exactly
    n_cb = (48 // 16) * (96 // 48)
    assert q.codebooks.shape == (n_cb, k, d)
    assert q.codebooks.dtype == (torch.int8 if cbits == 8 else torch.float16)
    st = q.storage()
    m = int(math.log2(k))
    assert st.bits["indices"] == math.ceil(48 * 96 // d * m / 8) * 8 == q.packed.numel() * 8
    assert st.bits["codebooks"] == n_cb * k * d * cbits
    assert st.bits.get("codebook_scales", 0) == (n_cb * 16 if cbits == 8 else 0)
    assert st.total_bits / st.numel == pytest.approx(s.total_bits(48, 96))
    # with the codebook update (§3.3): still exactly what is stored, never worse than without
    q2, _ = gptvq_quantize(W, H, s, variant="exact", kmeans_iters=5, update_iters=10)
    assert torch.equal(q2.dequantize(), _rebuild(q2))
    assert torch.equal(q2.packed, q.packed)  # assignments are fixed by the update
    assert proxy_loss(W, q2.dequantize(), H) <= proxy_loss(W, deq, H)
    q3, _ = gptvq_quantize(W, H, s, variant="exact", kmeans_iters=5, update_iters=10)
    assert torch.equal(q3.packed, q2.packed) and torch.equal(q3.codebooks, q2.codebooks)  # deterministic
    # the generic per-block checkpoint format (runners/checkpoint.py) round-trips it
    q4 = weight_from_state(*weight_state(q2))
    assert type(q4) is type(q2) and torch.equal(q4.dequantize(), q2.dequantize())
    assert q4.storage().bits == q2.storage().bits


@pytest.mark.parametrize("extra", [{}, {"scaling_blocksize": 16}, {"svd_rank": 0.5}, {"svd_rank": 0.5, "cbits": 16}])
def test_reference_stores_what_it_counts(extra):
    """variant=reference: dequantize() reads only the stored tensors (int8 codebooks, float16
    scales, SVD factors, packed normalisation codes), they are counted, and without the update the
    stored weight is the loop's within the float16 rounding of the codebook scales."""
    W, H = _layer(48, 96, seed=5)
    d = 1 if "svd_rank" in extra else 2
    cb = extra.get("cbits", 8)
    s = Scheme(vq_dim=d, num_centroids=8, rows_per_group=16, columns_per_group=48, codebook_bits=cb,
               scaling_blocksize=extra.get("scaling_blocksize", 0), svd_rank=extra.get("svd_rank", 0.0))
    upd = 5 if "svd_rank" in extra else 0
    q, res = gptvq_quantize(W, H, s, kmeans_iters=5, update_iters=upd, block_size=48)
    st = q.storage()
    assert st.total_bits / st.numel == pytest.approx(s.total_bits(48, 96))
    if s.svd_rank:
        assert q.svd_basis.shape == (s.rank, 8) and q.svd_basis.dtype == torch.float16
        assert q.codebooks.shape == (6, s.rank) and st.bits["svd_basis"] == s.rank * 8 * 16
    if s.scaling_blocksize:
        assert st.bits["norms"] == math.ceil(48 * 6 * 4 / 8) * 8 + 6 * 2 * 32
    if not upd:
        assert torch.allclose(res.Q, q.dequantize(), rtol=2.0**-10, atol=0)
    q4 = weight_from_state(*weight_state(q))  # the per-block checkpoint format round-trips it
    assert torch.equal(q4.dequantize(), q.dequantize()) and q4.storage().bits == st.bits
    q5, _ = gptvq_quantize(W, H, s, kmeans_iters=5, update_iters=upd, block_size=48)
    assert torch.equal(q5.packed, q.packed) and torch.equal(q5.codebooks, q.codebooks)  # deterministic


def test_variants_presets_and_settings():
    m = GPTVQ(GPTVQ.Config(), bits=2)
    assert (m.kmeans_iters, m.update_iters) == (10, 25)
    assert (GPTVQ(GPTVQ.Config(iters="paper"), bits=2).kmeans_iters, GPTVQ(GPTVQ.Config(variant="exact"),
                                                                            bits=2).update_iters) == (100, 10)
    assert GPTVQ(GPTVQ.Config(iters="paper", kmeans_iters=7), bits=2).kmeans_iters == 7  # explicit wins
    plan = m.plan([(64, 256), (32, 256)])
    st = m.settings(plan)
    assert st["variant"] == "reference" and st["iters"] == "cpu" and "64x256" in st and "assign_metric" not in st
    with pytest.raises(ValueError, match=r"method.variant='paper'; valid: reference, exact"):
        GPTVQ(GPTVQ.Config(variant="paper"), bits=2)
    with pytest.raises(ValueError, match=r"method.iters='fast'; valid: cpu, paper"):
        GPTVQ(GPTVQ.Config(iters="fast"), bits=2)
    with pytest.raises(ValueError, match=r"assign_metric='block' is a choice of variant=exact"):
        GPTVQ(GPTVQ.Config(assign_metric="block"), bits=2)
    with pytest.raises(ValueError, match=r"parts of variant=reference"):
        GPTVQ(GPTVQ.Config(variant="exact", svd_rank=0.5), bits=2)
    with pytest.raises(BudgetError, match=r"svd_rank=0.5 needs vq_dim=1"):
        GPTVQ(GPTVQ.Config(vq_dim=2, svd_rank=0.5), bits=2).check_budget([(64, 256)])
    # SVD and normalisation are counted in the budget: the plan stays within bits + tolerance
    for cfg in (GPTVQ.Config(svd_rank=0.5), GPTVQ.Config(vq_scaling_blocksize=32)):
        p = GPTVQ(cfg, bits=3).layer_plan(576, 576)
        assert p.total_bits(576, 576) <= 3.1 and (p.svd_rank or p.scaling_blocksize)


@pytest.mark.parametrize("nbits", [1, 2, 3, 5, 7, 8, 11, 12])
def test_pack_round_trip(nbits):
    x = torch.randint(0, 2**nbits, (7, 13), generator=torch.Generator().manual_seed(nbits))
    p = pack_bits(x, nbits)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(x.numel() * nbits / 8)
    assert torch.equal(unpack_bits(p, nbits, x.numel()).reshape(7, 13), x)


def test_codebook_update_and_assignment_pieces():
    W, H = _layer(32, 64, seed=4)
    s = Scheme(vq_dim=2, num_centroids=8, rows_per_group=32, columns_per_group=32, codebook_bits=16)
    q, _ = gptvq_quantize(W, H, s, variant="exact", kmeans_iters=3, update_iters=0)
    from baselines.gptvq import codebook_ids

    ids = codebook_ids(32, 64, 2, 32, 32, "cpu") * 8 + q.indices()
    C, before, after = update_codebooks(W, H, q.codebook_values().reshape(-1, 2), ids, 5)
    assert after < 0.99 * before
    assert after == pytest.approx(proxy_loss(W, C[ids].reshape(32, 64), H), rel=1e-4)
    # weighted assignment == brute force
    X = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(0))
    Wt = torch.rand(50, 4, generator=torch.Generator().manual_seed(1)) + 0.1
    Cb = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(2))
    dist = ((X[:, :, None].double() - Cb[:, None].double()) ** 2 * Wt[None, :, None].double()).sum(-1)  # (3, 50, 16)
    got = weighted_assign(X, Wt, Cb)
    # the expanded one-matmul form sums in another order than the brute-force difference form: a near-tie may
    # resolve the other way on another CPU/BLAS, so the chosen centroid's distance must be the minimum up to fp32
    # rounding, not the same index
    chosen = dist.gather(2, got[..., None])[..., 0]
    best = dist.min(-1).values
    assert bool((chosen <= best + 1e-5 * (1 + best)).all())
    assert (got == dist.argmin(-1)).float().mean() > 0.95  # and almost always the very same index
    # the reference's lookups (expanded form) against their difference form: other arithmetic,
    # so equal but for near ties (none among these 150 random points)
    from baselines.gptvq import assign_by_difference, assign_reference

    for w in (None, Wt[:1], Wt):
        assert torch.equal(assign_reference(X, Cb, w), assign_by_difference(X, Cb, w))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 64), (32, 64), (64, 160)])
def test_budget_rule_stays_within_budget(bits, shape):
    s = choose_scheme(*shape, bits=bits, tolerance=0.1)
    total = s.total_bits(*shape)
    assert total <= bits + 0.1
    assert shape[1] % s.columns_per_group == 0 and shape[0] % s.rows_per_group == 0
    assert s.columns_per_group % s.vq_dim == 0
    if shape[0] * shape[1] >= 576 * 192:  # big enough that the codebooks fit at full index bits
        assert s.index_bits / s.vq_dim == bits
    if shape == (576, 576):
        assert (s.vq_dim, s.num_centroids) == {2: (4, 256), 3: (2, 64), 4: (2, 256)}[bits]


def test_bad_schemes_name_the_nearest_valid_choices():
    with pytest.raises(BudgetError, match=r"bits=0.1 .*impossible.*nearest valid: bits >= "):
        choose_scheme(576, 576, bits=0.1, tolerance=0.1)
    with pytest.raises(BudgetError, match=r"columns_per_group=6 is not a multiple of vq_dim=4.*\[4, 8\]"):
        choose_scheme(576, 576, bits=2, tolerance=0.1, vq_dim=4, columns_per_group=6)
    with pytest.raises(BudgetError, match=r"columns_per_group=100 does not divide in_features=576.*\[96, 144\]"):
        choose_scheme(576, 576, bits=2, tolerance=0.1, vq_dim=4, columns_per_group=100)
    with pytest.raises(BudgetError, match=r"group_size=1000 cannot tile.*nearest valid group_size"):
        choose_scheme(576, 576, bits=2, tolerance=0.1, vq_dim=2, group_size=1000)
    with pytest.raises(BudgetError, match=r"vq_dim=4 does not divide in_features=90.*valid vq_dim: \[1, 2\]"):
        choose_scheme(64, 90, bits=2, tolerance=0.1, vq_dim=4)
    with pytest.raises(BudgetError, match=r"impossible.*group_size >= \d+.*bits >= "):
        choose_scheme(576, 576, bits=2, tolerance=0.1, vq_dim=2, num_centroids=16, group_size=1152)
    with pytest.raises(BudgetError, match=r"impossible.*num_centroids <= 16"):
        choose_scheme(576, 576, bits=2, tolerance=0.1, vq_dim=2, num_centroids=256, group_size=4608)
    with pytest.raises(BudgetError, match=r"vq_dim=3 is not supported; valid: 1, 2, 4"):
        GPTVQ(GPTVQ.Config(vq_dim=3), bits=2).check_budget([(64, 64)])
    with pytest.raises(BudgetError, match=r"num_centroids=100 must be a power of two.*\[64, 128\]"):
        GPTVQ(GPTVQ.Config(num_centroids=100), bits=2).check_budget([(64, 64)])
    with pytest.raises(ValueError, match=r"assign_metric='l2'; valid: block, diag"):
        GPTVQ(GPTVQ.Config(assign_metric="l2"), bits=2)


def test_nan_weights_name_the_layer():
    W, H = _layer(32, 64)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"3\.mlp\.up_proj: weight contains NaN or Inf"):
        GPTVQ(GPTVQ.Config(), bits=4).quantize_layer(W, H, name="3.mlp.up_proj")
    W[1, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"3\.mlp\.up_proj: weight contains NaN or Inf"):
        GPTVQ(GPTVQ.Config(), bits=4).quantize_layer(W, H, name="3.mlp.up_proj")
