"""The ingest half of the asset graph on an ephemeral Dagster instance: plates, sensor, cells, crops."""

from __future__ import annotations

import os
import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import new_plate_sensor
from gbm_assets.imaging.crops import normalise_crops
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.paths import plate_file
from gbm_assets.schema import PROVENANCE_COLUMNS
from gbm_assets.storage import plate_dataset

INGEST = [raw_plates, cell_coordinates, cell_crops]
SMALL_CROPS = {"ops": {"cell_crops": {"config": {"crop_size": 64, "workers": 2}}}}
SMALL = {
    "ops": {"cell_crops": {"config": {"crop_size": 64, "workers": 1}}, "cell_coordinates": {"config": {"workers": 1}}}
}


def densest_plate(raw) -> str:
    """The plate plated at the highest concentration (the most cells to test with)."""
    conc = {p: float(pd.read_csv(raw / p / "manifest.csv")["concentration"].iloc[0]) for p in find_ready_plates(raw)}
    return max(conc, key=conc.get)


def _instance_with(plate_ids):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, list(plate_ids))
    return instance


def _materialize(data_root, plate_id, instance=None, assets=INGEST, run_config=SMALL, **kw):
    instance = instance or _instance_with([plate_id])
    return dg.materialize(
        assets,
        partition_key=plate_id,
        instance=instance,
        resources={"data": DataDirs(root=str(data_root))},
        run_config=run_config,
        **kw,
    )


def test_raw_plates_materializes_with_metadata(data_root):
    plate_id = find_ready_plates(data_root / "raw")[0]
    result = _materialize(data_root, plate_id, assets=[raw_plates], run_config=None)
    assert result.success
    meta = result.asset_materializations_for_node("raw_plates")[0].metadata
    assert meta["n_images"].value == 2 and meta["bit_depth"].value == 16
    assert meta["image_size"].value == "512x512"
    assert meta["cultures"].value and meta["concentrations"].value


def test_raw_plates_bad_plate_fails_and_keeps_earlier_materialization(data_root):
    plate_id = find_ready_plates(data_root / "raw")[0]
    instance = _instance_with([plate_id])
    assert _materialize(data_root, plate_id, instance, assets=[raw_plates], run_config=None).success
    (data_root / "raw" / plate_id / "img001.tif").write_bytes(b"not a tiff")
    with pytest.raises(Exception, match=r"img001\.tif"):
        _materialize(data_root, plate_id, instance, assets=[raw_plates], run_config=None)
    assert plate_id in instance.get_materialized_partitions(dg.AssetKey("raw_plates"))


def test_sensor_registers_a_new_plate_exactly_once(data_root):
    instance = dg.DagsterInstance.ephemeral()
    data = DataDirs(root=str(data_root))
    ready = find_ready_plates(data.raw)
    first = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    (add,) = first.dynamic_partitions_requests
    assert sorted(add.partition_keys) == ready
    assert sorted(r.partition_key for r in first.run_requests) == ready
    instance.add_dynamic_partitions(plates.name, add.partition_keys)
    # A second tick, and a racing tick: nothing new to register; run keys unchanged so Dagster dedupes.
    for _ in range(2):
        again = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
        assert not again.dynamic_partitions_requests
        assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    # A new plate appears: registered once, with its own run.
    src = data.raw / ready[0]
    shutil.copytree(src, data.raw / "newplate")
    third = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    assert third.dynamic_partitions_requests[0].partition_keys == ["newplate"]
    assert len(instance.get_dynamic_partitions(plates.name)) == len(ready)


def test_sensor_ignores_plates_without_manifest(tmp_path):
    (tmp_path / "raw" / "incoming").mkdir(parents=True)
    result = new_plate_sensor(
        dg.build_sensor_context(
            instance=dg.DagsterInstance.ephemeral(), resources={"data": DataDirs(root=str(tmp_path))}
        )
    )
    assert not result.run_requests and not result.dynamic_partitions_requests


@pytest.fixture
def ingested(data_root):
    plate_id = densest_plate(data_root / "raw")
    instance = _instance_with([plate_id])
    result = _materialize(data_root, plate_id, instance)
    assert result.success
    return data_root, plate_id, instance, result


def test_ingest_writes_crops_with_provenance(ingested):
    data_root, plate_id, _, result = ingested
    crops = pq.read_table(plate_file(data_root / "cell_crops.parquet", plate_id)).to_pandas()
    manifest = pd.read_csv(data_root / "raw" / plate_id / "manifest.csv", dtype={"concentration": str})
    assert len(crops) > 5
    assert not crops[list(PROVENANCE_COLUMNS)].isna().any().any()
    assert crops["crop_id"].is_unique and (crops["plate"] == plate_id).all()
    merged = crops.merge(manifest, on="image", suffixes=("", "_m"))
    assert len(merged) == len(crops)
    for col in ("culture", "concentration", "replicate", "timepoint_h"):
        assert (merged[col].astype(str) == merged[f"{col}_m"].astype(str)).all(), col
    # Provenance round trip: a crop's pixels are the normalised source window at its x, y.
    for row in crops.sample(5, random_state=0).itertuples():
        image = read_image(data_root / "raw" / plate_id / row.image)
        window = image[row.y - 32 : row.y + 32, row.x - 32 : row.x + 32]
        assert np.array_equal(np.frombuffer(row.pixels, np.uint8).reshape(64, 64), normalise_crops(window[None])[0])
    masks = np.stack([np.frombuffer(m, np.uint8) for m in crops["mask"]])
    assert set(np.unique(masks)) <= {0, 1}
    assert (masks.sum(axis=1) > 0).mean() > 0.9  # a cell whose centroid lies outside it may miss the window
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
    assert {c.check_name for c in checks} >= {"cells_found", "crop_ids_unique", "count_matches_coordinates"}


def test_crops_stream_in_batches(ingested):
    data_root, plate_id, *_ = ingested
    dataset = plate_dataset(data_root / "cell_crops.parquet")
    batches = list(dataset.to_batches(columns=["crop_id", "pixels"], batch_size=16))
    assert len(batches) > 1 and max(b.num_rows for b in batches) <= 16


def test_rematerializing_is_idempotent(ingested):
    data_root, plate_id, instance, _ = ingested
    path = plate_file(data_root / "cell_crops.parquet", plate_id)
    before = pq.read_table(path).to_pandas()
    assert _materialize(data_root, plate_id, instance).success
    after = pq.read_table(path).to_pandas()
    pd.testing.assert_frame_equal(before, after)


def test_failure_mid_plate_leaves_previous_crops_intact(ingested):
    data_root, plate_id, instance, _ = ingested
    path = plate_file(data_root / "cell_crops.parquet", plate_id)
    before = path.read_bytes()
    # The second image turns unreadable after cell finding: cropping fails halfway through the plate.
    # (Same size and mtime, so the plate version still matches and cropping really starts.)
    image = data_root / "raw" / plate_id / "img001.tif"
    st = image.stat()
    image.write_bytes((b"garbage" * st.st_size)[: st.st_size])
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Exception, match=r"img001\.tif"):
        _materialize(data_root, plate_id, instance, assets=[cell_crops], run_config=SMALL_CROPS)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left behind


def test_cellprofiler_table_is_used_instead_of_segmentation(data_root):
    plate_id = find_ready_plates(data_root / "raw")[0]
    plate_dir = data_root / "raw" / plate_id
    truth = pd.read_csv(plate_dir / "ground_truth.csv")
    cp = pd.DataFrame(
        {
            "ImageNumber": truth["image"].map({"img000.tif": 1, "img001.tif": 2}),
            "ObjectNumber": np.arange(1, len(truth) + 1),
            "Location_Center_X": truth["x"],
            "Location_Center_Y": truth["y"],
        }
    )
    cp.to_csv(plate_dir / "MyExpt_Cells.csv", index=False)
    # ImageNumber means a file only through the Image table CellProfiler exports beside the objects.
    pd.DataFrame({"ImageNumber": [1, 2], "FileName_Phase": ["img000.tif", "img001.tif"]}).to_csv(
        plate_dir / "MyExpt_Image.csv", index=False
    )
    result = _materialize(data_root, plate_id)
    meta = result.asset_materializations_for_node("cell_coordinates")[0].metadata
    assert meta["source"].value == "CellProfiler table MyExpt_Cells.csv, objects Cells"
    coords = pd.read_parquet(plate_file(data_root / "cell_coordinates.parquet", plate_id))
    assert len(coords) == len(truth)
    assert np.allclose(np.sort(coords["x"]), np.sort(truth["x"]))


def test_sensor_skips_ingested_plates_and_reruns_a_changed_manifest(ingested):
    data_root, plate_id, instance, _ = ingested
    data = DataDirs(root=str(data_root))
    first = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    assert plate_id not in [r.partition_key for r in first.run_requests]  # already ingested
    manifest = data_root / "raw" / plate_id / "manifest.csv"
    manifest.write_text(manifest.read_text())  # rewritten with the same content: the same version
    os.utime(manifest, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns + 10**9))
    touched = new_plate_sensor(
        dg.build_sensor_context(instance=instance, cursor=first.cursor, resources={"data": data})
    )
    assert plate_id not in [r.partition_key for r in touched.run_requests]
    manifest.write_text(manifest.read_text() + "\n")  # a changed manifest (one more trailing empty row): a new version
    second = new_plate_sensor(
        dg.build_sensor_context(instance=instance, cursor=touched.cursor, resources={"data": data})
    )
    assert [r.partition_key for r in second.run_requests].count(plate_id) == 1
