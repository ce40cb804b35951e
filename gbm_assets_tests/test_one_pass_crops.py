"""Crops made in cell finding's pass when one run makes both assets: each image read once by the
two steps, the same crops byte for byte as cell_crops makes from the stored coordinates and
masks, and never adopted from other coordinates or other crop settings."""

from __future__ import annotations

import shutil

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq

import gbm_assets.imaging.plate_cells as plate_cells
from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.plate_cells import CropFilters, CropRequest, crop_plate, crops_table, pending_crops_path
from gbm_assets.imaging.plate_coordinates import plate_coordinates
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.imaging.synthetic import write_plates
from gbm_assets.paths import plate_file
from gbm_assets_tests.conftest import cropped_in, materialize_ingest


def _setup(data_root):
    plate_id = find_ready_plates(data_root / "raw")[0]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_id])
    data = DataDirs(root=str(data_root))
    return plate_id, instance, plate_file(data.crops, plate_id), plate_file(data.coordinates, plate_id)


def test_one_run_reads_each_image_once_and_crops_as_cell_crops_alone(data_root, monkeypatch):
    plate_id, instance, crops_file, _ = _setup(data_root)
    reads = []
    read = plate_cells.read_image
    monkeypatch.setattr(plate_cells, "read_image", lambda path: reads.append(path.name) or read(path))
    result = materialize_ingest(data_root, plate_id, instance, [raw_plates, cell_coordinates, cell_crops])
    assert result.success
    n_images = len(pd.read_csv(data_root / "raw" / plate_id / "manifest.csv"))
    assert sorted(reads) == sorted(set(reads)) and len(reads) == n_images  # cell finding and cropping: one read
    assert cropped_in(result).startswith("cell_coordinates' pass")
    assert not pending_crops_path(crops_file).exists()
    one_pass = pq.read_table(crops_file)
    assert one_pass.num_rows > 0

    reads.clear()
    alone = materialize_ingest(
        data_root, plate_id, instance, [cell_crops]
    )  # nothing pending: crops from the stored masks
    assert alone.success and cropped_in(alone) == "this step"
    assert len(reads) > 0
    assert pq.read_table(crops_file).equals(one_pass)  # same rows, pixels and masks


def test_cell_coordinates_alone_makes_no_crops(data_root):
    plate_id, instance, crops_file, _ = _setup(data_root)
    assert materialize_ingest(data_root, plate_id, instance, [raw_plates, cell_coordinates]).success
    assert not pending_crops_path(crops_file).exists() and not crops_file.exists()


def test_crops_of_other_settings_or_other_coordinates_are_not_adopted(data_root):
    plate_id, instance, crops_file, _ = _setup(data_root)
    assert materialize_ingest(
        data_root, plate_id, instance, [raw_plates, cell_coordinates, cell_crops], crops={"crop_size": 64}
    ).success
    made_64 = pq.read_table(crops_file)

    # left over from a pass at crop size 64: cell_crops at 32 crops anew and drops it
    shutil.copy(crops_file, pending_crops_path(crops_file))
    result = materialize_ingest(data_root, plate_id, instance, [cell_crops], crops={"crop_size": 32})
    assert result.success and cropped_in(result) == "this step"
    assert set(pq.read_table(crops_file, columns=["crop_size"])["crop_size"].to_pylist()) == {32}
    assert not pending_crops_path(crops_file).exists()

    # crops made at 64 from coordinates that were found again since (a new pass, a new token)
    shutil.copy(crops_file, crops_file.with_name("at32.parquet"))
    pq.write_table(made_64, pending_crops_path(crops_file))
    assert materialize_ingest(data_root, plate_id, instance, [cell_coordinates]).success
    result = materialize_ingest(data_root, plate_id, instance, [cell_crops], crops={"crop_size": 64})
    assert result.success and cropped_in(result) == "this step"
    assert not pending_crops_path(crops_file).exists()


def test_crops_in_the_cell_finding_pass_equal_crop_plate_with_a_process_pool(tmp_path):
    """The real pool (forkserver processes), filters and qc labels on: the pass' crops are
    those crop_plate makes from the stored coordinates and masks."""
    (plate,) = write_plates(tmp_path, n_cultures=1, n_concentrations=1, images_per_plate=10, size=192, seed=3)
    manifest = pd.read_csv(plate / "manifest.csv")
    filters = CropFilters(max_cells_per_image=40)
    times = dict(zip(manifest["image"], manifest["timepoint_h"].astype(float), strict=True))
    request = CropRequest(32, ("cell", "debris"), filters, times)
    rows = {row.image: row for row in manifest.itertuples(index=False)}
    for workers in (1, 2):
        tables = []
        found = plate_coordinates(
            "p",
            plate,
            manifest["image"],
            workers=workers,
            crop=request,
            on_crops=lambda image, out=tables: out.append(crops_table("p", rows[image.image], *image.crops, 32)),
        )
        masks = dict(zip(found.masks["image"].to_pylist(), found.masks["labels_zstd"].to_pylist(), strict=True))
        apart = list(
            crop_plate("p", plate, manifest, found.coordinates, masks, 32, filters, keep_qc=("cell", "debris"))
        )
        assert len(apart) > 0 and len(tables) == len(apart)
        for a, b in zip(tables, apart, strict=True):
            # NaN where a cell has no closest cell: equal as pandas compares (arrow's NaN != NaN)
            assert a.schema == b.schema and a.to_pandas().equals(b.to_pandas())
