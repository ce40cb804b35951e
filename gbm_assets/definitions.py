"""Dagster Definitions: the asset graph, its checks, resources, jobs and sensors."""

import dagster as dg

from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import INGEST_JOB_NAME, new_plate_sensor

ingest_plate = dg.define_asset_job(
    INGEST_JOB_NAME,
    selection=dg.AssetSelection.assets(raw_plates, cell_coordinates, cell_crops),
    partitions_def=plates,
    description="Validate a plate, find its cells and crop them.",
)

defs = dg.Definitions(
    assets=[raw_plates, cell_coordinates, cell_crops],
    jobs=[ingest_plate],
    sensors=[new_plate_sensor],
    resources={"data": DataDirs()},
)
