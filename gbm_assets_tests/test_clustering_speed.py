"""Clustering's speed-ups change no result: umap's small-data distances compiled, its numba code cached."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import pairwise_distances

from gbm_assets.analysis import clustering
from gbm_assets.analysis.clustering import ClusteringConfig, fit_clusters, umap


def _cells(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(3, d))
    return (centres[rng.integers(0, 3, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_small_data_distances_are_sklearns_loop_bit_for_bit():
    x = _cells(n=150, d=37)  # an odd width: a vectorised sum would show in the last bits
    euclidean = umap.distances.euclidean
    expected = pairwise_distances(x, metric=euclidean)  # what umap asked sklearn for before: a Python loop
    got = umap.umap_.pairwise_distances(x, metric=euclidean)
    assert got.dtype == expected.dtype == np.float32
    assert np.array_equal(got, expected)
    # Anything else still goes to sklearn unchanged: another metric, a second matrix, NaN.
    assert np.array_equal(
        umap.umap_.pairwise_distances(x, metric=umap.distances.manhattan),
        pairwise_distances(x, metric=umap.distances.manhattan),
    )
    assert np.array_equal(
        umap.umap_.pairwise_distances(x[:5], x[5:9], metric=euclidean),
        pairwise_distances(x[:5], x[5:9], metric=euclidean),
    )
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        umap.umap_.pairwise_distances(bad, metric=euclidean)


def test_umap_layout_is_the_same_with_the_compiled_distances(monkeypatch):
    config = ClusteringConfig(umap_n_epochs=50)
    x = _cells()
    fast, _ = fit_clusters(x, config)
    monkeypatch.setattr(umap.umap_, "pairwise_distances", clustering._sklearn_pairwise_distances)
    slow, _ = fit_clusters(x, config)
    assert fast.umap.embedding_.tobytes() == slow.umap.embedding_.tobytes()
    assert fast.fingerprint() == slow.fingerprint()


def test_umaps_numba_functions_are_compiled_once_and_cached_on_disk():
    from numba.core.caching import NullCache

    jitted = [
        getattr(umap.umap_, name)
        for name in ("smooth_knn_dist", "compute_membership_strengths", "fast_intersection", "init_transform")
    ] + [umap.utils.fast_knn_indices, umap.layouts._nb_optimize_layout_euclidean_single_epoch]
    assert all(not isinstance(f._cache, NullCache) for f in jitted)
    assert clustering.N_UMAP_FUNCTIONS_CACHED >= len(jitted)
