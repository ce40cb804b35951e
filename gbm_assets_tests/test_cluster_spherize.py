"""Spherized clustering (ClusteringConfig.preprocess="spherize") and the variant's own clustering
defaults (Variant.cluster_vector / cluster_preprocess, issue 13).

Measured on siamese_b_ds2_cell's embeddings of hard synthetic plates: the first principal
component (the cell's area) carries ~90 % of the variance, stars and large flat cells have about
the same area, and what tells them apart lies in components of 0.2-6 % of it, above ~100
components of noise. planted() builds that geometry with known types.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from gbm_assets.analysis.clustering import ClusteringConfig, fit_clusters, fit_feature_transform
from gbm_assets.assets.clusters import ClusterConfig
from gbm_assets.models.variants import VARIANTS, get_variant

FAST = dict(seed=0, umap_n_epochs=80, gmm_components=4, auto_k_max=6, auto_k_stability_runs=2)


def planted(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 128) float32 embedding-like vectors and their type (4 types).

    One "area" direction, uniform and independent of the type, holds ~97 % of the variance; the
    types sit at the corners of a tetrahedron in 3 directions (each ~0.6 % of the variance);
    124 directions of noise hold ~0.005 % each.
    """
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 4, n)
    corners = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
    area = rng.uniform(-0.5, 0.5, (n, 1)) * 60.0  # variance 300
    shape = corners[types] * 1.3 + rng.normal(0, 0.5, (n, 3))  # variance ~1.9 each
    noise = rng.normal(0, 0.12, (n, 124))  # variance 0.014 each
    x = np.c_[area, shape, noise]
    rotation, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(128, 128)))  # no feature is one direction
    return (x @ rotation).astype(np.float32), types


def test_spherize_brings_strong_components_to_unit_variance_and_keeps_weak_ones_small():
    x, _ = planted()
    z = fit_feature_transform(x, "spherize").apply(x)
    assert z.shape == (600, 128) and z.dtype == np.float32 and np.isfinite(z).all()
    variance = np.sort(z.var(axis=0, ddof=1))[::-1]
    np.testing.assert_allclose(np.sort(np.cov(z, rowvar=False).diagonal())[::-1], variance, rtol=1e-5)
    # lambda / (lambda + mean lambda), mean lambda ~2.4: the area ~0.99, each shape direction ~0.45,
    # noise ~0.006
    assert variance[0] > 0.98
    assert np.all((variance[1:4] > 0.3) & (variance[1:4] < 0.6))
    assert variance[4:].max() < 0.02
    # decorrelated, as every PCA map is
    c = np.cov(z, rowvar=False)
    assert np.abs(c - np.diag(c.diagonal())).max() < 1e-5
    # fewer cells than features: min(n, d) components, finite
    assert fit_feature_transform(x[:5], "spherize").apply(x[:5]).shape == (5, 5)
    # a constant feature set: no division by zero
    assert np.isfinite(fit_feature_transform(np.ones((6, 3)), "spherize").apply(np.ones((6, 3)))).all()


def test_spherize_separates_types_that_the_dominant_direction_or_full_whitening_merge():
    x, types = planted()

    def ari(preprocess, **kw):
        _, labels = fit_clusters(x, ClusteringConfig(**FAST, preprocess=preprocess, **kw))
        return adjusted_rand_score(types, labels["hdbscan"]), adjusted_rand_score(types, labels["gmm"])

    spherized = ari("spherize")
    assert min(spherized) > 0.9
    # as it is, UMAP's neighbours follow the area across types
    assert max(ari("none")) < spherized[0] - 0.3
    # every component at unit variance (pycytominer's spherize with epsilon 1e-6): the noise decides
    assert max(ari("pca_whiten", pca_components=128)) < spherized[0] - 0.3


def test_cluster_config_takes_the_variants_own_vector_and_preprocessing():
    row = get_variant("siamese_b_ds2_cell")
    assert (row.cluster_vector, row.cluster_preprocess) == ("embedding_invariant", "spherize")
    assert ClusterConfig().params(row).preprocess == "spherize"
    assert ClusterConfig().vector_for(row) == "embedding_invariant"
    # the thesis' rows (and every other row) cluster the plain embedding as it is
    for name, variant in VARIANTS.items():
        if name != row.name:
            assert ClusterConfig().params(variant) == ClusteringConfig(), name
            assert ClusterConfig().vector_for(variant) == "embedding", name
    # the run config overrides the row
    assert ClusterConfig(preprocess="none").params(row).preprocess == "none"
    assert ClusterConfig(vector="embedding").vector_for(row) == "embedding"


def test_shipped_clustering_of_the_chosen_variant_separates_what_the_thesis_clustering_merges():
    """The clusters asset's settings for siamese_b_ds2_cell against those of the thesis' rows, same vectors."""
    x, types = planted(seed=1)
    shipped = ClusterConfig(gmm_components=4).params(get_variant("siamese_b_ds2_cell"))
    thesis = ClusterConfig(gmm_components=4).params(get_variant("siamese_b"))
    fast = dict(umap_n_epochs=80, auto_k_max=6, auto_k_stability_runs=2)
    alone = np.zeros(len(x))  # the row's neighbour contact: here every cell alone in its image
    _, ours = fit_clusters(x, ClusteringConfig(**{**shipped.__dict__, **fast}), context=alone)
    _, before = fit_clusters(x, ClusteringConfig(**{**thesis.__dict__, **fast}))
    assert adjusted_rand_score(types, ours["hdbscan"]) > 0.9
    assert adjusted_rand_score(types, before["hdbscan"]) < 0.6
