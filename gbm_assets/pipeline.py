"""The command-line main job: the same Dagster jobs the UI runs, driven in-process, with a progress bar.

Runs are recorded in the Dagster instance at DAGSTER_HOME, so they show in the UI afterwards.
Plates run one after another, each using every core for its images; a plate that fails is
reported and skipped, leaving the others (and its own earlier outputs) intact.
"""

from __future__ import annotations

import logging

import dagster as dg

from gbm_assets import paths
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.sensors import INGEST_JOB_NAME
from gbm_assets.imaging.plates import find_ready_plates

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
log = logging.getLogger("gbm_assets")


def register_plates(instance: dg.DagsterInstance) -> list[str]:
    """Add every ready plate under data/raw as a partition (what the sensor does on a tick)."""
    ready = find_ready_plates(paths.raw_dir())
    known = set(instance.get_dynamic_partitions(plates.name))
    new = [p for p in ready if p not in known]
    if new:
        instance.add_dynamic_partitions(plates.name, new)
    return ready


def ingest_plates(instance: dg.DagsterInstance, defs: dg.Definitions, plate_ids: list[str], bar) -> list[str]:
    """Run the ingest job per plate; return the plates that failed."""
    job = defs.resolve_job_def(INGEST_JOB_NAME)
    failed = []
    with bar(len(plate_ids), "ingesting plates", "plate") as progress:
        for plate_id in plate_ids:
            progress.set_postfix_str(plate_id)
            result = job.execute_in_process(
                run_config=QUIET, instance=instance, partition_key=plate_id, raise_on_error=False
            )
            if not result.success:
                failed.append(plate_id)
                progress.write(f"plate {plate_id} failed: {_first_error(result)}")
            progress.update(1)
    return failed


def _first_error(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            return event.step_failure_data.error.message.strip().splitlines()[-1]
    return "unknown error (see the run in the Dagster UI)"


def run_main_job(bar, refresh: bool = False) -> int:
    """Ingest every plate not yet done (all with refresh), then run every later stage."""
    from gbm_assets.definitions import defs

    raw = paths.raw_dir()
    instance = dg.DagsterInstance.get()
    ready = register_plates(instance)
    if not ready:
        print(f"no plates under {raw} (a plate is a folder with images and manifest.csv)")
        return 1
    done = set() if refresh else instance.get_materialized_partitions(dg.AssetKey("cell_crops"))
    todo = [p for p in ready if p not in done]
    print(f"{len(ready)} plates under {raw}; {len(todo)} to ingest")
    failed = ingest_plates(instance, defs, todo, bar)
    if failed:
        print(f"{len(failed)} plate(s) failed: {', '.join(failed)}; the others were processed")
        return 1
    print("done: open the Dagster UI to see the runs and assets")
    return 0
