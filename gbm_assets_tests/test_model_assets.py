"""The model half of the graph on an ephemeral instance: encoders, embeddings, clusters, report."""

from __future__ import annotations

import json
import re
import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.clusters import clusters, composition_report
from gbm_assets.assets.encoders import embeddings, trained_encoders
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.schema import PROVENANCE_COLUMNS
from gbm_assets.storage import plate_dataset

TINY_TRAINING = {"epochs": 2, "max_steps_per_epoch": 3, "batch_size": 32, "seed": 1, "max_minutes": None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_plates):
    """All small synthetic plates but one ingested with 64 px crops; two variants trained, embedded, clustered."""
    root = tmp_path_factory.mktemp("enc") / "data"
    shutil.copytree(synth_plates, root / "raw")
    late = sorted((root / "raw").iterdir())[-1]
    late.rename(root / "late_plate")  # arrives after clustering
    tracking = MLflowTracking(
        tracking_uri=f"sqlite:///{root.parent / 'mlflow.db'}", artifact_root=(root.parent / "artifacts").as_uri()
    )
    resources = {"data": DataDirs(root=str(root)), "mlflow_tracking": tracking}
    instance = dg.DagsterInstance.ephemeral()
    plate_ids = find_ready_plates(root / "raw")
    instance.add_dynamic_partitions(plates.name, plate_ids)
    ingest_config = {"ops": {"cell_crops": {"config": {"crop_size": 64}}}}
    for plate_id in plate_ids:
        assert dg.materialize(
            [raw_plates, cell_coordinates, cell_crops],
            partition_key=plate_id,
            instance=instance,
            resources=resources,
            run_config=ingest_config,
        ).success
    results = {}
    for variant in ("autoencoder", "siamese_f"):
        results[variant] = dg.materialize(
            [trained_encoders, embeddings],
            partition_key=variant,
            instance=instance,
            resources=resources,
            run_config={
                "ops": {"trained_encoders": {"config": TINY_TRAINING}, "embeddings": {"config": {"batch_size": 64}}}
            },
        )
        assert results[variant].success
        assert dg.materialize([clusters], partition_key=variant, instance=instance, resources=resources).success
    report = dg.materialize([composition_report], instance=instance, resources=resources)
    assert report.success
    return root, tracking, results, instance, resources, report


def test_training_run_is_complete_in_mlflow(trained):
    import mlflow

    root, tracking, results, *_ = trained
    mlflow.set_tracking_uri(tracking.resolved_uri())
    client = mlflow.MlflowClient()
    for variant, result in results.items():
        meta = result.asset_materializations_for_node("trained_encoders")[0].metadata
        run = client.get_run(meta["mlflow_run_id"].value)
        p = run.data.params
        assert p["variant"] == variant and p["batch_size"] == "32" and p["crop_size"] == "64"
        assert {
            "features",
            "lambda",
            "segmentation",
            "learning_rate",
            "epochs",
            "seed",
            "n_crops",
            "n_plates",
            "git_commit",
        } <= set(p)
        assert run.data.tags["dagster.partition"] == variant
        assert p["max_minutes"] == "None" and p["patience"] == "3" and p["stopped_by"] == "epochs"
        assert run.data.metrics["steps_run"] == 6 and meta["stopped_by"].value == "epochs"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [0, 1] and all(np.isfinite(m.value) for m in history)
        # Evaluation lands in the same run, beside the raw-pixel baseline.
        assert "embedding.culture.accuracy" in run.data.metrics and "raw_pixels.culture.accuracy" in run.data.metrics
        # ... and the hand-crafted baseline, the linear probe and the split by plate (issue 13 items 2-3).
        for key in (
            "embedding.culture.plate_split.random_forest.kappa",
            "embedding.culture.image_split.linear_probe.kappa",
            "handcrafted.culture.accuracy",
            "handcrafted.culture.plate_split.linear_probe.kappa",
            "embedding.culture.plate_split.random_forest.kappa_sd",  # sd over the 5 group folds
            "raw_pixels.culture.kappa_sd",
        ):
            assert key in run.data.metrics, key
        assert p["evaluation.splits"] == "image,plate" and p["evaluation.baselines"] == "raw_pixels,handcrafted"
        assert p["evaluation.folds"] == "5"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/confusion_embedding_culture.png" in artifacts
        assert meta["mlflow_run"].value.endswith(run.info.run_id)


def test_registered_model_loads_and_embeds(trained):
    import mlflow

    root, tracking, *_ = trained
    mlflow.set_tracking_uri(tracking.resolved_uri())
    model = mlflow.keras.load_model("models:/gbm-encoder-siamese_f@current")
    out = model.predict_on_batch(np.random.default_rng(0).random((3, 64, 64, 1), dtype=np.float32))
    assert out.shape == (3, 128) and np.isfinite(out).all()


def test_embeddings_keep_provenance(trained):
    root, *_ = trained
    crops = plate_dataset(root / "cell_crops.parquet").to_table(columns=list(PROVENANCE_COLUMNS)).to_pandas()
    emb = pq.read_table(root / "embeddings.parquet" / "variant=autoencoder" / "part-0.parquet").to_pandas()
    assert len(emb) == len(crops) and emb["crop_id"].is_unique
    merged = emb.merge(crops, on="crop_id", suffixes=("", "_crop"))
    assert len(merged) == len(crops)
    for col in PROVENANCE_COLUMNS[1:]:
        assert (merged[col].astype(str) == merged[f"{col}_crop"].astype(str)).all(), col
    vectors = np.stack(emb["embedding"].to_numpy())
    assert vectors.shape == (len(crops), 64) and np.isfinite(vectors).all()


def test_embeddings_asset_writes_what_the_core_embedding_function_writes(trained, tmp_path):
    """The asset embeds through models.training.write_embeddings (the function tests and the benchmark use)."""
    from gbm_assets.models.training import write_embeddings

    root, tracking, results, instance, resources, _ = trained
    data = resources["data"]
    encoder = tracking.load_encoder(data.encoder_file("autoencoder"))
    write_embeddings(encoder, data.crops, tmp_path / "again.parquet", 64)
    asset, again = pq.read_table(data.embeddings_file("autoencoder")), pq.read_table(tmp_path / "again.parquet")
    assert asset.schema == again.schema and asset.num_rows == again.num_rows
    assert asset.select(list(PROVENANCE_COLUMNS)).equals(again.select(list(PROVENANCE_COLUMNS)))
    for vector in ("embedding", "embedding_invariant"):
        np.testing.assert_allclose(
            np.stack(asset[vector].to_numpy(zero_copy_only=False)),
            np.stack(again[vector].to_numpy(zero_copy_only=False)),
            rtol=1e-5,
            atol=1e-6,
        )


def test_cluster_labels_align_with_provenance(trained):
    root, *_ = trained
    emb = pq.read_table(
        root / "embeddings.parquet" / "variant=siamese_f" / "part-0.parquet", columns=list(PROVENANCE_COLUMNS)
    ).to_pandas()
    labels = pq.read_table(root / "clusters.parquet" / "variant=siamese_f" / "part-0.parquet").to_pandas()
    pd.testing.assert_frame_equal(labels[list(PROVENANCE_COLUMNS)], emb)
    assert {"umap_x", "umap_y", "hdbscan", "hdbscan_noise", "gmm", "gmm_prob", "gmm_probs", "auto"} <= set(labels)
    assert (labels["hdbscan_noise"] == (labels["hdbscan"] == -1)).all()
    assert np.allclose(np.stack(labels["gmm_probs"].to_numpy()).sum(axis=1), 1.0, atol=1e-4)


def test_new_plate_is_labelled_without_refit(trained):
    root, tracking, results, instance, resources, _ = trained
    model = root / "cluster_models" / "siamese_f" / "model.json"
    before = json.loads(model.read_text())
    old = pq.read_table(root / "clusters.parquet" / "variant=siamese_f" / "part-0.parquet").to_pandas()
    late = root / "late_plate"
    shutil.move(late, root / "raw" / late.name)
    instance.add_dynamic_partitions(plates.name, [late.name])
    assert dg.materialize(
        [raw_plates, cell_coordinates, cell_crops],
        partition_key=late.name,
        instance=instance,
        resources=resources,
        run_config={"ops": {"cell_crops": {"config": {"crop_size": 64}}}},
    ).success
    assert dg.materialize(
        [embeddings],
        partition_key="siamese_f",
        instance=instance,
        resources=resources,
        run_config={"ops": {"embeddings": {"config": {"batch_size": 64}}}},
    ).success
    result = dg.materialize([clusters], partition_key="siamese_f", instance=instance, resources=resources)
    meta = result.asset_materializations_for_node("clusters")[0].metadata
    new = pq.read_table(root / "clusters.parquet" / "variant=siamese_f" / "part-0.parquet").to_pandas()
    n_late = int((new["plate"] == late.name).sum())
    assert n_late > 0 and meta["mode"].value.startswith("assign")
    assert meta["n_predicted_without_refit"].value == n_late
    assert json.loads(model.read_text())["fingerprint"] == before["fingerprint"]
    kept = new[new["plate"] != late.name].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        kept[["crop_id", "hdbscan", "gmm", "auto"]], old[["crop_id", "hdbscan", "gmm", "auto"]]
    )


def test_report_renders_with_every_figure(trained):
    *_, report = trained
    meta = report.asset_materializations_for_node("composition_report")[0].metadata
    page = open(meta["report"].value, encoding="utf-8").read()
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]*)"', page)
    # per variant: 4 UMAP scatters, composition bar, montage, and at least one confusion matrix
    assert len(images) >= 2 * 7 and all(len(b) > 100 for b in images)
    assert "raw pixels" in page and 'id="best-variant"' in page
    assert "Best variant by culture kappa" in meta["summary"].value


def test_explorer_is_made_per_variant_and_linked(trained):
    root, tracking, results, instance, resources, report = trained
    import mlflow

    page = root / "reports" / "explorer" / "siamese_f.html"
    assert page.is_file() and page.stat().st_size > 1000
    html_text = (root / "reports" / "composition" / "report.html").read_text(encoding="utf-8")
    assert 'href="../explorer/siamese_f.html"' in html_text
    mlflow.set_tracking_uri(tracking.resolved_uri())
    runs = mlflow.search_runs(experiment_names=["gbm-assets"], filter_string="tags.`gbm.variant` = 'siamese_f'")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"], "explorer")}
    assert "explorer/siamese_f.html" in artifacts
