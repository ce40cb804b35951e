"""Automation beyond ingestion: new crops re-embed and re-label every trained variant, new labels
refresh the report, and a schedule retrains the encoders (nightly by default).

Sensors compare Dagster's own event-log storage ids (a monotonic counter): a variant whose
latest embeddings are older than the latest crops of any plate, or whose embeddings hold cells of
a plate that has no crops any more (removed), is out of date. Requests carry
run keys built from those ids, so a tick repeated or raced never launches the same work twice,
and nothing is requested while plates are still being ingested (one update after a batch of
plates, not one per plate).
"""

import os

import dagster as dg

from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import INGEST_JOB_NAME
from gbm_assets.models.variants import variant_names
from gbm_assets.plate_removal import plates_gone

UPDATE_JOB_NAME = "update_variant"
REPORT_JOB_NAME = "refresh_report"
TRAIN_JOB_NAME = "train_all_variants"
VARIANT_TAG = "gbm/variant"  # one run per variant at a time: see run_queue in .dagster_home/dagster.yaml
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
MATERIALIZATION = dg.DagsterEventType.ASSET_MATERIALIZATION


def latest_ids(instance: dg.DagsterInstance, asset: str) -> dict[str, int]:
    """Latest materialization storage id per partition of an asset."""
    return instance.get_latest_storage_id_by_partition(dg.AssetKey(asset), MATERIALIZATION)


def _busy(instance: dg.DagsterInstance, job_name: str, tags: dict | None = None) -> bool:
    return bool(instance.get_runs_count(dg.RunsFilter(job_name=job_name, statuses=ACTIVE, tags=tags or {})))


@dg.sensor(
    job_name=UPDATE_JOB_NAME,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When plates got new crops, re-embed and re-label (no refit) every trained variant.",
)
def stale_variants_sensor(context: dg.SensorEvaluationContext, data: DataDirs) -> dg.SensorResult:
    instance = context.instance
    crops = latest_ids(instance, "cell_crops")
    if not crops:
        return dg.SensorResult(skip_reason="no crops yet")
    if _busy(instance, INGEST_JOB_NAME):
        return dg.SensorResult(skip_reason="plates are being ingested; waiting for them to finish")
    newest_crops = max(crops.values())
    embedded = latest_ids(instance, "embeddings")
    requests = []
    for variant in variant_names():
        trained = data.encoder_record(variant).is_file()
        # A removed plate (gbm-assets remove-plate) leaves no newer crops, only embeddings holding its cells.
        gone = plates_gone(data.embeddings_file(variant), data.crops) if trained else []
        stale = embedded.get(variant, -1) < newest_crops or bool(gone)
        if trained and stale and not _busy(instance, UPDATE_JOB_NAME, {VARIANT_TAG: variant}):
            key = f"{variant}@{newest_crops}" + (f"-without-{'+'.join(gone)}" if gone else "")
            requests.append(dg.RunRequest(run_key=key, partition_key=variant, tags={VARIANT_TAG: variant}))
    return (
        dg.SensorResult(run_requests=requests)
        if requests
        else dg.SensorResult(skip_reason="every trained variant is up to date")
    )


@dg.sensor(
    job_name=REPORT_JOB_NAME,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When any variant's clusters change, rebuild the composition report (once things settle).",
)
def report_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    instance = context.instance
    labelled = latest_ids(instance, "clusters")
    if not labelled:
        return dg.SensorResult(skip_reason="no clusters yet")
    if any(_busy(instance, job) for job in (INGEST_JOB_NAME, UPDATE_JOB_NAME, TRAIN_JOB_NAME, REPORT_JOB_NAME)):
        return dg.SensorResult(skip_reason="upstream work in progress")
    newest = max(labelled.values())
    report = instance.fetch_materializations(dg.AssetKey("composition_report"), limit=1).records
    if report and report[0].storage_id > newest:
        return dg.SensorResult(skip_reason="report is up to date")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"report@{newest}")])


RETRAIN_CRON = os.environ.get("GBM_RETRAIN_CRON", "0 2 * * *")


@dg.schedule(
    cron_schedule=RETRAIN_CRON,
    job_name=TRAIN_JOB_NAME,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    execution_timezone=os.environ.get("GBM_RETRAIN_TZ", "UTC"),
    description="Retrain every variant on all plates (GBM_RETRAIN_CRON, default nightly at 02:00).",
)
def nightly_retraining(context: dg.ScheduleEvaluationContext):
    stamp = context.scheduled_execution_time.isoformat()
    for variant in variant_names():
        if _busy(context.instance, TRAIN_JOB_NAME, {VARIANT_TAG: variant}):
            continue  # never two trainings of one variant at once
        yield dg.RunRequest(run_key=f"retrain-{variant}-{stamp}", partition_key=variant, tags={VARIANT_TAG: variant})
