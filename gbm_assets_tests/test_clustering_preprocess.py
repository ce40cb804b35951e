"""The clustering's feature preprocessing (ClusteringConfig.preprocess, issue 13): what UMAP sees.

Standardising or PCA-whitening the embedding before UMAP; the fitted map is stored with the
models, so later cells are placed through the same map after save_clustering/load_clustering.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from gbm_assets.analysis.clustering import (
    ClusteringConfig,
    assign_new,
    fit_clusters,
    fit_feature_transform,
    load_clustering,
    save_clustering,
)

FAST = dict(seed=0, umap_n_epochs=60, gmm_components=4, auto_k_max=6, auto_k_stability_runs=2)


def planted(n: int, seed: int = 0, nuisance: float = 300.0) -> tuple[np.ndarray, np.ndarray]:
    """4 types apart in 3 signal dimensions (sd 1 around the corners of a tetrahedron, 11.3 apart),
    plus 60 dimensions that carry one continuous nuisance (a cell's size, a plate's
    illumination: uniform along one direction, `nuisance` long) and a little noise. Nearest
    neighbours then follow the nuisance across types; whitened principal components weigh it
    as one direction among four."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    types = rng.integers(0, 4, n)
    signal = centres[types] + rng.normal(0, 1, (n, 3))
    direction = np.random.default_rng(7).normal(0, 1, 60)
    direction /= np.linalg.norm(direction)
    along = rng.uniform(-0.5, 0.5, (n, 1)) * nuisance
    noise = along * direction + rng.normal(0, 0.3, (n, 60))
    return np.c_[signal, noise].astype(np.float32), types


def test_standardize_gives_each_feature_mean_0_sd_1():
    rng = np.random.default_rng(0)
    x = rng.normal([5, -3, 0], [100, 0.01, 1], (500, 3))
    x[:, 2] = 4.0  # a constant feature stays finite
    z = fit_feature_transform(x, "standardize").apply(x)
    assert z.shape == (500, 3) and z.dtype == np.float32 and np.isfinite(z).all()
    np.testing.assert_allclose(z[:, :2].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=0), 1, atol=1e-4)
    assert np.all(z[:, 2] == 0)


def test_pca_whiten_keeps_k_uncorrelated_unit_variance_components():
    x, _ = planted(600)
    z = fit_feature_transform(x, "pca_whiten", 5).apply(x)
    assert z.shape == (600, 5)
    np.testing.assert_allclose(np.cov(z, rowvar=False, ddof=1), np.eye(5), atol=1e-2)
    # more components than features or cells: as many as there are
    assert fit_feature_transform(x[:4], "pca_whiten", 8).apply(x[:4]).shape[1] == 4
    assert fit_feature_transform(x, "none") is None
    with pytest.raises(ValueError, match="preprocess"):
        fit_feature_transform(x, "whiten")


@pytest.mark.parametrize("bad", [{"preprocess": "zscore"}, {"pca_components": 0}])
def test_config_rejects_unknown_preprocessing(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ClusteringConfig(**bad)


def test_pca_whiten_recovers_types_that_noise_dimensions_hide():
    """Many low-variance nuisance dimensions: whitened top components cluster, the raw vectors do not."""
    x, types = planted(800)
    _, plain = fit_clusters(x, ClusteringConfig(**FAST))
    _, whitened = fit_clusters(x, ClusteringConfig(**FAST, preprocess="pca_whiten", pca_components=4))
    assert adjusted_rand_score(types, whitened["gmm"]) > 0.9
    assert adjusted_rand_score(types, plain["gmm"]) < adjusted_rand_score(types, whitened["gmm"]) - 0.2


def test_stored_model_places_new_cells_through_the_same_transform(tmp_path):
    x, types = planted(500)
    config = ClusteringConfig(**FAST, preprocess="pca_whiten", pca_components=4)
    model, labels = fit_clusters(x, config)
    assert model.n_features == 63 and model.transform.matrix.shape == (63, 4)
    save_clustering(model, tmp_path / "model.npz")
    restored = load_clustering(tmp_path / "model.npz", expected_fingerprint=model.fingerprint())
    assert restored.config.preprocess == "pca_whiten"
    np.testing.assert_array_equal(restored.transform.matrix, model.transform.matrix)

    new, new_types = planted(200, seed=1)
    placed = assign_new(restored, new)
    assert placed.equals(assign_new(model, new))
    assert adjusted_rand_score(new_types, placed["gmm"]) > 0.9
    with pytest.raises(ValueError, match="columns"):
        assign_new(restored, new[:, :4])

    # the transform is part of the fingerprint: a changed matrix is not the fitted model
    with np.load(tmp_path / "model.npz", allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["transform.matrix"] = arrays["transform.matrix"] * 2
    np.savez_compressed(tmp_path / "changed.npz", **arrays)
    with pytest.raises(Exception, match="fingerprint"):
        load_clustering(tmp_path / "changed.npz", expected_fingerprint=model.fingerprint())


def test_model_files_written_before_preprocessing_load_without_it(tmp_path):
    x, _ = planted(200)
    model, _ = fit_clusters(x, ClusteringConfig(**FAST, preprocess="none"))
    save_clustering(model, tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz", allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    header = json.loads(str(arrays["header"]))
    del header["config"]["preprocess"], header["config"]["pca_components"]
    arrays["header"] = np.array(json.dumps(header))
    np.savez_compressed(tmp_path / "old.npz", **arrays)
    old = load_clustering(tmp_path / "old.npz", expected_fingerprint=model.fingerprint())
    assert old.config.preprocess == "none" and old.transform is None
