"""VPTQ quantizer (vptq/quantizer.py): proxy-loss orderings at equal total bits, the stored
weight == what the solver optimised, determinism, residual/outliers/groups/norm, the variants
and iteration presets (the reference's choices checked as properties: microsoft/VPTQ's code
needs cuml on a GPU and cannot run here), bad input."""
from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import correlated_hessian, snr_db

from baselines.scalar import ScalarGrid
from vptq.budget import LayerConfig, storage_bits
from vptq.hessian import proxy_loss, relative_proxy_loss
from vptq.methods import build_method
from vptq.quantizer import VPTQ, QuantOptions, quantize_weight
from vptq.solver import error_feedback, prepare_hessian


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _layer(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails and uneven row scales, like LLM weights
    W = torch.randn(out_f, in_f, generator=g) * torch.exp(0.3 * torch.randn(out_f, 1, generator=g))
    W = W + 0.5 * torch.randn(out_f, in_f, generator=g) ** 3 / 3
    return W * 0.02


def _scalar_total(out_f, in_f, wbits, gs):
    return wbits + (in_f // gs) * (16 + wbits) / in_f


def _rtn(W, wbits, gs):
    grid = ScalarGrid(wbits)
    Q = torch.empty_like(W)
    for c0 in range(0, W.shape[1], gs):
        s, z = grid.fit(W[:, c0:c0 + gs])
        Q[:, c0:c0 + gs] = grid.dequantize(grid.quantize(W[:, c0:c0 + gs], s, z), s, z)
    return Q


def _gptq(W, H, wbits, gs):
    """GPTQ-like scalar baseline: min-max grid per (row, group of gs columns) fitted on W
    (GPTQ's static groups), codes placed by the shared second-order loop."""
    grid = ScalarGrid(wbits)
    Wc, Hc, _ = prepare_hessian(W, H)
    fits = [grid.fit(Wc[:, c0:c0 + gs]) for c0 in range(0, Wc.shape[1], gs)]

    def qcols(col, Wcol):
        s, z = fits[col // gs]
        return grid.dequantize(grid.quantize(Wcol, s, z), s, z)

    return error_feedback(Wc, Hc, qcols, block_size=128, step=1).Q


@pytest.mark.parametrize("shape,bits", [((512, 512), 2.0), ((256, 512), 3.0)])
def test_vptq_beats_scalar_at_equal_total_bits(shape, bits):
    out_f, in_f = shape
    W = _layer(out_f, in_f)
    H = correlated_hessian(in_f, seed=1)
    m = build_method("vptq", VPTQ.Config(), bits=bits, seed=0)
    q = m.quantize_layer(W, H, name="syn")
    st = q.storage()
    vptq_total = st.total_bits / st.numel
    assert vptq_total <= bits + 0.1
    # the scalar baselines get AT LEAST as many total bits: integer codes, smallest group
    # size (power of two) whose total reaches VPTQ's
    wbits = int(bits)
    gs = in_f
    while _scalar_total(out_f, in_f, wbits, gs) < vptq_total:
        gs //= 2
    assert _scalar_total(out_f, in_f, wbits, gs) >= vptq_total
    l_vptq = proxy_loss(W, q.dequantize(), H)
    l_rtn = proxy_loss(W, _rtn(W, wbits, gs), H)
    l_gptq = proxy_loss(W, _gptq(W, H, wbits, gs), H)
    assert l_gptq < l_rtn
    assert l_vptq < 0.9 * l_gptq, (l_vptq, l_gptq, l_rtn)


@pytest.mark.parametrize("residual_init", ["kmeans", "feedback"])
def test_residual_lowers_proxy_loss(residual_init):
    W = _layer(256, 256, seed=2)
    H = correlated_hessian(256, seed=2)
    base = LayerConfig(vector_len=4, num_centroids=64)
    q0, _ = quantize_weight(W, H, base, seed=3)
    q1, info = quantize_weight(W, H, LayerConfig(vector_len=4, num_centroids=64, num_res_centroids=16), seed=3,
                               opts=QuantOptions(residual_init=residual_init))
    l0, l1 = proxy_loss(W, q0.dequantize(), H), proxy_loss(W, q1.dequantize(), H)
    assert l1 < 0.8 * l0, (l0, l1)
    assert torch.allclose(q1.dequantize(), info["Q"], atol=1e-6)  # the stored two-stage codes


def test_error_feedback_beats_plain_assignment():
    """The second-order loop must lower the proxy loss vs nearest-centroid on the k-means codebook."""
    W = _layer(256, 256, seed=4)
    H = correlated_hessian(256, seed=4)
    cfg = LayerConfig(vector_len=4, num_centroids=64, perm=False)
    q, _ = quantize_weight(W, H, cfg, seed=0)
    C = q.centroids[0].float()  # (k, v)
    X = W.t().reshape(-1, 4)  # (in*n, v) column-major vectors
    from vptq.kmeans import assign

    a = assign(X, C)
    plain = C[a].reshape(256, 256).t()
    assert proxy_loss(W, q.dequantize(), H) < 0.8 * proxy_loss(W, plain, H)


CONFIGS = [
    LayerConfig(vector_len=4, num_centroids=64),
    # the paper's Table 8 shape (outliers with their own codebook + a residual pair on the rest), scaled down
    LayerConfig(vector_len=6, num_centroids=32, num_res_centroids=16, outlier_size=4, outlier_vector_len=4,
                outlier_num_centroids=32),
    LayerConfig(vector_len=3, num_centroids=32, num_res_centroids=8, perm=False),
    LayerConfig(vector_len=4, num_centroids=32, group_num=2, norm=True),
    LayerConfig(vector_len=4, num_centroids=32, outlier_size=6, outlier_vector_len=2, outlier_num_centroids=64),
    LayerConfig(vector_len=5, num_centroids=16, outlier_size=4, outlier_vector_len=3, outlier_num_centroids=16,
                perm=False, group_num=3, norm=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short())
@pytest.mark.parametrize("out_f", [96, 98])  # 98: not a multiple of v -> padding rows
def test_stored_weight_is_what_the_solver_optimised(cfg, out_f):
    in_f = 64
    W = _layer(out_f, in_f, seed=5)
    H = correlated_hessian(in_f, seed=5)
    q, info = quantize_weight(W, H, cfg, seed=1)
    Wq = q.dequantize()
    assert Wq.shape == (out_f, in_f)
    # the solver's own result (float16-rounded codebooks, normalised space) == stored weight
    Q = info["Q"]
    if q.weight_scale is not None:
        Q = Q * q.weight_scale.float()[None] + q.weight_bias.float()[None]
    assert torch.allclose(Wq, Q, atol=1e-6, rtol=1e-5)
    # storage: what the budget predicts, padding rows included
    st = q.storage()
    assert st.bits == storage_bits(out_f, in_f, cfg)
    n = math.ceil(out_f / cfg.vector_len)
    assert q.indices.shape == (cfg.group_num, n, (in_f - cfg.outlier_size) // cfg.group_num)
    assert q.centroids.dtype == torch.float16
    assert relative_proxy_loss(W, Wq, H) < 0.15  # measured 0.008-0.08
    if cfg.outlier_size:
        # the outlier columns are the most Hessian-important ones
        d = torch.diagonal(H)
        if q.weight_scale is not None:
            d = d * q.weight_scale.float() ** 2
        top = torch.sort(d, descending=True, stable=True).indices[: cfg.outlier_size]
        assert set(q.perm[: cfg.outlier_size].tolist()) == set(top.tolist())


def test_same_seed_same_codes_different_seed_different_codes():
    W = _layer(128, 128, seed=6)
    H = correlated_hessian(128, seed=6)
    cfg = VPTQ.Config(vector_len=4, num_centroids=32, num_res_centroids=4)
    a = build_method("vptq", cfg, bits=2.0, seed=0).quantize_layer(W, H, name="0.q")
    b = build_method("vptq", cfg, bits=2.0, seed=0).quantize_layer(W, H, name="0.q")
    c = build_method("vptq", cfg, bits=2.0, seed=1).quantize_layer(W, H, name="0.q")
    d = build_method("vptq", cfg, bits=2.0, seed=0).quantize_layer(W, H, name="1.q")
    assert a.perm is None and b.perm is None  # one group, no outliers: the act order is absorbed
    for name in ("centroids", "indices", "res_centroids", "res_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.centroids, c.centroids)
    assert not torch.equal(a.indices, c.indices)
    assert not torch.equal(a.centroids, d.centroids)  # per-layer seed


@pytest.mark.parametrize("norm_hessian", ["scaled", "raw"])
def test_norm_weighting_modes_run_and_scaled_is_consistent(norm_hessian):
    W = _layer(128, 128, seed=7) * torch.linspace(0.2, 3.0, 128)[None]  # uneven column ranges
    H = correlated_hessian(128, seed=7)
    cfg = LayerConfig(vector_len=4, num_centroids=32, norm=True)
    q, info = quantize_weight(W, H, cfg, seed=0, opts=QuantOptions(norm_hessian=norm_hessian))
    Wq = q.dequantize()
    assert torch.isfinite(Wq).all() and relative_proxy_loss(W, Wq, H) < 0.15
    if norm_hessian == "scaled":
        # the solver's loss is the true proxy loss (up to damping) only with diag(s) H diag(s)
        Wc, Hc, _ = prepare_hessian(W, H)
        true = proxy_loss(Wc, Wq, Hc)
        assert info["solver_loss"] == pytest.approx(true, rel=0.25)


def test_raw_norm_hessian_is_the_reference_loss():
    """variant=reference (norm_hessian raw): the error feedback minimises tr(ΔW' H ΔW'ᵀ) of the
    NORMALISED weight under the raw H, as the algorithm branch's `vptq()` does: the solver's
    loss is that quantity (hand-computed here), not the layer's proxy loss."""
    W = _layer(128, 128, seed=8) * torch.linspace(0.2, 3.0, 128)[None]
    H = correlated_hessian(128, seed=8)
    cfg = LayerConfig(vector_len=4, num_centroids=32, norm=True, perm=False)
    q, info = quantize_weight(W, H, cfg, seed=0, opts=QuantOptions(norm_hessian="raw", kmeans_init="random",
                                                                    residual_init="feedback"))
    Wc, Hc, _ = prepare_hessian(W, H)
    s, b = q.weight_scale.float(), q.weight_bias.float()
    Wn = (Wc - b[None]) / s[None]  # the normalised weight, from the stored norms
    Hd = Hc.clone()
    Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
    assert info["solver_loss"] == pytest.approx(proxy_loss(Wn, info["Q"], Hd), rel=1e-3)
    assert torch.allclose(q.dequantize(), info["Q"] * s[None] + b[None], rtol=1e-5, atol=1e-6)


def test_random_init_takes_distinct_vectors():
    """kmeans_init=random (cuml's init="random"): k distinct training vectors; with k = N every
    vector is its own centroid after one Lloyd step, for any seed."""
    from vptq.kmeans import kmeans

    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    for seed in (0, 1):
        r = kmeans(X, 40, seed=seed, iters=1, init_method="random")
        assert torch.equal(torch.sort(r.labels).values, torch.arange(40))
        assert r.inertia < 1e-5  # 0 up to the rounding of the expanded distance ||c||² - 2x·c + ||x||²
    a = kmeans(X, 5, seed=3, iters=5, init_method="random")
    b = kmeans(X, 5, seed=3, iters=5, init_method="random")
    assert torch.equal(a.centroids, b.centroids)  # bitwise: same call twice


def test_variants_and_iteration_presets():
    ref, sc = VPTQ(VPTQ.Config(), bits=2.0), VPTQ(VPTQ.Config(variant="scaled"), bits=2.0)
    assert (ref.opts.norm_hessian, ref.opts.residual_init, ref.opts.kmeans_init) == ("raw", "feedback", "random")
    assert (sc.opts.norm_hessian, sc.opts.residual_init, sc.opts.kmeans_init) == ("scaled", "kmeans", "kmeans++")
    assert (ref.opts.kmeans_iters, ref.opts.kmeans_tol, ref.opts.kmeans_max_train) == (10, 1e-3, 32768)
    paper = VPTQ(VPTQ.Config(iters="paper"), bits=2.0).opts
    assert (paper.kmeans_iters, paper.kmeans_tol, paper.kmeans_max_train) == (100, 1e-5, None)
    mixed = VPTQ(VPTQ.Config(iters="paper", kmeans_iters=7, kmeans_max_train=4096, residual_init="kmeans"),
                 bits=2.0).opts  # explicit fields win over the variant and the preset
    assert (mixed.kmeans_iters, mixed.kmeans_max_train, mixed.residual_init, mixed.norm_hessian) == \
        (7, 4096, "kmeans", "raw")
    assert VPTQ(VPTQ.Config(kmeans_max_train=None), bits=2.0).opts.kmeans_max_train is None  # null: every vector
    m = VPTQ(VPTQ.Config(), bits=2.0)
    st = m.settings(m.plan([(576, 576)]))
    assert st["variant"] == "reference" and st["iters"] == "cpu" and "576x576" in st
    with pytest.raises(ValueError, match=r"method.variant='exact'; valid: reference, scaled"):
        VPTQ(VPTQ.Config(variant="exact"), bits=2.0)
    with pytest.raises(ValueError, match=r"method.iters='full'; valid: cpu, paper"):
        VPTQ(VPTQ.Config(iters="full"), bits=2.0)


# ------------------------------------------------------------------ bad / odd input
def test_nan_inf_weight_names_the_layer():
    m = build_method("vptq", VPTQ.Config(vector_len=4, num_centroids=16), bits=2.0)
    H = correlated_hessian(64)
    for bad in (float("nan"), float("inf")):
        W = _layer(64, 64)
        W[3, 5] = bad
        with pytest.raises(ValueError, match="12.mlp.up_proj.*NaN or Inf"):
            m.quantize_layer(W, H, name="12.mlp.up_proj")


def test_missing_or_empty_hessian_is_a_clear_error():
    m = build_method("vptq", VPTQ.Config(vector_len=4, num_centroids=16), bits=2.0)
    W = _layer(64, 64)
    with pytest.raises(ValueError, match="0.q_proj.*Hessian"):
        m.quantize_layer(W, None, name="0.q_proj")
    with pytest.raises(ValueError, match="0.q_proj.*calibration"):
        m.quantize_layer(W, torch.zeros(64, 64), name="0.q_proj")


def test_dead_hessian_columns_are_handled():
    W = _layer(64, 64, seed=8)
    H = correlated_hessian(64, seed=8)
    dead = torch.tensor([0, 7, 33])
    H[dead, :] = 0
    H[:, dead] = 0
    q, info = quantize_weight(W, H, LayerConfig(vector_len=4, num_centroids=16), seed=0)
    Wq = q.dequantize()
    assert torch.isfinite(Wq).all()
    live = torch.ones(64, dtype=torch.bool)
    live[dead] = False
    assert relative_proxy_loss(W[:, live], Wq[:, live], H[live][:, live]) < 0.15
    # dead columns come last in act order (absorbed into the index order: one group, no outliers)
    assert q.perm is None and set(info["order"][-3:].tolist()) == set(dead.tolist())


def test_massive_activation_column():
    """One input column holding ~90% of diag(H) (SmolLM2's down_proj in some blocks): the
    Hessian-weighted codebook must serve it (a plain uniform k-means subsample did not:
    relative proxy loss 0.62 on the real layer)."""
    W = _layer(256, 512, seed=9)
    H = correlated_hessian(512, seed=9)
    H[100, :] *= 300.0
    H[:, 100] *= 300.0  # column 100: ~0.9 of diag(H)
    share = float(H[100, 100] / torch.diagonal(H).sum())
    assert share > 0.8
    cfg = VPTQ.Config(vector_len=4, num_centroids=64, kmeans_max_train=2048)
    q = build_method("vptq", cfg, bits=2.0).quantize_layer(W, H, name="massive")
    assert relative_proxy_loss(W, q.dequantize(), H) < 0.02


@pytest.mark.parametrize("field,value", [("norm_hessian", "diag"), ("residual_init", "random"), ("kmeans_iters", 0),
                                         ("kmeans_init", "kmeans||")])
def test_bad_algorithm_options(field, value):
    with pytest.raises(ValueError, match=field):
        build_method("vptq", VPTQ.Config(**{field: value}), bits=2.0)


def test_vqweight_holds_indices_narrow_and_rejects_out_of_range():
    """uint8 for k <= 256, int16 for k <= 32768, uint16 for k <= 65536 (2 bytes, not 4, for the released
    VPTQ 65536-entry codebooks), int32 above; the same weight as from int64 indices."""
    import pytest as _pytest

    from vptq.vqweight import VQWeight

    g = torch.Generator().manual_seed(0)
    for k, dt in ((16, torch.uint8), (256, torch.uint8), (4096, torch.int16), (32769, torch.uint16),
                  (65536, torch.uint16), (65537, torch.int32)):
        idx = torch.randint(0, k, (1, 3, 8), generator=g)
        kw = dict(out_features=12, in_features=8, vector_len=4, num_centroids=k, group_num=1, group_size=8,
                  centroids=torch.randn(1, k, 4, generator=g).half(), indices=idx,
                  num_res_centroids=16, res_centroids=torch.randn(1, 16, 4, generator=g).half(),
                  res_indices=torch.randint(0, 16, (1, 3, 8), generator=g))
        q = VQWeight(**kw)
        assert q.indices.dtype == dt and q.res_indices.dtype == torch.uint8
        assert torch.equal(q.indices.long(), idx)
        ref = (kw["centroids"].float()[0, idx[0]] + kw["res_centroids"].float()[0, kw["res_indices"][0]])
        ref = ref.permute(0, 2, 1).reshape(12, 8)  # rows r*v + lane, column c
        assert torch.equal(q.dequantize(torch.float32), ref)
        with _pytest.raises(ValueError, match=r"indices values outside \[0, %d\)" % k):
            VQWeight(**{**kw, "indices": idx + k})


ABSORB = [
    LayerConfig(vector_len=4, num_centroids=64),
    LayerConfig(vector_len=3, num_centroids=32, num_res_centroids=8, norm=True),
]


@pytest.mark.parametrize("cfg", ABSORB, ids=lambda c: c.short())
@pytest.mark.parametrize("out_f", [48, 50])  # 50: padding rows
def test_act_order_is_absorbed_with_one_group(cfg, out_f, monkeypatch):
    """One group, no outliers: the same quantization with the permutation stored (absorption switched
    off) and with it absorbed into the index order dequantizes bitwise identically; the absorbed one
    stores no perm and costs exactly 16 bits per input column less, as the budget counts."""
    import vptq.quantizer as Q
    from vptq.budget import stores_perm

    in_f = 64
    W, H = _layer(out_f, in_f, seed=11), correlated_hessian(in_f, seed=11)
    q, info = quantize_weight(W, H, cfg, seed=3)
    monkeypatch.setattr(Q, "stores_perm", lambda c: True)
    qp, _ = quantize_weight(W, H, cfg, seed=3)
    monkeypatch.undo()
    assert q.perm is None and qp.perm is not None and torch.equal(qp.perm, info["order"])
    assert not torch.equal(info["order"], torch.arange(in_f))  # a real permutation was absorbed
    assert torch.equal(q.dequantize(), qp.dequantize())
    assert torch.equal(q.indices, qp.indices[:, :, torch.argsort(qp.perm)])
    assert not stores_perm(cfg) and "perm" not in q.storage().bits
    assert qp.storage().total_bits - q.storage().total_bits == 16 * in_f
    assert q.storage().bits == storage_bits(out_f, in_f, cfg)


def test_groups_and_outliers_keep_their_stored_order():
    """Several groups, or outlier columns: a column's codebook follows from its stored position, so the
    order stays stored (and counted)."""
    W, H = _layer(48, 64, seed=12), correlated_hessian(64, seed=12)
    for cfg in (LayerConfig(vector_len=4, num_centroids=16, group_num=2),
                LayerConfig(vector_len=4, num_centroids=16, perm=False, outlier_size=4, outlier_vector_len=2,
                            outlier_num_centroids=16)):
        q, info = quantize_weight(W, H, cfg, seed=0)
        assert q.perm is not None and torch.equal(q.perm, info["order"])
        assert q.storage().bits["perm"] == 16 * 64 == storage_bits(48, 64, cfg)["perm"]
    q, info = quantize_weight(W, H, LayerConfig(vector_len=4, num_centroids=16, group_num=2, perm=False), seed=0)
    assert q.perm is None and info["order"] is None  # groups in the original order: nothing to store
