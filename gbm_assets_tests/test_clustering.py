"""Clustering, new-plate assignment and composition statistics on small synthetic embeddings.

One UMAP fit for the whole module (numba compiles on first use, which dominates the time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score, homogeneity_score

from gbm_assets.analysis.clustering import (
    LABEL_COLUMNS,
    ClusteringConfig,
    _hdbscan,
    assign_new,
    choose_k,
    cluster_metrics,
    fit_clusters,
    load_clustering,
    save_clustering,
    scaled_min_cluster_size,
    sized_parameters,
    split_embedding_table,
)
from gbm_assets.analysis.composition import chi_square_culture_vs_type, composition, composition_error
from gbm_assets.schema import PROVENANCE_COLUMNS

N_TYPES = 4
DIMS = 12
# gmm_components = number of planted types, so GMM labels are well defined (11 would split
# blobs at arbitrary borders); the auto-k GMM must find that number by itself.
CONFIG = ClusteringConfig(seed=0, umap_n_epochs=60, gmm_components=N_TYPES, auto_k_max=8, auto_k_stability_runs=3)


def embedding_table(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Provenance plus a list column 'embedding' of well-separated types, rows in random order."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 4, size=(N_TYPES, DIMS))
    types = rng.integers(0, N_TYPES, size=n)
    x = (centres[types] + rng.normal(0, 1, size=(n, DIMS))).astype(np.float32)
    cultures = rng.choice(["GBM03", "GBM11", "GBM27"], size=n)
    table = pd.DataFrame(
        {
            "crop_id": [f"P{seed}:img{i % 7}.tif:{i}" for i in range(n)],
            "plate": f"P{seed}",
            "image": [f"img{i % 7}.tif" for i in range(n)],
            "x": rng.integers(64, 1000, size=n).astype(np.int32),
            "y": rng.integers(64, 1000, size=n).astype(np.int32),
            "culture": cultures,
            "concentration": rng.choice(["250", "1000"], size=n),
            "replicate": np.int32(1),
            "timepoint_h": 0.0,
            "well": rng.choice(["B2", "C3"], size=n),
            "position": "1",
            "embedding": list(x),
        }
    )
    return table, types


@pytest.fixture(scope="module")
def fitted():
    table, types = embedding_table(900)
    model, labels = fit_clusters(table, CONFIG)
    return table, types, model, labels


def test_import_does_not_load_tensorflow():
    code = "import sys, gbm_assets.analysis.clustering; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_scaled_min_cluster_size_matches_thesis_and_scales():
    assert scaled_min_cluster_size(7_500) == 220
    assert scaled_min_cluster_size(75_000) == 2_200
    assert scaled_min_cluster_size(100) == 15


def test_labels_align_with_provenance_rows(fitted):
    table, _, _, labels = fitted
    assert list(labels.columns) == [*PROVENANCE_COLUMNS, *LABEL_COLUMNS]
    assert labels["crop_id"].tolist() == table["crop_id"].tolist()
    pd.testing.assert_frame_equal(labels[list(PROVENANCE_COLUMNS)], table[list(PROVENANCE_COLUMNS)])
    assert (labels["hdbscan_noise"] == (labels["hdbscan"] == -1)).all()
    probs = np.stack(labels["gmm_probs"].to_numpy())
    assert probs.shape == (len(table), CONFIG.gmm_components)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(axis=1), labels["gmm"])
    np.testing.assert_allclose(probs.max(axis=1), labels["gmm_prob"])


def test_labels_store_in_parquet(fitted, tmp_path):
    labels = fitted[3]
    labels.to_parquet(tmp_path / "labels.parquet")
    schema = pq.read_schema(tmp_path / "labels.parquet")
    assert str(schema.field("gmm_probs").type) == "list<element: float>"
    assert str(schema.field("hdbscan").type) == "int32"


def test_planted_types_are_recovered(fitted):
    table, types, model, labels = fitted
    xy = labels[["umap_x", "umap_y"]].to_numpy()
    # HDBSCAN must not mix types (leaf selection, the thesis', could also split them).
    hdb = labels["hdbscan"].to_numpy()
    assert homogeneity_score(types[hdb != -1], hdb[hdb != -1]) > 0.95
    assert model.auto_k.k == N_TYPES
    assert composition_error(labels["auto"], types, table["culture"])["mae"] < 0.01
    for method in ("gmm", "auto"):
        assert cluster_metrics(xy, labels[method], truth=types)["ari"] > 0.95
    assert model.auto_k.table["k"].tolist() == list(range(2, 9))


def test_assign_new_does_not_refit(fitted, tmp_path):
    table, types, model, labels = fitted
    before = model.fingerprint()
    save_clustering(model, tmp_path / "model.npz")
    restored = load_clustering(tmp_path / "model.npz", expected_fingerprint=before)
    assert restored.fingerprint() == before

    copy = table.iloc[:300].copy()
    again = assign_new(restored, copy)
    assert model.fingerprint() == before and restored.fingerprint() == before
    assert again["crop_id"].tolist() == copy["crop_id"].tolist()
    for method in ("gmm", "auto"):
        assert (again[method].to_numpy() == labels[method].to_numpy()[:300]).mean() > 0.9
    both = ~again["hdbscan_noise"].to_numpy() & ~labels["hdbscan_noise"].to_numpy()[:300]
    assert (again["hdbscan"].to_numpy()[both] == labels["hdbscan"].to_numpy()[:300][both]).mean() > 0.9

    new_plate, new_types = embedding_table(200, seed=1)
    new = assign_new(model, new_plate)
    assert model.fingerprint() == before
    # The stored model places new cells exactly as the fitted one does.
    pd.testing.assert_frame_equal(assign_new(restored, new_plate), new)
    assert cluster_metrics(new[["umap_x", "umap_y"]].to_numpy(), new["auto"], new_types)["ari"] > 0.9


def test_model_files_written_before_icl_load_as_fitted(fitted, tmp_path):
    """A file from before auto_k_criterion (no icl column, no such config field) loads, says "bic"."""
    model = fitted[2]
    save_clustering(model, tmp_path / "new.npz")
    restored = load_clustering(tmp_path / "new.npz", expected_fingerprint=model.fingerprint())
    assert restored.config == model.config and restored.config.auto_k_criterion == "icl"
    pd.testing.assert_frame_equal(restored.auto_k.table, model.auto_k.table, check_dtype=False)

    with np.load(tmp_path / "new.npz", allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files if name != "auto_k.icl"}
    header = json.loads(str(arrays["header"]))
    del header["config"]["auto_k_criterion"]
    header["config"]["hdbscan_selection"] = "leaf"
    arrays["header"] = np.array(json.dumps(header))
    np.savez_compressed(tmp_path / "old.npz", **arrays)
    old = load_clustering(tmp_path / "old.npz", expected_fingerprint=model.fingerprint())
    assert old.config.auto_k_criterion == "bic" and old.config.hdbscan_selection == "leaf"
    assert list(old.auto_k.table.columns) == ["k", "bic", "candidate", "stability"]


def test_default_hdbscan_keeps_a_type_with_two_density_bumps_whole():
    """Excess-of-mass selection: 5 types of two overlapping bumps each are 5 clusters, no noise.

    The thesis' leaf selection made each bump a cluster (10) and their rims noise (ARI 0.48).
    """
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20], [10, 40]], float)
    types = np.repeat(np.arange(5), 400)
    bumps = np.c_[np.where(np.arange(2000) % 2, 1.6, -1.6), np.zeros(2000)]
    points = centres[types] + bumps + rng.normal(0, 0.7, (2000, 2))
    config = ClusteringConfig()
    labels = _hdbscan(config, sized_parameters(config, len(points))).fit(points).labels_
    assert labels.max() + 1 == 5 and (labels == -1).mean() < 0.02
    assert adjusted_rand_score(types, labels) > 0.95


def test_choose_k_counts_non_gaussian_clusters_once():
    """Three uniform squares: ICL (the default) picks 3; BIC's minimum lies at more components."""
    rng = np.random.default_rng(0)
    corners = np.array([[0, 0], [30, 0], [15, 30]], float)
    points = corners[rng.integers(0, 3, 1_500)] + rng.uniform(-5, 5, (1_500, 2))
    result = choose_k(points, ClusteringConfig(auto_k_max=7, auto_k_stability_runs=3))
    assert result.k == 3 and result.rule.startswith("lowest-ICL candidate with stability")
    table = result.table
    assert table.loc[table["bic"].idxmin(), "k"] > 3 and table.loc[table["icl"].idxmin(), "k"] == 3
    assert (table["icl"] >= table["bic"] - 1e-6).all()  # the entropy term is never negative


@pytest.mark.parametrize("field", ["hdbscan_selection", "auto_k_criterion"])
def test_config_rejects_unknown_choices(field):
    with pytest.raises(ValueError, match=field):
        ClusteringConfig(**{field: "aic"})


def test_assign_new_rejects_wrong_width(fitted):
    with pytest.raises(ValueError, match="columns"):
        assign_new(fitted[2], np.zeros((5, DIMS + 1), np.float32))


def test_split_embedding_table_takes_list_or_numeric_columns():
    table, _ = embedding_table(5)
    prov, x = split_embedding_table(table)
    wide = pd.concat([prov, pd.DataFrame(x, columns=[f"f{i}" for i in range(DIMS)])], axis=1)
    prov2, x2 = split_embedding_table(wide)
    pd.testing.assert_frame_equal(prov, prov2)
    np.testing.assert_array_equal(x, x2)
    assert x2.dtype == np.float32 and list(prov.columns) == list(PROVENANCE_COLUMNS)


def test_choose_k_on_plain_blobs():
    rng = np.random.default_rng(3)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 20]])
    points = centres[rng.integers(0, 5, 2_000)] + rng.normal(0, 1, (2_000, 2))
    result = choose_k(points, ClusteringConfig(auto_k_max=9, auto_k_stability_runs=3))
    assert result.k == 5
    assert result.table.loc[result.table["k"] == 5, "stability"].item() >= 0.9


def test_cluster_metrics_noise_and_degenerate_cases():
    xy = np.random.default_rng(0).normal(size=(40, 2))
    labels = np.r_[np.zeros(10), np.ones(10), -np.ones(20)].astype(int)
    m = cluster_metrics(xy, labels)
    assert m["n_clusters"] == 2 and m["noise_fraction"] == 0.5 and np.isfinite(m["silhouette"])
    all_noise = cluster_metrics(xy, -np.ones(40, int))
    assert all_noise["n_clusters"] == 0 and np.isnan(all_noise["silhouette"])


# --- composition -------------------------------------------------------------------------


def planted(n: int, differ: bool, seed: int):
    rng = np.random.default_rng(seed)
    cultures = rng.choice(["A", "B", "C"], size=n)
    p_null = [0.4, 0.3, 0.2, 0.1]
    p = {"A": p_null, "B": [0.1, 0.2, 0.3, 0.4] if differ else p_null, "C": p_null}
    labels = np.array([rng.choice(4, p=p[c]) for c in cultures])
    return labels, cultures


def test_composition_sums_to_one_and_ci_contains_estimate():
    labels, cultures = planted(1_500, differ=True, seed=0)
    labels[:100] = -1
    comp = composition(labels, cultures, n_boot=500, seed=0)
    assert set(comp.columns) >= {"culture", "cluster", "proportion", "ci_low", "ci_high", "n_cells"}
    assert -1 not in comp["cluster"].to_numpy()
    np.testing.assert_allclose(comp.groupby("culture")["proportion"].sum(), 1.0)
    assert (comp["ci_low"] <= comp["proportion"]).all() and (comp["proportion"] <= comp["ci_high"]).all()
    assert (comp["ci_high"] - comp["ci_low"] > 0).all()
    assert comp["n_cells"].sum() == 1_400
    with_noise = composition(labels, cultures, n_boot=50, include_noise=True)
    assert -1 in with_noise["cluster"].to_numpy()
    np.testing.assert_allclose(with_noise.groupby("culture")["proportion"].sum(), 1.0)
    pd.testing.assert_frame_equal(comp, composition(labels, cultures, n_boot=500, seed=0))


def test_chi_square_detects_planted_difference_only():
    labels, cultures = planted(1_500, differ=True, seed=1)
    planted_result = chi_square_culture_vs_type(labels, cultures)
    assert planted_result["p_value"] < 0.01 and planted_result["cramers_v"] > 0.1
    labels, cultures = planted(1_500, differ=False, seed=1)
    null_result = chi_square_culture_vs_type(labels, cultures)
    assert null_result["p_value"] > 0.05 and null_result["dof"] == 6
    assert np.isnan(chi_square_culture_vs_type(np.zeros(10, int), np.array(list("ABABABABAB")))["p_value"])


def test_composition_error_zero_when_recovered_positive_when_scrambled():
    labels, cultures = planted(1_200, differ=True, seed=2)
    renamed = np.array([7, 3, 9, 1])[labels]
    perfect = composition_error(renamed, labels, cultures)
    assert perfect["mae"] == pytest.approx(0, abs=1e-12)
    assert perfect["mapping"] == {1: 3, 3: 1, 7: 0, 9: 2}
    split = np.where(np.arange(len(labels)) % 2 == 0, labels, labels + 10)
    assert composition_error(split, labels, cultures)["mae"] == pytest.approx(0, abs=1e-12)
    scrambled = np.random.default_rng(0).permutation(labels)
    assert composition_error(scrambled, labels, cultures)["mae"] > 0.02


def _embeddings_file(path, n: int, seed: int = 0):
    """An embeddings Parquet file (embedding_table schema) of n cells of the planted types."""
    from gbm_assets.models.embedding_table import embedding_batch, embedding_schema
    from gbm_assets.storage import write_parquet_atomic

    table, _ = embedding_table(n, seed)
    table["cell_id"] = np.arange(n, dtype=np.int32)
    x = np.stack(table["embedding"].to_numpy())
    rows = table.reindex(columns=list(PROVENANCE_COLUMNS))
    assert embedding_schema(DIMS) == embedding_batch(rows, x, x).schema
    return write_parquet_atomic(embedding_batch(rows, x, x), path)


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(("info", message))

    def warning(self, message):
        self.lines.append(("warning", message))


def test_load_or_fit_reuses_models_only_for_the_same_encoder_run_and_labels(tmp_path):
    """The clusters asset's fit-or-reuse rule, as the one core entry point cell_labels.load_or_fit."""
    from gbm_assets.analysis.cell_labels import load_or_fit, write_labels
    from gbm_assets.paths import ClusterModelFiles
    from gbm_assets.staging import Staging

    emb = _embeddings_file(tmp_path / "emb.parquet", 120)
    files, labels = ClusterModelFiles(tmp_path / "models"), tmp_path / "labels.parquet"

    def run(encoder_run: str, refit: bool = False, config=CONFIG):
        log = _Log()
        with Staging() as stage:
            models = load_or_fit(emb, files, labels, encoder_run, config, stage, 80, refit=refit, logger=log)
            counts = write_labels(emb, models, stage.path(labels))
            stage.commit([*models.commit_order, labels])
        return models, counts, log

    files.folder.mkdir()
    files.legacy_pickle.write_bytes(b"not a model: must never be unpickled")
    first, counts, log = run("run-1")
    assert first.mode == "fit" and counts == (120, 40)  # 80 fitted, 40 assigned
    assert first.commit_order == [files.model(first.record["fingerprint"]), files.record]
    assert [p.name for p in files.models()] == [first.record["model_file"]] and not files.legacy_pickle.exists()
    assert any(level == "warning" and "model.joblib" in line for level, line in log.lines)
    before = pq.read_table(labels).to_pandas()

    again, counts, _ = run("run-1")
    assert again.mode.startswith("assign") and again.commit_order == [] and counts == (120, 0)
    assert again.record == first.record
    pd.testing.assert_frame_equal(pq.read_table(labels).to_pandas(), before)

    assert run("run-2")[0].mode == "fit"  # embeddings of another encoder
    assert run("run-2")[0].mode.startswith("assign")
    # changed clustering settings are never answered by the stored models of the old ones
    refitted, _, log = run("run-2", config=replace(CONFIG, gmm_components=CONFIG.gmm_components + 1))
    assert refitted.mode == "fit" and refitted.fitted.config.gmm_components == CONFIG.gmm_components + 1
    assert any("gmm_components" in line and "refitting" in line for _, line in log.lines)
    assert run("run-2", refit=True)[0].mode == "fit"
