"""Evaluation of embeddings: random forest split by image, baselines and the confusion figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gbm_assets.analysis.evaluation import evaluate_features, plot_confusion, raw_pixel_features, split_by_group


def separable(n_images=30, per_image=10, seed=0):
    """Features of 3 classes around distinct centres, 10 crops per image, one class per image."""
    rng = np.random.default_rng(seed)
    image_class = rng.integers(0, 3, n_images)
    labels = np.repeat(np.array(["250", "1000", "500"])[image_class], per_image)
    groups = np.repeat([f"P{i % 3}:img{i}.tif" for i in range(n_images)], per_image)
    centres = rng.normal(scale=3.0, size=(3, 8))
    features = centres[np.repeat(image_class, per_image)] + rng.normal(size=(n_images * per_image, 8))
    return features, pd.Series(labels), pd.Series(groups)


def test_forest_beats_the_majority_baseline_on_separable_features():
    features, labels, groups = separable()
    result = evaluate_features(features, labels, groups, seed=0)
    assert result["accuracy"] > result["majority_baseline"] + 0.3
    assert result["kappa"] > 0.5
    assert result["classes"] == ["250", "500", "1000"]  # numeric order, not string order
    confusion = result["confusion"]
    assert confusion.shape == (3, 3) and confusion.sum() == result["n_test"]
    assert result["n_train"] + result["n_test"] == len(labels)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(result["accuracy"])


def test_split_keeps_each_image_on_one_side():
    _, labels, groups = separable(n_images=40)
    for seed in range(3):
        train, test = split_by_group(labels, groups, seed=seed, test_size=0.2)
        assert set(groups.iloc[train]).isdisjoint(groups.iloc[test])
        assert len(train) + len(test) == len(labels)
        assert 0.1 < len(test) / len(labels) < 0.3


def test_split_needs_enough_images():
    features, labels, groups = separable(n_images=3)
    with pytest.raises(ValueError, match="at least 5 images"):
        evaluate_features(features, labels, groups)


def test_raw_pixel_features_block_average():
    pixels = np.arange(2 * 64 * 64, dtype=np.uint8).reshape(2, 64, 64, 1)
    features = raw_pixel_features(pixels, size=32)
    assert features.shape == (2, 32 * 32) and features.dtype == np.float32
    assert features[0, 0] == pytest.approx(pixels[0, :2, :2].mean())
    with pytest.raises(ValueError, match="multiple"):
        raw_pixel_features(np.zeros((1, 40, 40)), size=32)


def test_plot_confusion_writes_a_png(tmp_path):
    features, labels, groups = separable()
    result = evaluate_features(features, labels, groups)
    path = plot_confusion(result, "culture (synthetic)", tmp_path / "figures" / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
