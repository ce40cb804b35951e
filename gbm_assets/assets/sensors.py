"""The new-plate sensor: registers plates that appear under data/raw/ and requests their ingestion."""


import dagster as dg

from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.plates import MANIFEST_NAME, find_ready_plates

INGEST_JOB_NAME = "ingest_plate"


def plate_run_key(data: DataDirs, plate_id: str) -> str:
    """One run per plate and manifest version: re-writing a manifest re-runs the plate, once."""
    mtime = (data.plate_dir(plate_id) / MANIFEST_NAME).stat().st_mtime_ns
    return f"{plate_id}@{mtime}"


@dg.sensor(
    job_name=INGEST_JOB_NAME,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new plate folder (with manifest.csv) under data/raw/ and ingests it.",
)
def new_plate_sensor(context: dg.SensorEvaluationContext, data: DataDirs) -> dg.SensorResult:
    ready = find_ready_plates(data.raw)
    known = set(context.instance.get_dynamic_partitions(plates.name))
    new = [p for p in ready if p not in known]
    requests = [
        dg.RunRequest(run_key=plate_run_key(data, p), partition_key=p, tags={"gbm/plate": p}) for p in ready
    ]
    if not ready:
        return dg.SensorResult(skip_reason=f"no plate with {MANIFEST_NAME} under {data.raw}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[plates.build_add_request(new)] if new else [],
    )
