"""Issue 14, items 1, 7, 8 and 11: faults that must not cost data, small data that must get an answer,
and model files that must not run code.

- Log first, then replace: clusters stages every output, logs to MLflow, then swaps; a held
  SQLite lock or an MLflow call that raises leaves the previous outputs byte for byte.
- Small data: one culture, fewer than 5 images, fewer crops than a batch still give embeddings,
  clusters and a report that says why a score is missing.
- Clustering below clustering.MIN_CELLS says so clearly; from there up, every cell is labelled.
- A pickle planted in the data folder never runs: models are stored as arrays (np.load without pickle).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gbm_assets.analysis.cell_labels import clustered_on
from gbm_assets.analysis.clustering import (
    MIN_CELLS,
    TooFewCells,
    assign_new,
    fit_clusters,
    load_clustering,
    save_clustering,
)
from gbm_assets.analysis.evaluation import why_not_evaluable
from gbm_assets.analysis.report import write_report
from gbm_assets.analysis.report_inputs import comparison_table
from gbm_assets.analysis.variant_evaluation import evaluate_variant
from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.clusters import clusters, composition_report
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.models.embedding_table import embedding_batch, embedding_schema
from gbm_assets.schema import PROVENANCE_COLUMNS
from gbm_assets.staging import Staging
from gbm_assets.storage import plate_dataset, write_parquet_atomic

VARIANT = "siamese_d"  # 32 features: small fake embeddings
INGEST = [raw_plates, cell_coordinates, cell_crops]
SMALL_CROPS = {"ops": {"cell_crops": {"config": {"crop_size": 64}}}}
REFIT_OTHER_SEED = {"ops": {"clusters": {"config": {"refit": True, "seed": 1}}}}


# --- fixtures: ingested synthetic plates, fake embeddings, one clusters materialization ----------


def _tracking(db: Path, **kw) -> MLflowTracking:
    return MLflowTracking(tracking_uri=f"sqlite:///{db}", artifact_root=(db.parent / "artifacts").as_uri(), **kw)


def _write_embeddings(root: Path, n: int | None = None, seed: int = 0) -> int:
    """Fake but structured embeddings (4 blobs) of the first n crops, and an encoder record."""
    rows = plate_dataset(root / "cell_crops.parquet").to_table(columns=list(PROVENANCE_COLUMNS)).to_pandas()
    rows = rows.sort_values("crop_id").reset_index(drop=True).iloc[:n]
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(4, 32))
    x = (centres[rng.integers(0, 4, len(rows))] + rng.normal(0, 1, (len(rows), 32))).astype(np.float32)
    data = DataDirs(root=str(root))
    write_parquet_atomic(embedding_batch(rows, x, x), data.embeddings_file(VARIANT))
    data.encoder_dir(VARIANT).mkdir(parents=True, exist_ok=True)
    data.encoder_record(VARIANT).write_text(json.dumps({"run_id": "encoder-run-of-the-test"}))
    assert pq.read_schema(data.embeddings_file(VARIANT)).equals(embedding_schema(32), check_metadata=False)
    return len(rows)


@pytest.fixture(scope="module")
def clustered_once(tmp_path_factory, synth_plates):
    """Two plates ingested with 64 px crops, fake embeddings, clusters materialized once."""
    base = tmp_path_factory.mktemp("clustered")
    root = base / "data"
    shutil.copytree(synth_plates, root / "raw")
    ids = find_ready_plates(root / "raw")[-2:]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, ids)
    for plate_id in ids:
        assert dg.materialize(
            INGEST,
            partition_key=plate_id,
            instance=instance,
            resources={"data": DataDirs(root=str(root))},
            run_config=SMALL_CROPS,
        ).success
    n = _write_embeddings(root)
    db = base / "mlflow.db"
    assert dg.materialize(
        [clusters],
        partition_key=VARIANT,
        instance=instance,
        resources={"data": DataDirs(root=str(root)), "mlflow_tracking": _tracking(db)},
    ).success
    return base, n


@pytest.fixture
def clustered(clustered_once, tmp_path):
    """A private copy of the clustered data folder and MLflow store."""
    base, n = clustered_once
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copy2(base / "mlflow.db", tmp_path / "mlflow.db")
    return tmp_path / "data", tmp_path / "mlflow.db", n


def _outputs(root: Path) -> dict[str, bytes]:
    """Every file clusters writes (model, labels, explorer page), by path relative to the data folder."""
    folders = [
        root / "cluster_models" / VARIANT,
        root / "clusters.parquet" / f"variant={VARIANT}",
        root / "reports" / "explorer",
    ]
    return {
        str(p.relative_to(root)): p.read_bytes()
        for f in folders
        if f.is_dir()
        for p in sorted(f.rglob("*"))
        if p.is_file()
    }


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".staged-") or p.name.endswith(".tmp")]


def _run_clusters(root: Path, tracking: MLflowTracking, run_config=None):
    return dg.materialize(
        [clusters],
        partition_key=VARIANT,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        resources={"data": DataDirs(root=str(root)), "mlflow_tracking": tracking},
        run_config=run_config or {},
    )


def _failure_text(result) -> str:
    return next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.to_string()


def _meta(result, node: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


# --- item 1: log first, then replace -------------------------------------------------------------


def test_locked_mlflow_store_leaves_previous_clusters_byte_identical(clustered):
    root, db, _ = clustered
    before = _outputs(root)
    assert {
        "cluster_models/siamese_d/model.json",
        f"clusters.parquet/variant={VARIANT}/part-0.parquet",
        f"reports/explorer/{VARIANT}.html",
    } <= set(before)
    lock = sqlite3.connect(db, timeout=0, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the store, longer than the retry budget
    try:
        failed = _run_clusters(root, _tracking(db, lock_retry_s=0.5), REFIT_OTHER_SEED)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert not failed.success
    assert "locked" in _failure_text(failed)
    assert _outputs(root) == before, "a failed clusters step replaced outputs"
    assert _leftovers(root) == []
    # Control: with the store free, the same run does replace them (so the check above can fail).
    done = _run_clusters(root, _tracking(db), REFIT_OTHER_SEED)
    assert done.success and _outputs(root) != before and _leftovers(root) == []


def test_mlflow_failure_mid_run_leaves_previous_clusters_and_marks_run_failed(clustered, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    root, db, _ = clustered
    before = _outputs(root)

    def broken_log_artifact(*args, **kwargs):
        raise MlflowException("injected: the artifact store refused the explorer page")

    monkeypatch.setattr(mlflow, "log_artifact", broken_log_artifact)
    failed = _run_clusters(root, _tracking(db), REFIT_OTHER_SEED)
    assert not failed.success and "injected" in _failure_text(failed)
    assert _outputs(root) == before
    assert _leftovers(root) == []
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(
        experiment_names=["gbm-assets"], filter_string=f"tags.`dagster.run_id` = '{failed.run_id}'"
    )
    assert runs["status"].tolist() == ["FAILED"]


def test_staging_commits_in_order_and_discards_on_error(tmp_path):
    a, b = tmp_path / "x" / "a.txt", tmp_path / "y" / "b.txt"
    a.parent.mkdir()
    a.write_text("old a")
    with pytest.raises(RuntimeError):
        with Staging() as stage:
            stage.path(a).write_text("new a")
            stage.path(b).write_text("new b")
            raise RuntimeError("logging failed")
    assert a.read_text() == "old a" and not b.exists() and _leftovers(tmp_path) == []
    seen = []
    with Staging() as stage:
        stage.path(a).write_text("new a")
        stage.path(b).write_text("new b")
        stage.remove_on_commit(tmp_path / "x" / "stale.txt")
        (tmp_path / "x" / "stale.txt").write_text("stale")
        seen = stage.commit([b, a])
    assert seen == [b, a] and a.read_text() == "new a" and b.read_text() == "new b"
    assert not (tmp_path / "x" / "stale.txt").exists() and _leftovers(tmp_path) == []


STAGER = textwrap.dedent("""
    import sys, time
    from gbm_assets.staging import Staging
    stage = Staging()
    stage.path(sys.argv[1]).write_text("half")
    print("staged", flush=True)
    time.sleep(60)
""")


def test_staged_files_of_a_killed_process_are_removed_next_time(tmp_path):
    final = tmp_path / "out" / "labels.parquet"
    child = subprocess.Popen([sys.executable, "-c", STAGER, str(final)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "staged"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert len(_leftovers(tmp_path)) == 1 and not final.exists()
    with Staging() as stage:
        stage.path(final).write_text("whole")
        stage.commit()
    assert final.read_text() == "whole" and _leftovers(tmp_path) == []


# --- item 11: nothing runs that the user did not write -------------------------------------------


class _Plant:
    """Unpickling this runs open(marker, "w"): the file appears if anything unpickles it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["legacy_joblib", "npz_object_array", "record_points_at_pickle"])
def test_planted_pickle_in_the_data_folder_never_runs(clustered, tmp_path, where):
    root, db, _ = clustered
    model_dir = root / "cluster_models" / VARIANT
    marker = tmp_path / "planted-code-ran"
    labels_before = (root / "clusters.parquet" / f"variant={VARIANT}" / "part-0.parquet").read_bytes()
    record = json.loads((model_dir / "model.json").read_text())
    evil = pickle.dumps(_Plant(marker))
    if where == "legacy_joblib":  # the file earlier versions unpickled in reuse mode
        (model_dir / "model.joblib").write_bytes(evil)
    elif where == "npz_object_array":  # the model file itself swapped for one with a pickled array
        with open(model_dir / record["model_file"], "wb") as f:
            np.savez(f, header=np.array([_Plant(marker)], dtype=object))
    else:  # the record pointed at a pickle
        (model_dir / "model.joblib").write_bytes(evil)
        (model_dir / "model.json").write_text(json.dumps({**record, "model_file": "model.joblib"}))
    result = _run_clusters(root, _tracking(db))  # reuse mode: refit is false
    assert not marker.exists(), "the planted pickle was unpickled"
    if where == "legacy_joblib":
        assert result.success and _meta(result, "clusters")["mode"].startswith("assign")
        assert not (model_dir / "model.joblib").exists()  # removed once the model in use was confirmed
    else:
        assert not result.success
        text = _failure_text(result)
        assert "not a cluster model written by gbm-assets" in text and "was not loaded" in text
        assert (root / "clusters.parquet" / f"variant={VARIANT}" / "part-0.parquet").read_bytes() == labels_before


def test_stored_model_is_arrays_only_and_verified(clustered, tmp_path):
    root, _, _ = clustered
    model_dir = root / "cluster_models" / VARIANT
    record = json.loads((model_dir / "model.json").read_text())
    path = model_dir / record["model_file"]
    with np.load(path, allow_pickle=False) as stored:  # would raise on any pickled (object) array
        assert all(stored[name].dtype != object for name in stored.files)
    fitted = load_clustering(path, expected_fingerprint=record["fingerprint"])
    assert fitted.fingerprint() == record["fingerprint"]
    other = tmp_path / "other.npz"
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["gmm.means_"] = arrays["gmm.means_"] + 1  # same format, different fit
    np.savez(other, **arrays)
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        load_clustering(other, expected_fingerprint=record["fingerprint"])


# --- item 8: clustering a handful of cells ---------------------------------------------------------


def _cells(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 5, (3, 16))[rng.integers(0, 3, n)] + rng.normal(0, 1, (n, 16))).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 50])
def test_clustering_few_cells_labels_every_cell_or_says_why(n, tmp_path):
    x = _cells(n)
    if n < MIN_CELLS:
        with pytest.raises(TooFewCells, match=rf"^{n} cells? to cluster: clustering needs at least {MIN_CELLS} \(UMAP"):
            fit_clusters(x)
        return
    fitted, labels = fit_clusters(x)
    assert len(labels) == n and np.isfinite(labels[["umap_x", "umap_y", "gmm_prob"]].to_numpy()).all()
    assert labels["gmm"].between(0, fitted.gmm.n_components - 1).all() and (labels["hdbscan"] >= -1).all()
    assert fitted.gmm.n_components <= max(1, n // 2) and fitted.params["umap_neighbors"] <= n - 1
    save_clustering(fitted, tmp_path / "m.npz")
    restored = load_clustering(tmp_path / "m.npz", expected_fingerprint=fitted.fingerprint())
    new = assign_new(restored, _cells(7, seed=1))
    assert len(new) == 7 and np.isfinite(new[["umap_x", "umap_y"]].to_numpy()).all()


def test_clusters_asset_below_minimum_says_why_and_report_shows_it(clustered):
    root, db, _ = clustered
    _write_embeddings(root, n=MIN_CELLS - 1)
    tracking = _tracking(db)
    result = _run_clusters(root, tracking)
    assert result.success
    meta = _meta(result, "clusters")
    assert meta["skipped"].startswith(f"{MIN_CELLS - 1} cells to cluster: clustering needs at least {MIN_CELLS}")
    assert not (root / "clusters.parquet" / f"variant={VARIANT}" / "part-0.parquet").exists()  # no stale labels
    report = dg.materialize(
        [composition_report],
        instance=dg.DagsterInstance.ephemeral(),
        resources={"data": DataDirs(root=str(root)), "mlflow_tracking": tracking},
    )
    page = Path(_meta(report, "composition_report")["report"]).read_text(encoding="utf-8")
    assert f"Not clustered: {MIN_CELLS - 1} cells to cluster: clustering needs at least {MIN_CELLS}" in page
    # Enough cells again: labels for every cell, and the note is gone.
    n = _write_embeddings(root, n=MIN_CELLS + 1)
    again = _run_clusters(root, tracking)
    assert again.success and _meta(again, "clusters")["n_cells"] == n
    assert len(pq.read_table(root / "clusters.parquet" / f"variant={VARIANT}" / "part-0.parquet")) == n
    assert not (root / "cluster_models" / VARIANT / "skipped.json").exists()


# --- item 7: small data ----------------------------------------------------------------------------


def _rows(cultures, images) -> pd.DataFrame:
    return pd.DataFrame(
        {"plate": "p", "image": images, "culture": cultures, "concentration": ["1", "2"] * (len(images) // 2)}
    )


def test_evaluation_says_why_a_target_is_not_scored(tmp_path):
    assert why_not_evaluable(pd.Series(["A"] * 10), pd.Series(range(10)), "culture") == "needs >= 2 cultures (found 1)"
    assert (
        why_not_evaluable(pd.Series(["A", "B"] * 2), pd.Series([0, 0, 1, 2]), "culture")
        == "needs >= 5 images (found 3)"
    )
    assert why_not_evaluable(pd.Series(["A", "B"] * 5), pd.Series(range(10)), "culture") is None
    rows = _rows(["A"] * 12, [f"i{i % 3}" for i in range(12)])
    features = {"embedding": np.random.default_rng(0).random((12, 4))}
    scores, figures = evaluate_variant(rows, features, tmp_path, "tiny")
    assert figures == []
    assert scores[scores["split"] == "image"].set_index("target")["skipped"].to_dict() == {
        "culture": "needs >= 2 cultures (found 1)",
        "concentration": "needs >= 5 images (found 3)",
    }
    assert scores["accuracy"].isna().all()


def test_report_shows_the_reason_where_the_scores_would_be(tmp_path):
    rows = _rows(["A"] * 12, [f"i{i % 3}" for i in range(12)])
    features = {
        "embedding": np.random.default_rng(0).random((12, 4)),
        "raw_pixels": np.random.default_rng(1).random((12, 4)),
    }
    scores, _ = evaluate_variant(rows, features, tmp_path / "evaluation" / VARIANT, VARIANT)
    write_parquet_atomic(
        pa.Table.from_pandas(scores, preserve_index=False), tmp_path / "evaluation" / VARIANT / "scores.parquet"
    )
    table = comparison_table(tmp_path / "evaluation", [VARIANT])
    assert table["culture_skipped"].tolist() == ["needs >= 2 cultures (found 1)"] * 2  # the variant and raw pixels
    page = write_report(tmp_path / "report", table).read_text(encoding="utf-8")
    body = page.split("<table", 1)[1]
    assert body.count("needs &gt;= 2 cultures (found 1)") >= 4  # accuracy and kappa cells of both rows
    assert "needs &gt;= 5 images (found 3)" in body
    assert "culture_skipped" not in body  # the reason stands in the score cells, not in a column of its own


def test_batch_size_adapts_to_few_crops_down_to_the_method_minimum():
    from gbm_assets.errors import InputError
    from gbm_assets.models.training import usable_batch_size
    from gbm_assets.models.variants import get_variant

    siamese, autoencoder = get_variant("siamese_a"), get_variant("autoencoder")
    assert usable_batch_size(42, 128, siamese) == 42  # fewer crops than a batch: one batch of all
    assert usable_batch_size(500, 128, siamese) == 128
    assert usable_batch_size(2, 128, siamese) == 2 and usable_batch_size(1, 128, autoencoder) == 1
    with pytest.raises(InputError, match="1 crop selected: training siamese_a needs at least 2 .Barlow Twins"):
        usable_batch_size(1, 128, siamese, "data/cell_crops.parquet")
    with pytest.raises(InputError, match="0 crops selected: training autoencoder needs at least 1"):
        usable_batch_size(0, 128, autoencoder)


def test_one_culture_four_images_few_crops_give_embeddings_clusters_and_report(tmp_path, monkeypatch):
    """A lab with one culture, 4 images and fewer crops than a batch: every asset answers (TensorFlow).

    Then (item 1 for embeddings) an MLflow call that fails leaves the embeddings file (the same
    inode, not merely the same bytes) and the evaluation folder as they were.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from gbm_assets.assets.encoders import embeddings, trained_encoders
    from gbm_assets.imaging.synthetic import write_plates

    root = tmp_path / "data"
    write_plates(root / "raw", n_cultures=1, n_concentrations=1, images_per_plate=4, size=512, seed=3)
    (plate_id,) = find_ready_plates(root / "raw")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_id])
    tracking = _tracking(tmp_path / "mlflow.db")
    resources = {"data": DataDirs(root=str(root)), "mlflow_tracking": tracking}
    assert dg.materialize(
        INGEST, partition_key=plate_id, instance=instance, resources=resources, run_config=SMALL_CROPS
    ).success
    n_crops = plate_dataset(root / "cell_crops.parquet").count_rows()
    assert MIN_CELLS <= n_crops < 128
    result = dg.materialize(
        [trained_encoders, embeddings, clusters],
        partition_key=VARIANT,
        instance=instance,
        resources=resources,
        run_config={"ops": {"trained_encoders": {"config": {"epochs": 1, "max_steps_per_epoch": 1}}}},
    )
    assert result.success
    trained = _meta(result, "trained_encoders")
    assert trained["batch_size"] == n_crops
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == 30]  # logging.WARNING
    assert any(f"fewer than one batch of 128: training in batches of {n_crops}" in w for w in warnings)
    mlflow.set_tracking_uri(tracking.resolved_uri())
    run = mlflow.MlflowClient().get_run(trained["mlflow_run_id"])
    assert run.data.params["batch_size"] == str(n_crops) and run.data.params["configured_batch_size"] == "128"
    assert run.data.tags["gbm.evaluation.culture"] == "not evaluated: needs >= 2 cultures (found 1)"
    assert run.data.tags["gbm.evaluation.concentration"] == "not evaluated: needs >= 2 concentrations (found 1)"
    emb = _meta(result, "embeddings")
    assert "culture: needs >= 2 cultures (found 1)" in emb["not_evaluated"] and emb["n_crops"] == n_crops
    assert _meta(result, "clusters")["n_cells"] == n_crops
    report = dg.materialize([composition_report], instance=instance, resources=resources)
    assert report.success
    page = Path(_meta(report, "composition_report")["report"]).read_text(encoding="utf-8")
    assert "needs &gt;= 2 cultures (found 1)" in page
    assert "needs \\>= 2 cultures (found 1)" in _meta(report, "composition_report")["summary"]

    emb_file = DataDirs(root=str(root)).embeddings_file(VARIANT)
    evaluation = {p: p.read_bytes() for p in (root / "evaluation" / VARIANT).rglob("*") if p.is_file()}
    inode, before = emb_file.stat().st_ino, emb_file.read_bytes()

    def broken_log_text(*args, **kwargs):
        raise MlflowException("injected: scores.csv could not be logged")

    monkeypatch.setattr(mlflow, "log_text", broken_log_text)
    failed = dg.materialize(
        [embeddings], partition_key=VARIANT, instance=instance, resources=resources, raise_on_error=False
    )
    assert not failed.success and "injected" in _failure_text(failed)
    assert emb_file.stat().st_ino == inode and emb_file.read_bytes() == before
    assert {p: p.read_bytes() for p in (root / "evaluation" / VARIANT).rglob("*") if p.is_file()} == evaluation
    assert _leftovers(root) == []


def test_clusters_asset_clusters_a_row_by_its_own_vector_and_preprocessing(clustered):
    """siamese_b_ds2_cell (Variant.cluster_vector/cluster_preprocess): the invariant embedding, spherized;
    the run config still overrides the row."""
    root, db, _ = clustered
    variant = "siamese_b_ds2_cell"
    rows = plate_dataset(root / "cell_crops.parquet").to_table(columns=list(PROVENANCE_COLUMNS)).to_pandas()
    rng = np.random.default_rng(0)
    invariant = rng.normal(0, 1, (len(rows), 128)).astype(np.float32)
    plain = invariant + rng.normal(0, 1, invariant.shape).astype(np.float32)
    data = DataDirs(root=str(root))
    write_parquet_atomic(embedding_batch(rows, plain, invariant), data.embeddings_file(variant))
    data.encoder_dir(variant).mkdir(parents=True, exist_ok=True)
    data.encoder_record(variant).write_text(json.dumps({"run_id": "encoder-run-of-the-test"}))

    def run(config):
        assert dg.materialize(
            [clusters],
            partition_key=variant,
            instance=dg.DagsterInstance.ephemeral(),
            resources={"data": data, "mlflow_tracking": _tracking(db)},
            run_config={"ops": {"clusters": {"config": config}}},
        ).success
        record = json.loads(data.cluster_models(variant).record.read_text())
        return record["vector"], load_clustering(data.cluster_models(variant).folder / record["model_file"])

    vector, fitted = run({})
    assert vector == "embedding_invariant" and fitted.config.preprocess == "spherize"
    np.testing.assert_allclose(fitted.transform.center, invariant.mean(axis=0), atol=1e-5)
    # with the row's neighbour contact from the crops' CellProfiler neighbour measurements
    assert fitted.config.neighbor_weight == 2.0 and fitted.context_transform is not None
    assert fitted.umap._raw_data.shape[1] == fitted.transform.matrix.shape[1] + 1
    # the report's section says so (from the models' record)
    said = clustered_on(json.loads(data.cluster_models(variant).record.read_text()))
    assert "embedding_invariant" in said and "spherize" in said and "neighbour contact" in said and "weight 2" in said
    vector, fitted = run({"vector": "embedding", "preprocess": "none", "neighbor_weight": 0.0})
    said = clustered_on(json.loads(data.cluster_models(variant).record.read_text()))
    assert said == "Clustered on embedding."
    assert vector == "embedding" and fitted.config.preprocess == "none" and fitted.transform is None
    assert fitted.context_transform is None
