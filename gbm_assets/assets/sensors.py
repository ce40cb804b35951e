"""The new-plate sensor: registers plates that appear under data/raw/ and requests their ingestion."""


import json

import dagster as dg

from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.plates import MANIFEST_NAME, find_ready_plates, unusable_plate_folders

INGEST_JOB_NAME = "ingest_plate"


def manifest_version(data: DataDirs, plate_id: str) -> int:
    return (data.plate_dir(plate_id) / MANIFEST_NAME).stat().st_mtime_ns


@dg.sensor(
    job_name=INGEST_JOB_NAME,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new plate folder (with manifest.csv) under data/raw/ and ingests it; "
    "a rewritten manifest re-ingests its plate once.",
)
def new_plate_sensor(context: dg.SensorEvaluationContext, data: DataDirs) -> dg.SensorResult:
    """Run keys are plate@manifest-version, so a plate is ingested once per manifest version.

    The cursor remembers the manifest versions seen: a plate already ingested (by the command
    line, say) is not re-run when the sensor first sees it, only when its manifest changes.
    """
    for problem in unusable_plate_folders(data.raw):
        context.log.warning(f"not a plate: {problem}")
    ready = find_ready_plates(data.raw)
    if not ready:
        return dg.SensorResult(skip_reason=f"no usable plate with {MANIFEST_NAME} under {data.raw}")
    instance = context.instance
    known = set(instance.get_dynamic_partitions(plates.name))
    done = instance.get_materialized_partitions(dg.AssetKey("cell_crops"))
    seen = json.loads(context.cursor) if context.cursor else {}
    requests = []
    for plate_id in ready:
        version = manifest_version(data, plate_id)
        unchanged = seen.get(plate_id, version) == version
        if plate_id not in done or not unchanged:
            requests.append(dg.RunRequest(run_key=f"{plate_id}@{version}", partition_key=plate_id, tags={"gbm/plate": plate_id}))
        seen[plate_id] = version
    new = [p for p in ready if p not in known]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[plates.build_add_request(new)] if new else [],
        cursor=json.dumps(seen, sort_keys=True),
    )
