"""Evaluation's speed-ups change no score: folds computed once per target and split, crops read once,
probe folds fitted side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gbm_assets.analysis import evaluation
from gbm_assets.analysis import variant_evaluation as ve
from gbm_assets.analysis.evaluation import evaluate_features, group_folds
from gbm_assets.analysis.variant_evaluation import score_features, split_groups


def _rows_and_features(n_plates=10, images=2, per_image=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_plates):
        for i in range(images):
            for _ in range(per_image):
                rows.append(
                    {"plate": f"P{p}", "image": f"img{i}.tif", "culture": f"GBM{p % 2}", "concentration": "250"}
                )
    rows = pd.DataFrame(rows)
    rows.loc[rows.index % 3 == 0, "concentration"] = "1000"
    y = (rows["culture"] == "GBM1").to_numpy()
    features = {
        "embedding": rng.normal(size=(len(rows), 5)) + y[:, None],
        "raw_pixels": rng.normal(size=(len(rows), 7)),
    }
    return rows, features


def test_given_folds_score_the_same_as_folds_computed_inside():
    rows, features = _rows_and_features()
    labels, groups = rows["culture"], split_groups(rows, "plate")
    folds = group_folds(labels, groups, seed=3)
    for classifier in evaluation.CLASSIFIERS:
        inside = evaluate_features(features["embedding"], labels, groups, seed=3, classifier=classifier)
        given = evaluate_features(features["embedding"], labels, groups, seed=3, classifier=classifier, folds=folds)
        assert inside["fold_accuracy"] == given["fold_accuracy"] and inside["fold_kappa"] == given["fold_kappa"]
        assert np.array_equal(inside["confusion"], given["confusion"])


def test_score_features_splits_each_target_and_split_once(monkeypatch):
    rows, features = _rows_and_features()
    expected = score_features(rows, features, seed=1, classifiers=("linear_probe",))
    calls = []
    real = evaluation.group_folds

    def counting(labels, groups, seed=0, n_folds=evaluation.N_FOLDS):
        calls.append(len(labels))
        return real(labels, groups, seed, n_folds)

    monkeypatch.setattr(evaluation, "group_folds", counting)
    monkeypatch.setattr(ve, "group_folds", counting)
    got = score_features(rows, features, seed=1, classifiers=("linear_probe",))
    pd.testing.assert_frame_equal(got, expected)
    # 2 targets x 2 splits, not x 2 feature sets as well
    assert len(calls) == 4


def test_baselines_read_the_crops_pixels_once(tmp_path, monkeypatch):
    from gbm_assets.analysis import handcrafted
    from gbm_assets.imaging import crop_dataset
    from gbm_assets.imaging.synthetic_crops import write_synthetic_crops

    crops_dir = write_synthetic_crops(tmp_path / "cell_crops.parquet", ("P1", "P2"), (6, 5), size=32)
    files = sorted(crops_dir.glob("plate=*/part-0.parquet"))
    ids = pd.concat([pd.read_parquet(f, columns=["crop_id"]) for f in files])["crop_id"].sample(
        frac=1.0, random_state=0
    )
    ids = ids.reset_index(drop=True)  # not in storage order
    pixels = crop_dataset.read_crops(crops_dir, ids)
    masks = crop_dataset.read_crops(crops_dir, ids, column="mask")
    from gbm_assets.analysis.cell_types import read_measurements

    measurements = read_measurements(crops_dir, ids)
    for column in handcrafted.MEASUREMENT_COLUMNS:
        if column not in measurements:
            measurements[column] = np.nan
    columns = []
    real = crop_dataset.read_crops

    def counting(crops_dir, crop_ids, column="pixels", batch_size=256):
        columns.append(column)
        return real(crops_dir, crop_ids, column, batch_size)

    monkeypatch.setattr(crop_dataset, "read_crops", counting)
    monkeypatch.setattr(ve, "read_crops", counting)
    got = ve.baseline_features_for(crops_dir, ids)
    assert sorted(columns) == ["mask", "pixels"]  # was pixels twice: once per baseline
    assert np.array_equal(got["raw_pixels"], evaluation.raw_pixel_features(pixels))
    assert np.array_equal(got["handcrafted"], handcrafted.handcrafted_features(measurements, pixels, masks))
    with pytest.raises(ValueError, match="crops of pixels"):
        handcrafted.handcrafted_features_for(crops_dir, ids, pixels=pixels[:3])


def test_probe_folds_are_fitted_side_by_side_with_the_same_scores(monkeypatch):
    import threading

    rows, features = _rows_and_features(n_plates=12)
    labels, groups = rows["culture"], split_groups(rows, "image")
    threads = set()
    real = evaluation._fit_predict

    def recording(*args):
        threads.add(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(evaluation, "_fit_predict", recording)
    monkeypatch.setattr(evaluation, "cpu_cores", lambda: 1)
    one = evaluate_features(features["embedding"], labels, groups, seed=2, classifier="linear_probe")
    assert threads == {threading.current_thread().name}
    monkeypatch.setattr(evaluation, "cpu_cores", lambda: 16)
    assert evaluation.n_jobs() == evaluation.MAX_JOBS == 2  # bounded: other steps and tests share the cores
    threads.clear()
    two = evaluate_features(features["embedding"], labels, groups, seed=2, classifier="linear_probe")
    assert len(threads) == 2 and all(t.startswith("probe-fold") for t in threads)
    for key in ("fold_accuracy", "fold_kappa", "accuracy", "majority_baseline", "n_train"):
        assert one[key] == two[key]
    assert np.array_equal(one["confusion"], two["confusion"])
    # The forest keeps one fold at a time: it already grows its trees in n_jobs() threads.
    assert evaluation.make_classifier("random_forest").n_jobs == 2
