"""Weighted k-means (vptq/kmeans.py): objective vs scikit-learn, determinism, edge cases."""
from __future__ import annotations

import pytest
import torch

from vptq.kmeans import assign, kmeans


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _data(n, v, seed, weighted):
    g = torch.Generator().manual_seed(seed)
    # a mixture with uneven scales, like weight vectors
    X = torch.randn(n, v, generator=g) * torch.linspace(0.5, 2.0, v)
    X[: n // 5] += 3.0
    w = (torch.rand(n, generator=g) * 4 + 0.05) if weighted else None
    return X, w


def _objective(X, w, C, labels):
    w = torch.ones(X.shape[0]) if w is None else w
    return float((w.double() * ((X.double() - C.double()[labels]) ** 2).sum(1)).sum())


@pytest.mark.parametrize("k,v,weighted", [(8, 2, False), (16, 4, True), (64, 3, True), (32, 6, True)])
def test_objective_close_to_sklearn(k, v, weighted):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    X, w = _data(1500, v, seed=k + v, weighted=weighted)
    r = kmeans(X, k, weights=w, seed=0, iters=100, tol=1e-7, init_sample=10**6)
    ours = _objective(X, w, r.centroids, r.labels)
    # the reported inertia is the true objective of what is returned, labels are nearest
    assert abs(ours - r.inertia) <= 1e-4 * ours
    assert torch.equal(r.labels, assign(X, r.centroids))
    with threadpool_limits(1):
        sk = KMeans(k, n_init=10, random_state=0, tol=1e-7, max_iter=300).fit(
            X.numpy(), sample_weight=None if w is None else w.numpy())
    best = float(sk.inertia_)
    assert ours <= 1.05 * best, (ours, best)
    # beating sklearn's best-of-10 by more than a few % would mean a broken objective
    assert ours >= 0.97 * best, (ours, best)


def test_seeded_and_reproducible():
    X, w = _data(3000, 4, seed=1, weighted=True)
    a = kmeans(X, 32, weights=w, seed=5, max_train=1000, init_sample=500)
    b = kmeans(X, 32, weights=w, seed=5, max_train=1000, init_sample=500)
    c = kmeans(X, 32, weights=w, seed=6, max_train=1000, init_sample=500)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.centroids, c.centroids)


def test_subsampled_training_is_close_to_full():
    X, w = _data(20000, 4, seed=2, weighted=True)
    full = kmeans(X, 64, weights=w, seed=0, iters=30)
    sub = kmeans(X, 64, weights=w, seed=0, iters=30, max_train=4096, init_sample=2048)
    assert sub.labels.shape == (20000,)
    assert sub.inertia <= 1.08 * full.inertia


def test_empty_clusters_and_duplicates():
    # 5 distinct points, 8 clusters: some clusters must be re-seeded or stay duplicates
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [-3.0, 2.0]])
    X = base.repeat(40, 1)
    r1 = kmeans(X, 8, seed=0, iters=20)
    r2 = kmeans(X, 8, seed=0, iters=20)
    assert torch.isfinite(r1.centroids).all()
    assert r1.inertia == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(r1.centroids, r2.centroids)


def test_zero_weights_ignored_and_all_zero_fallback():
    X, _ = _data(500, 3, seed=3, weighted=False)
    far = torch.full((1, 3), 1e3)
    w = torch.cat([torch.ones(500), torch.zeros(1)])
    r = kmeans(torch.cat([X, far]), 4, weights=w, seed=0)
    assert float(r.centroids.abs().max()) < 100  # the weight-0 outlier never pulls a centroid
    z = kmeans(X, 4, weights=torch.zeros(500), seed=0)  # all zero -> uniform
    u = kmeans(X, 4, seed=0)
    assert torch.equal(z.centroids, u.centroids)


def test_partial_vectors_ignore_padding():
    X, w = _data(600, 4, seed=4, weighted=True)
    valid = torch.full((600,), 4)
    valid[::6] = 2  # every 6th vector has only 2 existing coordinates
    Y = X.clone()
    Y[::6, 2:] = 1e4  # garbage in the padding: must not matter
    a = kmeans(X, 16, weights=w, valid=valid, seed=0)
    b = kmeans(Y, 16, weights=w, valid=valid, seed=0)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    # masked assignment == assignment on the existing coordinates only
    la = assign(Y, a.centroids, valid)
    rows = torch.arange(0, 600, 6)
    assert torch.equal(la[rows], assign(Y[rows, :2], a.centroids[:, :2]))


@pytest.mark.parametrize("bad", ["nan", "shape", "k0", "neg_w"])
def test_bad_input(bad):
    X = torch.randn(100, 4)
    with pytest.raises(ValueError):
        if bad == "nan":
            X[3, 1] = float("nan")
            kmeans(X, 4)
        elif bad == "shape":
            kmeans(X.reshape(-1), 4)
        elif bad == "k0":
            kmeans(X, 0)
        else:
            kmeans(X, 4, weights=-torch.ones(100))


def test_subsample_keeps_the_heavy_vectors():
    """A few vectors carrying most of the weight (a massive-activation column) must be
    clustered well even when Lloyd runs on a small subsample."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(50000, 4, generator=g)
    w = torch.ones(50000)
    heavy = torch.arange(0, 50000, 500)  # 100 vectors, 99% of the weight
    w[heavy] = 5000.0
    sub = kmeans(X, 128, weights=w, seed=0, max_train=4096, init_sample=2048)
    full = kmeans(X, 128, weights=w, seed=0)
    assert sub.inertia <= 1.15 * full.inertia, (sub.inertia, full.inertia)
    err_heavy = ((X[heavy] - sub.centroids[sub.labels[heavy]]) ** 2).sum(1).mean()
    assert err_heavy < 0.05 * ((X[heavy] - X[heavy].mean(0)) ** 2).sum(1).mean()
