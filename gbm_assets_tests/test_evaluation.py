"""Evaluation of embeddings: random forest and linear probe, averaged over group folds by image and by plate,
baselines, confusion figure, the report's variant table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gbm_assets.analysis import evaluation
from gbm_assets.analysis.evaluation import (
    CLASSIFIERS,
    evaluate_features,
    plot_confusion,
    raw_pixel_features,
    why_not_evaluable,
)
from gbm_assets.analysis.variant_evaluation import evaluate_with_baselines, metric_key, score_features, split_groups


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
    assert confusion.shape == (3, 3) and confusion.sum() == result["n_test"] == len(labels)  # summed over folds
    assert result["n_folds"] == 5 and result["n_train"] == pytest.approx(0.8 * len(labels), rel=0.1)
    # The mean of 5 folds is not the pooled accuracy, but close to it with folds of similar size.
    assert np.trace(confusion) / confusion.sum() == pytest.approx(result["accuracy"], abs=0.02)


def test_folds_need_two_groups_and_shrink_to_the_groups_there_are():
    features, labels, groups = separable(n_images=3)
    assert evaluate_features(features, labels, groups)["n_folds"] == 3  # k = min(5, groups)
    with pytest.raises(ValueError, match="at least 2 groups"):
        evaluate_features(features[:10], labels[:10], groups[:10])  # one image
    assert why_not_evaluable(labels, groups, "concentration") == "needs >= 5 images (found 3)"  # the pipeline's floor


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


# ---- linear probe, plate-held-out split, baselines ---------------------------------------------


def plates_with_a_look(n_cultures=4, plates_per_culture=5, images_per_plate=3, per_image=8, seed=0):
    """Rows of n_cultures x plates_per_culture plates, and two feature sets: "look" is the plate's
    own random signature (no culture in it: what recognising a plate's illumination gives) and
    "morphology" a culture centre plus noise (what a culture's cells share on every plate)."""
    rng = np.random.default_rng(seed)
    rows, look, morph = [], [], []
    centres = rng.normal(scale=2.0, size=(n_cultures, 6))
    for c in range(n_cultures):
        for p in range(plates_per_culture):
            signature = rng.normal(scale=3.0, size=6)
            for i in range(images_per_plate):
                for _ in range(per_image):
                    rows.append({"plate": f"GBM{c}-p{p}", "image": f"img{i}.tif", "culture": f"GBM{c}"})
                    look.append(signature + rng.normal(scale=0.3, size=6))
                    morph.append(centres[c] + rng.normal(size=6))
    return pd.DataFrame(rows), {"look": np.array(look), "morphology": np.array(morph)}


def test_linear_probe_is_scored_beside_the_forest():
    features, labels, groups = separable()
    probe = evaluate_features(features, labels, groups, seed=0, classifier="linear_probe")
    assert probe["classifier"] == "linear_probe"
    assert probe["accuracy"] > probe["majority_baseline"] + 0.3 and probe["kappa"] > 0.5
    with pytest.raises(ValueError, match="unknown classifier"):
        evaluate_features(features, labels, groups, classifier="svm")


def test_plate_split_exposes_a_feature_that_only_recognises_the_plate():
    rows, features = plates_with_a_look()
    scores = score_features(rows, features, seed=0)
    assert set(scores["split"]) == {"image", "plate"} and set(scores["classifier"]) == set(CLASSIFIERS)
    kappa = scores.set_index(["feature_set", "split", "classifier"])["kappa"]
    # Held-out images of plates seen in training: the forest reads culture off the plate's look.
    assert kappa["look", "image", "random_forest"] > 0.8
    for classifier in CLASSIFIERS:
        assert kappa["look", "plate", classifier] < 0.3  # held-out plates: nothing left
        assert kappa["morphology", "plate", classifier] > 0.6  # morphology holds on new plates
    plate_lines = scores[scores["split"] == "plate"]
    assert (plate_lines["n_test"] > 0).all() and (plate_lines["skipped"] == "").all()


def test_plate_split_says_why_it_cannot_score():
    rows, features = plates_with_a_look(n_cultures=6, plates_per_culture=1, images_per_plate=6)
    scores = score_features(rows, features, seed=0)
    plate = scores[scores["split"] == "plate"]
    assert plate["skipped"].eq("needs >= 2 cultures with >= 2 plates each (found 0)").all()
    assert plate["accuracy"].isna().all() and (scores.loc[scores["split"] == "image", "skipped"] == "").all()
    assert (
        why_not_evaluable(pd.Series(list("AB") * 2), pd.Series(["p1", "p2", "p3", "p4"]), "culture", unit="plate")
        == "needs >= 5 plates (found 4)"
    )


def test_split_groups_and_metric_names():
    rows = pd.DataFrame({"plate": ["a", "a", "b"], "image": ["i1", "i2", "i1"]})
    assert split_groups(rows, "image").tolist() == ["a:i1", "a:i2", "b:i1"]
    assert split_groups(rows, "plate").tolist() == ["a", "a", "b"]
    with pytest.raises(ValueError, match="unknown split"):
        split_groups(rows, "well")
    line = pd.DataFrame(
        [
            {"feature_set": "embedding", "target": "culture", "split": "image", "classifier": "random_forest"},
            {"feature_set": "embedding", "target": "culture", "split": "plate", "classifier": "linear_probe"},
        ]
    )
    keys = [metric_key(r, "kappa") for r in line.itertuples()]
    assert keys == ["embedding.culture.kappa", "embedding.culture.plate_split.linear_probe.kappa"]


def test_baselines_are_computed_once_per_cell_sample(tmp_path, monkeypatch):
    import gbm_assets.analysis.variant_evaluation as ve

    rows, features = plates_with_a_look(n_cultures=2, plates_per_culture=5, images_per_plate=2, per_image=4)
    rows["crop_id"] = [f"c{i}" for i in range(len(rows))]
    calls = []

    def fake_baselines(crops_dir, crop_ids):
        calls.append(len(crop_ids))
        return {"raw_pixels": features["look"], "handcrafted": features["morphology"]}

    monkeypatch.setattr(ve, "baseline_features_for", fake_baselines)
    embedding = {"embedding": features["morphology"][:, :3]}
    folds = {"n_folds": 2, "cache_dir": tmp_path / "cache"}  # caching, not folds, is tested here: few fits
    first, figures = evaluate_with_baselines(rows, embedding, "crops", tmp_path / "a", "A", **folds)
    second, again = evaluate_with_baselines(rows, embedding, "crops", tmp_path / "b", "B", **folds)
    assert calls == [len(rows)]  # the second variant reuses the first's baseline scores
    pd.testing.assert_frame_equal(first, second)
    assert set(first["feature_set"]) == {"embedding", "raw_pixels", "handcrafted"}
    names = sorted(p.name for p in again)
    assert "confusion_handcrafted_culture.png" in names and "plate_confusion_raw_pixels_culture.png" in names
    assert all(p.parent == tmp_path / "b" and p.is_file() for p in again)
    # Another sample (another seed) recomputes and replaces the cached entry.
    evaluate_with_baselines(rows, embedding, "crops", tmp_path / "c", "C", seed=1, **folds)
    assert calls == [len(rows)] * 2 and len(list((tmp_path / "cache").iterdir())) == 1


def test_comparison_table_has_both_baselines_and_the_plate_split(tmp_path):
    import pyarrow as pa

    from gbm_assets.analysis.report import HANDCRAFTED_BASELINE, is_baseline
    from gbm_assets.analysis.report_inputs import comparison_table
    from gbm_assets.storage import write_parquet_atomic

    rows, features = plates_with_a_look()
    scores = score_features(
        rows,
        {
            "embedding": features["morphology"],
            "raw_pixels": features["look"],
            "handcrafted": features["morphology"][:, :2],
        },
    )
    write_parquet_atomic(pa.Table.from_pandas(scores, preserve_index=False), tmp_path / "siamese_b" / "scores.parquet")
    table = comparison_table(tmp_path, ["siamese_b"]).set_index("variant")
    assert table.index.tolist() == ["siamese_b", "raw pixels", HANDCRAFTED_BASELINE]
    assert is_baseline(table.reset_index()).tolist() == [False, True, True]
    raw = table.loc["raw pixels"]
    assert raw["culture_kappa"] > 0.8 and raw["culture_plate_kappa"] < 0.3  # the plate's look, exposed
    for column in (
        "culture_kappa_linear",
        "culture_plate_kappa",
        "culture_plate_kappa_linear",
        "culture_plate_accuracy",
    ):
        assert table[column].notna().all(), column


def test_report_lead_gives_the_plate_held_out_kappa_beside_the_baselines():
    from gbm_assets.analysis.report import lead

    comparison = pd.DataFrame(
        {
            "variant": ["siamese_b", "raw pixels", "hand-crafted features"],
            "culture_accuracy": [0.5, 0.4, 0.45],
            "culture_kappa": [0.4, 0.3, 0.35],
            "culture_plate_kappa": [0.31, 0.05, 0.22],
        }
    )
    text = lead(comparison)
    assert text.startswith("Best variant: siamese_b (culture Cohen's kappa 0.310 held out by plate)")
    assert "0.260 above raw pixels (kappa 0.050); 0.090 above hand-crafted features (kappa 0.220)" in text
    assert "siamese_b scores culture kappa 0.400 (raw pixels 0.300; hand-crafted features 0.350)" in text


# ---- group folds: every crop tested once, mean and sd over folds ------------------------------


def test_group_folds_test_every_crop_once_and_never_split_a_group():
    _, labels, groups = separable(n_images=40)
    for seed in range(3):
        folds = evaluation.group_folds(labels, groups, seed=seed)
        assert len(folds) == 5
        tested = np.concatenate([test for _, test in folds])
        assert np.array_equal(np.sort(tested), np.arange(len(labels)))  # each crop in exactly one test set
        for train, test in folds:
            assert set(groups.iloc[train]).isdisjoint(groups.iloc[test])
            assert len(train) + len(test) == len(labels)
    plates = groups.str.split(":").str[0]  # 3 plates: k shrinks to 3, a plate never straddles a fold
    assert all(set(plates.iloc[tr]).isdisjoint(plates.iloc[te]) for tr, te in evaluation.group_folds(labels, plates))


def test_scores_are_the_mean_over_folds_with_their_sd():
    features, labels, groups = separable(n_images=40)
    features = features + np.random.default_rng(1).normal(scale=3.0, size=features.shape)  # folds now differ
    for classifier in CLASSIFIERS:
        result = evaluate_features(features, labels, groups, seed=0, classifier=classifier)
        assert len(result["fold_kappa"]) == result["n_folds"] == 5
        assert result["kappa"] == pytest.approx(np.mean(result["fold_kappa"]))
        assert result["accuracy"] == pytest.approx(np.mean(result["fold_accuracy"]))
        assert result["kappa_sd"] == pytest.approx(np.std(result["fold_kappa"], ddof=1)) and result["kappa_sd"] > 0
        assert result["accuracy_sd"] > 0 and np.isfinite(result["majority_baseline_sd"])
        assert result["confusion"].sum() == len(labels)


def test_training_crops_per_fold_are_capped():
    features, labels, groups = separable(n_images=40)
    capped = evaluate_features(features, labels, groups, classifier="linear_probe", max_train=50)
    assert capped["n_train"] == 50 and capped["n_test"] == len(labels)  # every crop still tested
    assert capped["accuracy"] > capped["majority_baseline"] + 0.3


def test_score_table_has_sd_columns_and_mlflow_sd_metrics():
    from gbm_assets.analysis.variant_evaluation import SCORE_COLUMNS, score_metrics

    rows, features = plates_with_a_look(n_cultures=3, plates_per_culture=4, images_per_plate=2, per_image=6)
    scores = score_features(rows, features, seed=0, classifiers=("linear_probe",))
    assert list(scores.columns) == list(SCORE_COLUMNS)
    assert (scores["n_folds"] == 5).all() and (scores["n_test"] == len(rows)).all()
    assert scores[["accuracy_sd", "kappa_sd"]].notna().all().all()
    metrics = score_metrics(scores)
    assert metrics["morphology.culture.image_split.linear_probe.kappa"] == pytest.approx(scores["kappa"].iloc[1])
    line = scores[(scores["feature_set"] == "look") & (scores["split"] == "plate")].iloc[0]
    assert metrics["look.culture.plate_split.linear_probe.kappa_sd"] == pytest.approx(line["kappa_sd"])
    # A table written before folds (no *_sd columns) still gives its means, and no sd metric.
    old = score_metrics(scores.drop(columns=["accuracy_sd", "kappa_sd", "majority_baseline_sd", "n_folds"]))
    assert not any(k.endswith("_sd") for k in old) and len(old) == 3 * len(scores)


def test_fold_mean_is_steadier_than_one_split():
    """Across seeds, the fold mean of the plate-held-out kappa varies less than one 80/20 split of it."""
    rows, features = plates_with_a_look(n_cultures=4, plates_per_culture=3, images_per_plate=1, per_image=6)
    noisy = features["morphology"] + np.random.default_rng(2).normal(scale=2.0, size=features["morphology"].shape)
    labels, plates = rows["culture"], rows["plate"]
    one_split, fold_mean = [], []
    for seed in range(8):
        result = evaluate_features(noisy, labels, plates, seed=seed, classifier="linear_probe")
        one_split.append(result["fold_kappa"][0])  # what the old single split scored
        fold_mean.append(result["kappa"])
    assert np.std(fold_mean) < 0.6 * np.std(one_split)


def test_comparison_table_and_report_show_fold_sd_and_read_old_tables(tmp_path):
    import pyarrow as pa

    from gbm_assets.analysis.report import displayed, with_sd
    from gbm_assets.analysis.report_inputs import comparison_table
    from gbm_assets.storage import write_parquet_atomic

    rows, features = plates_with_a_look(n_cultures=3, plates_per_culture=4, images_per_plate=2, per_image=6)
    scores = score_features(rows, {"embedding": features["morphology"], "raw_pixels": features["look"]})
    write_parquet_atomic(
        pa.Table.from_pandas(scores, preserve_index=False), tmp_path / "new" / "siamese_b" / "scores.parquet"
    )
    old = scores.drop(columns=["accuracy_sd", "kappa_sd", "majority_baseline_sd", "n_folds"])
    write_parquet_atomic(
        pa.Table.from_pandas(old, preserve_index=False), tmp_path / "old" / "siamese_b" / "scores.parquet"
    )
    new_table = comparison_table(tmp_path / "new", ["siamese_b"]).set_index("variant")
    old_table = comparison_table(tmp_path / "old", ["siamese_b"]).set_index("variant")
    assert list(new_table.columns) == list(old_table.columns)
    assert new_table["culture_plate_kappa_sd"].notna().all() and old_table["culture_plate_kappa_sd"].isna().all()
    pd.testing.assert_series_equal(new_table["culture_plate_kappa"], old_table["culture_plate_kappa"])
    shown = displayed(with_sd(new_table.reset_index())).set_index("variant")
    assert "culture_plate_kappa_sd" not in shown
    mean, sd = new_table.loc["siamese_b", ["culture_plate_kappa", "culture_plate_kappa_sd"]]
    assert shown.loc["siamese_b", "culture_plate_kappa"] == f"{mean:.3f} ± {sd:.3f}"
    assert displayed(with_sd(old_table.reset_index())).set_index("variant").loc["siamese_b", "culture_plate_kappa"] == (
        f"{mean:.3f}"  # an old table: the mean alone
    )


def test_a_fold_that_trains_on_one_class_predicts_it():
    # Culture B on one image: the fold that holds it out trains on culture A alone.
    labels = pd.Series(["A"] * 80 + ["B"] * 10)
    groups = pd.Series(np.repeat([f"img{i}" for i in range(9)], 10))
    features = np.random.default_rng(0).normal(size=(90, 4))
    for classifier in CLASSIFIERS:
        result = evaluate_features(features, labels, groups, seed=0, classifier=classifier)
        assert result["confusion"].sum() == 90 and result["confusion"][1].tolist() == [10, 0]  # B: called A


def test_a_fold_the_splitter_leaves_empty_is_dropped_and_every_crop_still_tested():
    """StratifiedGroupKFold's greedy stratification leaves one of 4 folds without a group here
    (4 images, 2 cultures); scoring that fold failed on 0 crops (seen in the main job)."""
    sizes, cultures = [19, 22, 35, 11], ["a", "b", "a", "b"]
    groups = pd.Series(np.repeat([f"img{i}" for i in range(4)], sizes))
    labels = pd.Series(np.repeat(cultures, sizes))
    folds = evaluation.group_folds(labels, groups, seed=0)
    assert all(len(train) and len(test) for train, test in folds)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(sum(sizes)))
    features = np.random.default_rng(0).normal(size=(sum(sizes), 3))
    result = evaluate_features(features, labels, groups)
    assert result["n_test"] == sum(sizes) and result["n_folds"] == len(folds)
