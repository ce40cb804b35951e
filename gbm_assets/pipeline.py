"""The command-line main job: the same Dagster jobs the UI runs, driven in-process, with a progress bar.

Runs are recorded in the Dagster instance at DAGSTER_HOME, so they show in the UI afterwards.
Plates run one after another, each using every core for its images; a plate that fails is
reported and skipped, leaving the others (and its own earlier outputs) intact.
"""

from __future__ import annotations


import dagster as dg

from gbm_assets import paths
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import LEGACY_VERSION, INGEST_JOB_NAME, built_version, manifest_version
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.models.variants import variant_names

# Failures are reported as one line each by run_partitions; their stack traces are in the Dagster UI.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def register_plates(instance: dg.DagsterInstance) -> list[str]:
    """Add every ready plate under data/raw as a partition (what the sensor does on a tick)."""
    ready = find_ready_plates(paths.raw_dir())
    known = set(instance.get_dynamic_partitions(plates.name))
    new = [p for p in ready if p not in known]
    if new:
        instance.add_dynamic_partitions(plates.name, new)
    return ready


def plates_to_ingest(instance: dg.DagsterInstance, ready: list[str], refresh: bool = False) -> list[str]:
    """Plates never ingested, or whose crops were made from another manifest than today's (all with refresh).

    Plates ingested before versions were recorded count as done, as the sensor treats them.
    """
    if refresh:
        return list(ready)
    data = DataDirs()
    return [p for p in ready if built_version(instance, p) not in (manifest_version(data, p), LEGACY_VERSION)]


def run_partitions(instance, defs, job_name: str, keys: list[str], bar, what: str, unit: str) -> list[str]:
    """Run a partitioned job once per key, with a progress bar; return the keys that failed."""
    job = defs.resolve_job_def(job_name)
    failed = []
    with bar(len(keys), what, unit) as progress:
        for key in keys:
            progress.set_postfix_str(key)
            result = job.execute_in_process(run_config=QUIET, instance=instance, partition_key=key, raise_on_error=False)
            stop_if_interrupted(result)
            if not result.success:
                failed.append(key)
                progress.write(f"{unit} {key} failed: {_first_error(result)}")
            progress.update(1)
    return failed


def stop_if_interrupted(result: dg.ExecuteInProcessResult) -> None:
    """Raise KeyboardInterrupt when a run failed because the process was told to stop.

    Dagster turns Ctrl-C and SIGTERM during a step into a failed step; without this check the
    command would go on to the next plate or variant instead of stopping.
    """
    for event in result.all_events:
        error = event.step_failure_data.error if event.is_step_failure and event.step_failure_data else None
        while error is not None:
            if error.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                raise KeyboardInterrupt(f"run {result.run_id} interrupted")
            error = error.cause
        if event.is_run_failure and "interrupt" in (event.message or "").lower():
            raise KeyboardInterrupt(f"run {result.run_id} interrupted")


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
        print(f"no usable plates under {raw} (a plate is a folder with images and manifest.csv, named by a safe id)")
        return 1
    todo = plates_to_ingest(instance, ready, refresh)
    print(f"{len(ready)} plates under {raw}; {len(todo)} to ingest")
    failed = run_partitions(instance, defs, INGEST_JOB_NAME, todo, bar, "ingesting plates", "plate")
    if failed:
        print(f"{len(failed)} plate(s) failed: {', '.join(failed)}; the others were processed")
    # Encoders retrain when plates changed (or on --refresh); clusters then label every cell.
    trained = set() if (refresh or todo) else instance.get_materialized_partitions(dg.AssetKey("embeddings"))
    to_train = [v for v in variant_names() if v not in trained]
    bad = run_partitions(instance, defs, "train_all_variants", to_train, bar, "training encoders", "variant")
    good = [v for v in variant_names() if v not in bad]
    bad += run_partitions(instance, defs, "cluster_all_variants", good, bar, "clustering", "variant")
    report = defs.resolve_job_def("refresh_report").execute_in_process(run_config=QUIET, instance=instance, raise_on_error=False)
    stop_if_interrupted(report)
    if not report.success:
        print(f"composition report failed: {_first_error(report)}")
        return 1
    path = report.asset_materializations_for_node("composition_report")[0].metadata["report"].value
    print(f"report: {path}")
    print("open the Dagster UI (bash scripts/dagster-ui.sh) and MLflow UI (bash scripts/mlflow-ui.sh) to explore")
    return 1 if failed or bad else 0
