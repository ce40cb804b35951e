"""Dagster Definitions: the asset graph, its checks, resources, jobs and sensors."""

import importlib
import os

import dagster as dg

from gbm_assets.assets.automation import (
    REPORT_JOB_NAME,
    TRAIN_JOB_NAME,
    UPDATE_JOB_NAME,
    nightly_retraining,
    report_sensor,
    stale_variants_sensor,
)
from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.clusters import clusters, composition_report
from gbm_assets.assets.encoders import embeddings, trained_encoders
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import plates, variants
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import INGEST_JOB_NAME, new_plate_sensor

ingest_plate = dg.define_asset_job(
    INGEST_JOB_NAME,
    selection=dg.AssetSelection.assets(raw_plates, cell_coordinates, cell_crops),
    partitions_def=plates,
    description="Validate a plate, find its cells and crop them.",
)

train_all_variants = dg.define_asset_job(
    TRAIN_JOB_NAME,
    selection=dg.AssetSelection.assets(trained_encoders, embeddings),
    partitions_def=variants,
    description="Train every model variant's encoder on all plates, embed every crop and score it.",
)

cluster_all_variants = dg.define_asset_job(
    "cluster_all_variants",
    selection=dg.AssetSelection.assets(clusters),
    partitions_def=variants,
    description="Cluster every variant's embeddings (labels new cells without refitting unless refit is set).",
)

update_variant = dg.define_asset_job(
    UPDATE_JOB_NAME,
    selection=dg.AssetSelection.assets(embeddings, clusters),
    partitions_def=variants,
    description="Re-embed every crop with a variant's current encoder and label new cells (no refit).",
)

refresh_report = dg.define_asset_job(
    REPORT_JOB_NAME,
    selection=dg.AssetSelection.assets(composition_report),
    description="Rebuild the composition report from every variant's clusters.",
)

# Where a run's steps execute is deployment configuration: GBM_EXECUTOR=celery or k8s picks
# dagster-celery's or dagster-k8s's executor (install that package); unset keeps Dagster's default
# (multiprocess, or in-process via run config). Their settings go in run config (docs/deployment.md).
EXECUTORS = {"celery": ("dagster_celery", "celery_executor"), "k8s": ("dagster_k8s", "k8s_job_executor")}


def configured_executor():
    kind = os.environ.get("GBM_EXECUTOR", "").strip().lower()
    if not kind:
        return None
    if kind not in EXECUTORS:
        raise ValueError(f"GBM_EXECUTOR={kind!r}: use one of {sorted(EXECUTORS)} or leave it unset")
    module, name = EXECUTORS[kind]
    return getattr(importlib.import_module(module), name)


defs = dg.Definitions(
    executor=configured_executor(),
    assets=[raw_plates, cell_coordinates, cell_crops, trained_encoders, embeddings, clusters, composition_report],
    jobs=[ingest_plate, train_all_variants, update_variant, cluster_all_variants, refresh_report],
    sensors=[new_plate_sensor, stale_variants_sensor, report_sensor],
    schedules=[nightly_retraining],
    resources={"data": DataDirs(), "mlflow_tracking": MLflowTracking()},
)
