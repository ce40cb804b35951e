"""One plate version per run, and failed plates retried by the new-plate sensor.

Every fault here is real: the manifest or an image is rewritten on disk between (or during) the
steps of an ingestion, and failed runs are real runs of the ingest assets on a corrupt image,
recorded in an ephemeral Dagster instance. Only the sensor's clock is set by the test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gbm_assets.assets import cells as cells_module
from gbm_assets.assets import sensors
from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import new_plate_sensor
from gbm_assets.errors import PlateError
from gbm_assets.imaging.plates import find_ready_plates, parquet_plate_version, plate_version, read_plate_version
from gbm_assets.paths import plate_file

INGEST = [raw_plates, cell_coordinates, cell_crops]
SMALL = {
    "ops": {"cell_crops": {"config": {"crop_size": 64, "workers": 1}}, "cell_coordinates": {"config": {"workers": 1}}}
}
CELLS_ONLY = {"ops": SMALL["ops"]}


def _one_plate(data_root) -> str:
    """Keep a single plate under raw/ (fast, and the sensor's requests are about that plate only)."""
    ids = find_ready_plates(data_root / "raw")
    for other in ids[1:]:
        shutil.rmtree(data_root / "raw" / other)
    return ids[0]


def _run(root, plate_id, instance, assets=INGEST, run_config=SMALL, tags=None):
    return dg.materialize(
        assets,
        partition_key=plate_id,
        instance=instance,
        resources={"data": DataDirs(root=str(root))},
        run_config=run_config,
        tags=tags,
        raise_on_error=False,
    )


def _failure(result) -> str:
    return next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.to_string()


def _outputs(root, plate_id) -> dict:
    return {
        name: plate_file(root / name, plate_id).read_bytes()
        for name in ("cell_coordinates.parquet", "cell_masks", "cell_crops.parquet")
    }


def _leftovers(root, plate_id) -> list:
    return [
        p.name
        for name in ("cell_coordinates.parquet", "cell_masks", "cell_crops.parquet")
        for p in plate_file(root / name, plate_id).parent.iterdir()
        if p.name != "part-0.parquet"
    ]


def _change_culture(plate_dir, culture="GBM99"):
    manifest = pd.read_csv(plate_dir / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["culture"] = culture
    manifest.to_csv(plate_dir / "manifest.csv", index=False)


@pytest.fixture
def ingested(data_root):
    plate_id = _one_plate(data_root)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_id])
    result = _run(data_root, plate_id, instance)
    assert result.success
    return data_root, plate_id, instance, result


# --- the version itself (pure) -------------------------------------------------------------------


def test_plate_version_follows_manifest_content_and_image_files(data_root):
    plate_dir = data_root / "raw" / _one_plate(data_root)
    manifest = plate_dir / "manifest.csv"
    first = plate_version(plate_dir)
    assert first.manifest_sha256 == hashlib.sha256(manifest.read_bytes()).hexdigest() and first.n_images == 2
    # Touching an identical manifest is no new version.
    manifest.write_bytes(manifest.read_bytes())
    os.utime(manifest, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns + 10**9))
    assert plate_version(plate_dir) == first
    # An image replaced under the same name (or still being copied) is.
    image = plate_dir / "img001.tif"
    image.write_bytes(image.read_bytes()[:-10])
    changed = plate_version(plate_dir)
    assert changed.manifest_sha256 == first.manifest_sha256 and changed.images_sha256 != first.images_sha256
    assert "images changed" in first.describe_change(changed)
    _change_culture(plate_dir)
    assert plate_version(plate_dir).key != first.key


# --- item 2: one manifest version per run --------------------------------------------------------


def test_happy_path_records_the_version_in_metadata_and_files(ingested):
    root, plate_id, _, result = ingested
    manifest_hash = hashlib.sha256((root / "raw" / plate_id / "manifest.csv").read_bytes()).hexdigest()
    version = plate_version(root / "raw" / plate_id)
    for node in ("raw_plates", "cell_coordinates", "cell_crops"):
        meta = result.asset_materializations_for_node(node)[0].metadata
        assert meta["manifest_sha256"].value == manifest_hash, node
        assert meta["plate_version"].value == version.as_dict(), node
    record = root / "plate_versions" / f"{plate_id}.json"
    assert read_plate_version(record) == version
    assert json.loads(record.read_text())["run_id"] == result.run_id
    for name in ("cell_coordinates.parquet", "cell_masks", "cell_crops.parquet"):
        assert parquet_plate_version(plate_file(root / name, plate_id)) == version, name
    # The pandas metadata is kept beside the version.
    assert b"pandas" in pq.read_schema(plate_file(root / "cell_coordinates.parquet", plate_id)).metadata


def test_manifest_rewritten_after_raw_plates_is_refused(ingested):
    root, plate_id, instance, _ = ingested
    before = _outputs(root, plate_id)
    assert _run(root, plate_id, instance, assets=[raw_plates], run_config=None).success
    _change_culture(root / "raw" / plate_id)  # rewritten between raw_plates and cell_coordinates
    result = _run(root, plate_id, instance, assets=[cell_coordinates, cell_crops], run_config=CELLS_ONLY)
    assert not result.success
    error = _failure(result)
    assert f"plate '{plate_id}' changed since raw_plates validated it" in error
    assert "manifest.csv content changed" in error and "gbm-assets run --refresh" in error and "sensor" in error
    assert _outputs(root, plate_id) == before and not _leftovers(root, plate_id)
    # The sensor re-runs the plate for its new manifest.
    data = DataDirs(root=str(root))
    tick = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    assert [r.partition_key for r in tick.run_requests] == [plate_id]
    assert tick.run_requests[0].run_key == f"{plate_id}@{plate_version(data.plate_dir(plate_id)).key}"


def test_manifest_rewritten_between_coordinates_and_crops_is_refused(ingested):
    root, plate_id, instance, _ = ingested
    before = _outputs(root, plate_id)
    _change_culture(root / "raw" / plate_id)
    result = _run(
        root, plate_id, instance, assets=[cell_crops], run_config={"ops": {"cell_crops": SMALL["ops"]["cell_crops"]}}
    )
    assert not result.success
    assert f"plate '{plate_id}' changed since cell_coordinates found its cells" in _failure(result)
    assert _outputs(root, plate_id) == before and not _leftovers(root, plate_id)


def test_image_replaced_between_steps_is_refused(ingested):
    root, plate_id, instance, _ = ingested
    before = _outputs(root, plate_id)
    image = root / "raw" / plate_id / "img000.tif"
    shutil.copyfile(root / "raw" / plate_id / "img001.tif", image)  # another image under the same name
    result = _run(
        root, plate_id, instance, assets=[cell_crops], run_config={"ops": {"cell_crops": SMALL["ops"]["cell_crops"]}}
    )
    assert not result.success
    assert "its images changed" in _failure(result)
    assert _outputs(root, plate_id) == before


def test_manifest_rewritten_while_cropping_keeps_previous_crops(ingested, monkeypatch):
    root, plate_id, instance, _ = ingested
    before = _outputs(root, plate_id)
    real_crop_plate = cells_module.crop_plate

    def crop_then_rewrite(*args, **kwargs):
        yield from real_crop_plate(*args, **kwargs)
        _change_culture(root / "raw" / plate_id)  # lands after every crop was written to the temp file

    monkeypatch.setattr(cells_module, "crop_plate", crop_then_rewrite)
    result = _run(
        root, plate_id, instance, assets=[cell_crops], run_config={"ops": {"cell_crops": SMALL["ops"]["cell_crops"]}}
    )
    assert not result.success
    assert "changed since cell_crops began" in _failure(result)
    assert _outputs(root, plate_id) == before and not _leftovers(root, plate_id)


def test_steps_without_a_recorded_version_are_refused(ingested):
    root, plate_id, instance, _ = ingested
    (root / "plate_versions" / f"{plate_id}.json").unlink()
    result = _run(
        root,
        plate_id,
        instance,
        assets=[cell_coordinates],
        run_config={"ops": {"cell_coordinates": SMALL["ops"]["cell_coordinates"]}},
    )
    assert not result.success
    assert f"no plate version recorded for plate '{plate_id}'; materialize raw_plates" in _failure(result)
    # Coordinates written before versions were recorded: cell_crops asks for them again.
    coords = plate_file(root / "cell_coordinates.parquet", plate_id)
    table = pq.read_table(coords)
    pq.write_table(
        table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items() if not k.startswith(b"gbm.")}),
        coords,
    )
    result = _run(
        root, plate_id, instance, assets=[cell_crops], run_config={"ops": {"cell_crops": SMALL["ops"]["cell_crops"]}}
    )
    assert not result.success
    assert "materialize cell_coordinates for it first" in _failure(result)


def test_a_corrupt_version_record_is_named(tmp_path):
    record = tmp_path / "p.json"
    record.write_text("[1, 2")
    with pytest.raises(PlateError, match=r"p\.json: unreadable plate version record"):
        read_plate_version(record)
    record.write_text(json.dumps({"manifest_sha256": "ab"}))
    with pytest.raises(PlateError, match=r"p\.json: holds no valid plate version"):
        read_plate_version(record)


# --- item 3: a failed plate is retried -----------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(sensors, "_now", c)
    return c


def _tick(instance, data, cursor=None):
    return new_plate_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"data": data}))


def _launch(root, instance, request):
    """Run what a RunRequest asks for, with its tags, as the daemon would; return the run's record."""
    result = _run(root, request.partition_key, instance, tags=dict(request.tags))
    return instance.get_run_record_by_id(result.run_id)


def _skip(tick) -> str:
    return tick.skip_reason.skip_message if tick.skip_reason else ""


@pytest.fixture
def failed_plate(data_root, clock):
    """A plate whose first ingestion failed: an image still being copied (truncated) when it ran."""
    plate_id = _one_plate(data_root)
    data = DataDirs(root=str(data_root))
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(instance, data)
    instance.add_dynamic_partitions(plates.name, first.dynamic_partitions_requests[0].partition_keys)
    (request,) = first.run_requests
    image = data.plate_dir(plate_id) / "img001.tif"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])
    record = _launch(data_root, instance, request)
    assert record.dagster_run.status == dg.DagsterRunStatus.FAILURE
    return data_root, data, plate_id, instance, request, record, image, good


def test_failed_plate_is_retried_after_the_backoff(failed_plate, clock):
    root, data, plate_id, instance, first, failed, image, good = failed_plate
    version = sensors.manifest_version(data, plate_id)
    assert first.run_key == f"{plate_id}@{version}"
    image.write_bytes(good)  # the copy finished; the manifest did not change
    clock.t = failed.end_time + 30  # before the 60 s back-off
    early = _tick(instance, data)
    assert not early.run_requests
    assert f"plate {plate_id}: run {failed.dagster_run.run_id} failed; retry 1 of 5 in 30 s" in _skip(early)
    clock.t = failed.end_time + 61
    due = _tick(instance, data)
    (retry,) = due.run_requests
    assert retry.run_key == f"{plate_id}@{version}#retry-1" and retry.run_key != first.run_key
    assert retry.tags["gbm/retry"] == "1" and retry.tags["gbm/plate"] == plate_id
    # A racing tick asks for the same key (Dagster launches it once).
    assert [r.run_key for r in _tick(instance, data).run_requests] == [retry.run_key]
    assert _launch(root, instance, retry).dagster_run.status == dg.DagsterRunStatus.SUCCESS
    clock.t += 3600
    done = _tick(instance, data)
    assert not done.run_requests and _skip(done) == "every plate is up to date"


def test_retry_is_said_in_the_ui(failed_plate, clock):
    root, data, plate_id, instance, _, failed, *_ = failed_plate
    clock.t = failed.end_time + 61
    context = dg.build_sensor_context(instance=instance, resources={"data": data})
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    context.log.addHandler(handler)  # the tick's log, which the UI shows with the sensor's ticks
    (retry,) = new_plate_sensor(context).run_requests
    assert f"retrying plate {plate_id} (attempt 1 of 5) after failure of run {failed.dagster_run.run_id}" in said
    assert retry.tags["gbm/retry_of"] == failed.dagster_run.run_id


def test_retries_back_off_stop_at_the_cap_and_restart_for_a_new_manifest(failed_plate, clock, monkeypatch):
    root, data, plate_id, instance, _, failed, image, good = failed_plate
    monkeypatch.setenv("GBM_PLATE_RETRIES", "2")
    version = sensors.manifest_version(data, plate_id)
    clock.t = failed.end_time + 61
    (retry1,) = _tick(instance, data).run_requests
    failed = _launch(root, instance, retry1)  # the image is still truncated: fails again
    assert failed.dagster_run.status == dg.DagsterRunStatus.FAILURE
    clock.t = failed.end_time + 90  # the second wait is 120 s
    assert not _tick(instance, data).run_requests
    clock.t = failed.end_time + 121
    (retry2,) = _tick(instance, data).run_requests
    assert retry2.run_key == f"{plate_id}@{version}#retry-2" and retry2.tags["gbm/retry"] == "2"
    failed = _launch(root, instance, retry2)
    clock.t = failed.end_time + 10**6
    capped = _tick(instance, data)
    assert not capped.run_requests
    assert f"plate {plate_id}: given up after 3 failed runs of manifest version {version}" in _skip(capped)
    assert "when its manifest.csv changes" in _skip(capped)
    # A changed manifest starts again from a first run, at once.
    image.write_bytes(good)
    _change_culture(data.plate_dir(plate_id))
    (fresh,) = _tick(instance, data).run_requests
    new_version = sensors.manifest_version(data, plate_id)
    assert new_version != version and fresh.run_key == f"{plate_id}@{new_version}" and "gbm/retry" not in fresh.tags
    assert _launch(root, instance, fresh).dagster_run.status == dg.DagsterRunStatus.SUCCESS


def test_retry_settings_are_checked(failed_plate, clock, monkeypatch):
    _, data, _, instance, *_ = failed_plate
    monkeypatch.setenv("GBM_PLATE_RETRIES", "many")
    with pytest.raises(Exception, match=r"GBM_PLATE_RETRIES='many': give a whole number >= 0"):
        _tick(instance, data)


# --- the sensor's cursor: versions replace manifest mtimes ---------------------------------------


def test_plates_ingested_before_versions_migrate_from_the_old_cursor(data_root):
    plate_id = _one_plate(data_root)
    data = DataDirs(root=str(data_root))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_id])
    # Crops materialized by the earlier code: no version in their metadata.
    instance.report_runless_asset_event(dg.AssetMaterialization("cell_crops", partition=plate_id))
    crops = plate_file(data.crops, plate_id)
    crops.parent.mkdir(parents=True)
    pd.DataFrame({"plate": [plate_id]}).to_parquet(crops)
    manifest = data.plate_dir(plate_id) / "manifest.csv"
    old_cursor = json.dumps({plate_id: manifest.stat().st_mtime_ns})
    same = _tick(instance, data, old_cursor)
    assert not same.run_requests  # the manifest is the one the old sensor saw
    assert json.loads(same.cursor)["format"] == sensors.CURSOR_FORMAT
    stale = json.dumps({plate_id: manifest.stat().st_mtime_ns - 1})
    assert [r.partition_key for r in _tick(instance, data, stale).run_requests] == [
        plate_id
    ]  # changed before the upgrade
    # First sight (no cursor) adopts the crops as they are; a later manifest change re-runs the plate.
    adopted = _tick(instance, data)
    assert not adopted.run_requests
    _change_culture(data.plate_dir(plate_id))
    assert [r.partition_key for r in _tick(instance, data, adopted.cursor).run_requests] == [plate_id]


def test_command_line_run_reingests_a_plate_whose_manifest_changed(ingested, monkeypatch):
    """`gbm-assets run` (pipeline.plates_to_ingest) redoes a plate whose manifest changed, as the sensor does."""
    from gbm_assets.pipeline import plates_to_ingest

    root, plate_id, instance, _ = ingested
    monkeypatch.setenv("GBM_ASSETS_DATA", str(root))
    ready = find_ready_plates(root / "raw")
    assert plate_id not in plates_to_ingest(instance, ready)
    assert plates_to_ingest(instance, ready, refresh=True) == ready
    _change_culture(root / "raw" / plate_id)
    assert plate_id in plates_to_ingest(instance, ready)
