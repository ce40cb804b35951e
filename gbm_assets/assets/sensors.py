"""The new-plate sensor: registers plates that appear under data/raw/ and requests their ingestion.

A plate is (re)ingested when the manifest its crops were made from is not the manifest it has now
(compared by content: gbm_assets.imaging.plates.manifest_sha256; touching an identical manifest
changes nothing), or when its crops file is gone (`gbm-assets remove-plate` without --delete-raw),
as `gbm-assets run` does. A failed ingestion is retried with a new run key after a back-off, up to
GBM_PLATE_RETRIES times (default 5); the waits are GBM_PLATE_RETRY_BACKOFF_S (default 60) seconds,
doubling each time, counted from the end of the failed run. A changed manifest starts again from
its first run.
"""

import json
import math
import os
import time
from dataclasses import dataclass

import dagster as dg

from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.errors import PlateError
from gbm_assets.imaging.plates import MANIFEST_NAME, find_ready_plates, manifest_sha256, unusable_plate_folders
from gbm_assets.paths import plate_file

INGEST_JOB_NAME = "ingest_plate"
PLATE_TAG = "gbm/plate"
VERSION_TAG = "gbm/version"
RETRY_TAG = "gbm/retry"
RETRY_OF_TAG = "gbm/retry_of"  # the failed run a retry follows
CURSOR_FORMAT = "gbm-plates-2"
RETRIES_ENV, BACKOFF_ENV = "GBM_PLATE_RETRIES", "GBM_PLATE_RETRY_BACKOFF_S"
DEFAULT_RETRIES, DEFAULT_BACKOFF_S = 5, 60.0
LEGACY_VERSION = "legacy"  # crops materialized before plate versions were recorded


def _now() -> float:
    """Seconds since the epoch (the sensor's clock; tests replace it)."""
    return time.time()


def _env_number(name: str, default, kind):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={raw!r}: give a {'whole ' if kind is int else ''}number >= 0")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """At most `retries` retries of a failed plate, waiting backoff_s * 2**(n-1) before retry n."""

    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """From GBM_PLATE_RETRIES and GBM_PLATE_RETRY_BACKOFF_S; ValueError naming a bad one."""
        return cls(_env_number(RETRIES_ENV, DEFAULT_RETRIES, int), _env_number(BACKOFF_ENV, DEFAULT_BACKOFF_S, float))

    def wait_s(self, retry: int) -> float:
        return self.backoff_s * 2 ** (retry - 1)


def manifest_version(data: DataDirs, plate_id: str) -> str:
    """The plate's manifest content version: the first 16 hex digits of its SHA-256."""
    return manifest_sha256(data.plate_dir(plate_id))[:16]


def built_version(instance: dg.DagsterInstance, plate_id: str, data: DataDirs | None = None) -> str | None:
    """Manifest version (16 hex digits) the plate's current cell_crops were made from.

    None if cell_crops was never materialized for it, or (given `data`) its crops file is gone
    (removed by `gbm-assets remove-plate` or by hand: the event log may keep the record, SQLite
    storage cannot wipe one partition); "legacy" if it was, before versions were recorded.
    """
    if data is not None and not plate_file(data.crops, plate_id).is_file():
        return None
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("cell_crops"), asset_partitions=[plate_id]), limit=1
    ).records
    if not records:
        return None
    recorded = records[0].asset_materialization.metadata.get("manifest_sha256")
    return str(recorded.value)[:16] if recorded is not None else LEGACY_VERSION


def _read_cursor(cursor: str | None) -> tuple[dict, dict]:
    """(adopted, old_mtimes) from a cursor of this format or of the first one ({plate: manifest mtime_ns})."""
    data = json.loads(cursor) if cursor else {}
    if isinstance(data, dict) and data.get("format") == CURSOR_FORMAT:
        return dict(data.get("adopted", {})), {}
    return {}, {k: v for k, v in (data.items() if isinstance(data, dict) else []) if isinstance(v, int)}


def plan_plate(instance: dg.DagsterInstance, plate_id: str, version: str, policy: RetryPolicy, now: float):
    """(RunRequest or None, message or None) for a plate whose crops are not of manifest `version`.

    Looks at the sensor's earlier runs of the plate (tag gbm/plate): waits while one is in
    progress; retries a failed run of this version after its back-off, up to the policy's cap;
    leaves a canceled run alone; otherwise requests a fresh run.
    """
    latest = instance.get_run_records(filters=dg.RunsFilter(tags={PLATE_TAG: plate_id}), limit=1)
    if latest and not latest[0].dagster_run.is_finished:
        run = latest[0].dagster_run
        return None, f"plate {plate_id}: waiting for its run {run.run_id} ({run.status.value})"
    same = instance.get_run_records(filters=dg.RunsFilter(tags={PLATE_TAG: plate_id, VERSION_TAG: version}))
    streak = 0
    if latest and latest[0].dagster_run.tags.get(VERSION_TAG) == version:
        if latest[0].dagster_run.status == dg.DagsterRunStatus.CANCELED:
            return None, (
                f"plate {plate_id}: run {latest[0].dagster_run.run_id} was canceled; it is not retried "
                f"until its {MANIFEST_NAME} changes (or run `gbm-assets run --refresh`)"
            )
        for record in same:
            if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
                break
            streak += 1
    tags = {PLATE_TAG: plate_id, VERSION_TAG: version}
    if streak == 0:
        key = f"{plate_id}@{version}" if not same else f"{plate_id}@{version}#run-{len(same) + 1}"
        return dg.RunRequest(run_key=key, partition_key=plate_id, tags=tags), None
    failed = same[0]
    run_id = failed.dagster_run.run_id
    if streak > policy.retries:
        return None, (
            f"plate {plate_id}: given up after {streak} failed runs of manifest version {version} "
            f"(last: run {run_id}); it is ingested again when its {MANIFEST_NAME} changes "
            "(or run `gbm-assets run --refresh`)"
        )
    ended = failed.end_time or failed.update_timestamp.timestamp()
    due = ended + policy.wait_s(streak)
    if now < due:
        return None, (
            f"plate {plate_id}: run {run_id} failed; retry {streak} of {policy.retries} in {math.ceil(due - now)} s"
        )
    key = f"{plate_id}@{version}#retry-{streak}" if len(same) == streak else f"{plate_id}@{version}#run-{len(same) + 1}"
    request = dg.RunRequest(
        run_key=key, partition_key=plate_id, tags={**tags, RETRY_TAG: str(streak), RETRY_OF_TAG: run_id}
    )
    return request, f"retrying plate {plate_id} (attempt {streak} of {policy.retries}) after failure of run {run_id}"


@dg.sensor(
    job_name=INGEST_JOB_NAME,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new plate folder (with manifest.csv) under data/raw/ and ingests it; "
    "a changed manifest re-ingests its plate once; a failed ingestion is retried with back-off "
    f"({RETRIES_ENV}, {BACKOFF_ENV}).",
)
def new_plate_sensor(context: dg.SensorEvaluationContext, data: DataDirs) -> dg.SensorResult:
    """Run keys are plate@<manifest version>, plus #retry-N for retries (tags gbm/retry=N, gbm/retry_of=<run id>).

    The plate's crops record the manifest version they were made from (cell_crops metadata
    manifest_sha256). Crops made before versions were recorded are taken to be of the manifest the
    sensor first sees (kept in the cursor, which also reads the first cursor format,
    {plate: manifest mtime_ns}): such a plate is not re-run until its manifest changes.
    """
    for problem in unusable_plate_folders(data.raw):
        context.log.warning(f"not a plate: {problem}")
    ready = find_ready_plates(data.raw)
    if not ready:
        return dg.SensorResult(skip_reason=f"no usable plate with {MANIFEST_NAME} under {data.raw}")
    policy = RetryPolicy.from_env()
    instance = context.instance
    known = set(instance.get_dynamic_partitions(plates.name))
    adopted, old_mtimes = _read_cursor(context.cursor)
    still_adopted = {}
    requests, messages = [], []
    now = _now()
    for plate_id in ready:
        try:
            version = manifest_version(data, plate_id)
        except PlateError as exc:  # removed or unreadable since it was listed: next tick
            context.log.warning(f"plate {plate_id} skipped this tick: {exc}")
            continue
        built = built_version(instance, plate_id, data)  # crops gone (remove-plate): not ingested
        if built == LEGACY_VERSION:
            if plate_id in adopted:
                built = adopted[plate_id]
            elif plate_id in old_mtimes:
                mtime = (data.plate_dir(plate_id) / MANIFEST_NAME).stat().st_mtime_ns
                built = version if old_mtimes[plate_id] == mtime else "changed"
            else:
                built = version  # ingested before the sensor saw it (by the command line, say)
            still_adopted[plate_id] = built
        if built == version:
            continue
        request, message = plan_plate(instance, plate_id, version, policy, now)
        if request is not None:
            requests.append(request)
        if message:
            messages.append(message)
            context.log.info(message)
    new = [p for p in ready if p not in known]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[plates.build_add_request(new)] if new else [],
        cursor=json.dumps({"format": CURSOR_FORMAT, "adopted": still_adopted}, sort_keys=True),
        skip_reason=None if requests else ("; ".join(messages) or "every plate is up to date"),
    )
