"""The command-line main job: the same Dagster jobs the UI runs, driven in-process, with a progress bar.

Runs are recorded in the Dagster instance at DAGSTER_HOME, so they show in the UI afterwards.
Plates run one after another, each using every core for its images; a plate that fails is
reported and skipped, leaving the others (and its own earlier outputs) intact.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence

import dagster as dg

from gbm_assets import interrupts, paths
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import INGEST_JOB_NAME, LEGACY_VERSION, built_version, manifest_version
from gbm_assets.imaging.plates import culture_spelling_clashes, find_ready_plates
from gbm_assets.models.variants import variant_names

# Failures are reported as one line each by run_partitions; their stack traces are in the Dagster UI.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

# The stage each asset's step belongs to in the timing table; ingest and report are one row each,
# the variant stages one row per variant.
STAGE_OF_STEP = {
    "raw_plates": "ingest",
    "cell_coordinates": "ingest",
    "cell_crops": "ingest",
    "trained_encoders": "train",
    "embeddings": "embed",
    "clusters": "cluster",
    "composition_report": "report",
}
_STEP_EVENTS = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Wall seconds of each step of a run, from Dagster's own event log.

    A step's time runs from its first STEP_START to its last STEP_SUCCESS or STEP_FAILURE record
    (a retried step counts its wait between attempts). Returns {step key: seconds >= 0}, in the
    order the steps started; a step that started but never ended (killed run) is left out.
    """
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for entry in instance.all_logs(run_id, of_type=_STEP_EVENTS):
        if entry.step_key is None or entry.dagster_event is None:
            continue
        if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
            start.setdefault(entry.step_key, entry.timestamp)
        else:
            end[entry.step_key] = max(end.get(entry.step_key, entry.timestamp), entry.timestamp)
    return {step: max(0.0, end[step] - t0) for step, t0 in start.items() if step in end}


class StageTimes:
    """Wall time per pipeline stage, summed from the step records of the runs it is given.

    Rows: "ingest" (all plates together), "train <variant>", "embed <variant>", "cluster <variant>",
    "report", in the order they first ran; `table(total_s)` renders them with each row's share of
    the total and the time outside any step (run start-up, Dagster bookkeeping) as "other".
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.runs: dict[str, int] = {}
        self.failed: set[str] = set()

    def add_run(self, instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult, key: str | None = None) -> None:
        """Add the steps of one finished run; `key` is its partition (a plate or a variant)."""
        rows = set()
        for step, seconds in step_seconds(instance, result.run_id).items():
            stage = STAGE_OF_STEP.get(step, step)
            row = stage if stage in ("ingest", "report") or key is None else f"{stage} {key}"
            self.seconds[row] = self.seconds.get(row, 0.0) + seconds
            rows.add(row)
            if not result.success and not result.is_node_success(step):
                self.failed.add(row)
        for row in rows:
            self.runs[row] = self.runs.get(row, 0) + 1

    def table(self, total_s: float) -> str:
        """The timing table as text: one row per stage (seconds, share of total), then other and total."""
        rows = []
        for row, seconds in self.seconds.items():
            label = f"ingest ({self.runs[row]} plates)" if row == "ingest" else row
            rows.append((label + (" (failed)" if row in self.failed else ""), seconds))
        rows.append(("other (run start-up, bookkeeping)", max(0.0, total_s - sum(self.seconds.values()))))
        width = max(len(label) for label, _ in rows + [("total", 0)])
        lines = [f"{'stage':<{width}}  {'seconds':>9}  {'share':>6}"]
        for label, seconds in rows + [("total", total_s)]:
            share = 100.0 * seconds / total_s if total_s > 0 else 0.0
            lines.append(f"{label:<{width}}  {seconds:>9.1f}  {share:>5.1f}%")
        return "\n".join(lines)


def register_plates(instance: dg.DagsterInstance) -> list[str]:
    """Add every ready plate under data/raw as a partition (what the sensor does on a tick)."""
    ready = find_ready_plates(paths.raw_dir())
    known = set(instance.get_dynamic_partitions(plates.name))
    new = [p for p in ready if p not in known]
    if new:
        instance.add_dynamic_partitions(plates.name, new)
    return ready


def plates_to_ingest(instance: dg.DagsterInstance, ready: list[str], refresh: bool = False) -> list[str]:
    """Plates never ingested, without a crops file, or whose crops were made from another manifest than
    today's (all with refresh).

    Plates ingested before versions were recorded count as done, as the sensor treats them.
    """
    if refresh:
        return list(ready)
    data = DataDirs()
    return [p for p in ready if built_version(instance, p, data) not in (manifest_version(data, p), LEGACY_VERSION)]


class SilentBar:
    """The part of tqdm's interface run_partitions uses, showing nothing; its failure lines go to stderr.

    Pass the class as `bar` where no progress bar is wanted (benchmarks, tests, scripts).
    """

    def __init__(self, total: int = 0, desc: str = "", unit: str = "") -> None:
        pass

    def __enter__(self) -> SilentBar:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=sys.stderr)


def run_partitions(
    instance,
    defs,
    job_name: str,
    keys: list[str],
    bar,
    what: str,
    unit: str,
    times: StageTimes | None = None,
    run_config: Mapping | None = None,
    assets: Sequence[str] | None = None,
) -> list[str]:
    """Run a partitioned job once per key, with a progress bar; return the keys that failed.

    `times` collects each run's step times; `run_config` is merged over QUIET; `assets` runs only
    those assets of the job (asset keys, e.g. ["trained_encoders"]).
    """
    job = defs.resolve_job_def(job_name)
    selection = [dg.AssetKey(a) for a in assets] if assets else None
    failed = []
    with bar(len(keys), what, unit) as progress:
        for key in keys:
            progress.set_postfix_str(key)
            result = job.execute_in_process(
                run_config={**QUIET, **(run_config or {})},
                instance=instance,
                partition_key=key,
                raise_on_error=False,
                asset_selection=selection,
            )
            stop_if_interrupted(result)
            if times is not None:
                times.add_run(instance, result, key)
            if not result.success:
                failed.append(key)
                progress.write(f"{unit} {key} failed: {_first_error(result)}")
            progress.update(1)
    return failed


def stop_if_interrupted(result: dg.ExecuteInProcessResult) -> None:
    """Raise KeyboardInterrupt when a run failed because the process was told to stop.

    Dagster turns Ctrl-C and SIGTERM during a step into a failed step, and forgets one that lands
    between steps (the run succeeds); without this check the command would go on to the next plate
    or variant instead of stopping. The second kind is read from `interrupts`, where the CLI has
    installed its record.
    """
    interrupts.raise_if_received()
    for event in result.all_events:
        error = event.step_failure_data.error if event.is_step_failure and event.step_failure_data else None
        while error is not None:
            if error.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                raise KeyboardInterrupt(f"run {result.run_id} interrupted")
            error = error.cause
        if event.is_run_failure and "interrupt" in (event.message or "").lower():
            raise KeyboardInterrupt(f"run {result.run_id} interrupted")


def _first_error(result: dg.ExecuteInProcessResult) -> str:
    """The first failed step's own error, one line: the exception the asset raised (the innermost
    cause), not Dagster's "Error occurred while executing op" wrapper around it."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            lines = [line for line in error.message.strip().splitlines() if line.strip()]
            return lines[0] if lines else error.cls_name
    return "unknown error (see the run in the Dagster UI)"


MAIN_JOBS = (INGEST_JOB_NAME, "train_all_variants", "cluster_all_variants", "refresh_report")


def check_variants(names: Sequence[str]) -> list[str]:
    """The variant names as given, each checked against the variant table; ValueError listing the valid ones."""
    known = variant_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        what = f"unknown model variant(s) {', '.join(map(repr, unknown))}" if unknown else "no model variant given"
        raise ValueError(f"--variants: {what}; valid variants: {', '.join(known)}")
    return list(dict.fromkeys(names))


def split_run_config(run_config: Mapping, source: str = "run config") -> dict[str, dict]:
    """One Dagster run config (`ops: {asset: {config: ...}}`, as in the launchpad) split into the main
    job's runs: {job name: the part of it that job's assets take}, each checked by Dagster.

    Raises ValueError naming `source` for an asset that no main job has, for keys other than
    `ops`, or for config Dagster rejects (its own words).
    """
    from gbm_assets.definitions import defs

    if not isinstance(run_config, Mapping):
        raise ValueError(f"{source}: run config must be a mapping with an `ops` key, got {type(run_config).__name__}")
    extra = sorted(set(run_config) - {"ops"})
    if extra:
        raise ValueError(f"{source}: only `ops` (config per asset) can be given here, not {', '.join(extra)}")
    ops = run_config.get("ops") or {}
    if not isinstance(ops, Mapping):
        raise ValueError(f"{source}: `ops` must map asset names to their config")
    jobs = {name: defs.resolve_job_def(name) for name in MAIN_JOBS}
    in_job = {name: {node.name for node in job.graph.nodes} for name, job in jobs.items()}
    known = sorted(set().union(*in_job.values()))
    unknown = sorted(set(ops) - set(known))
    if unknown:
        raise ValueError(f"{source}: no asset named {', '.join(unknown)} in the main job; assets: {', '.join(known)}")
    split = {}
    for name, job in jobs.items():
        part = {op: conf for op, conf in ops.items() if op in in_job[name]}
        if not part:
            continue
        try:
            dg.validate_run_config(job, {**QUIET, "ops": part})
        except dg.DagsterInvalidConfigError as exc:
            problems = "; ".join(error.message for error in exc.errors) or str(exc)
            raise ValueError(f"{source}: {problems}") from None
        split[name] = {"ops": part}
    return split


def load_run_config(path: str) -> dict[str, dict]:
    """A run-config file (YAML or JSON, Dagster's shape) split per main job (split_run_config)."""
    import yaml

    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML or JSON ({str(exc).splitlines()[0]})") from None
    return split_run_config(loaded or {}, path)


def stale_variants(names: Sequence[str], data: DataDirs | None = None) -> dict[str, list[str]]:
    """{variant: plates its embeddings hold that have no crops any more} for variants made with a removed plate."""
    from gbm_assets.plate_removal import plates_gone

    data = data or DataDirs()
    gone = {v: plates_gone(data.embeddings_file(v), data.crops) for v in names}
    return {v: plates for v, plates in gone.items() if plates}


def orphan_warning(data: DataDirs | None = None) -> str | None:
    """A warning naming plates that have outputs but no folder under raw/ (they are still analysed), or None."""
    from gbm_assets.plate_removal import plates_without_folder

    data = data or DataDirs()
    orphans = plates_without_folder(data.base)
    if not orphans:
        return None
    shown = ", ".join(orphans[:10]) + (f", ... ({len(orphans)} in all)" if len(orphans) > 10 else "")
    return (
        f"warning: {len(orphans)} plate(s) have outputs under {data.base} but no folder under {data.raw}: {shown}; "
        "their cells are still analysed. Remove each from the analysis with `gbm-assets remove-plate ID`"
    )


def remove_plate(
    plate_id: str, instance: dg.DagsterInstance | None = None, data: DataDirs | None = None, raw: bool = False
) -> tuple[list, bool]:
    """Take a plate out of the analysis: its outputs (plate_removal.remove_plate_outputs; its raw folder
    only with raw=True), its materialization records and its dynamic partition in the Dagster instance.

    Returns (paths removed, whether Dagster knew the plate). The variants made with it are stale
    from then on (stale_variants) and are rebuilt without it by the next `gbm-assets run`.
    Raises PlateError when nothing of the plate exists (naming the plates that do).
    """
    from gbm_assets.errors import PlateError
    from gbm_assets.plate_removal import plates_with_outputs, remove_plate_outputs

    data = data or DataDirs()
    instance = instance or dg.DagsterInstance.get()
    removed = remove_plate_outputs(plate_id, data.base, raw=raw)
    known = plate_id in instance.get_dynamic_partitions(plates.name)
    if known:
        for asset in ("raw_plates", "cell_coordinates", "cell_crops"):
            try:
                instance.wipe_asset_partitions(dg.AssetKey(asset), [plate_id])
            except NotImplementedError:  # SQLite event logs cannot wipe a partition; built_version checks the files
                break
        instance.delete_dynamic_partition(plates.name, plate_id)
    if not removed and not known:
        others = sorted(set(plates_with_outputs(data.base)) | set(instance.get_dynamic_partitions(plates.name)))
        raise PlateError(
            repr(plate_id),
            f"no such plate: nothing under {data.base} and no Dagster partition; plates: {', '.join(others) or 'none'}",
        )
    return removed, known


def run_main_job(
    bar, refresh: bool = False, variants: Sequence[str] | None = None, run_config: Mapping[str, Mapping] | None = None
) -> int:
    """Ingest every plate not yet done (all with refresh), then run every later stage; print the
    wall time of each stage at the end (from Dagster's step records). Returns the exit status.

    `variants` limits the model variants (default: all; names checked, check_variants); `run_config`
    maps a job name to run config merged over QUIET (e.g. {"train_all_variants": {"ops":
    {"trained_encoders": {"config": ...}}}}; split_run_config makes it from one launchpad-shaped config).
    A variant whose embeddings hold cells of a plate that has no crops any more (a removed plate)
    is retrained without it; plates with outputs but no folder under raw/ are named in a warning.
    """
    from gbm_assets.definitions import defs

    started = time.monotonic()
    names = check_variants(variants) if variants is not None else variant_names()
    config = dict(run_config or {})
    raw = paths.raw_dir()
    instance = dg.DagsterInstance.get()
    warning = orphan_warning()
    if warning:
        print(warning, file=sys.stderr)
    ready = register_plates(instance)
    for clash in culture_spelling_clashes(raw):
        print(f"warning: {clash}", file=sys.stderr)
    if not ready:
        print(f"no usable plates under {raw} (a plate is a folder with images and manifest.csv, named by a safe id)")
        return 1
    todo = plates_to_ingest(instance, ready, refresh)
    print(f"{len(ready)} plates under {raw}; {len(todo)} to ingest")
    times = StageTimes()
    times.seconds["ingest"], times.runs["ingest"] = 0.0, 0  # the first row, even when nothing is to ingest
    failed = run_partitions(
        instance, defs, INGEST_JOB_NAME, todo, bar, "ingesting plates", "plate", times, config.get(INGEST_JOB_NAME)
    )
    if failed:
        print(f"{len(failed)} plate(s) failed: {', '.join(failed)}; the others were processed")
    # Encoders retrain when plates changed (or on --refresh); clusters then label every cell.
    trained = set() if (refresh or todo) else instance.get_materialized_partitions(dg.AssetKey("embeddings"))
    stale = stale_variants(names)
    for variant, gone in stale.items():
        print(f"{variant}: made with plate(s) {', '.join(gone)}, which have no crops any more: retraining without them")
    to_train = [v for v in names if v not in trained or v in stale]
    bad = run_partitions(
        instance,
        defs,
        "train_all_variants",
        to_train,
        bar,
        "training encoders",
        "variant",
        times,
        config.get("train_all_variants"),
    )
    good = [v for v in names if v not in bad]
    bad += run_partitions(
        instance,
        defs,
        "cluster_all_variants",
        good,
        bar,
        "clustering",
        "variant",
        times,
        config.get("cluster_all_variants"),
    )
    report = defs.resolve_job_def("refresh_report").execute_in_process(
        run_config={**QUIET, **config.get("refresh_report", {})}, instance=instance, raise_on_error=False
    )
    stop_if_interrupted(report)
    times.add_run(instance, report)
    if report.success:
        path = report.asset_materializations_for_node("composition_report")[0].metadata["report"].value
        print(f"report: {path}")
        print("open the Dagster UI (bash scripts/dagster-ui.sh) and MLflow UI (bash scripts/mlflow-ui.sh) to explore")
    else:
        print(f"composition report failed: {_first_error(report)}")
    print("\nwall time per stage (Dagster step records):")
    print(times.table(time.monotonic() - started))
    return 1 if failed or bad or not report.success else 0
