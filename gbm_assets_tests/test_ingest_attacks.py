"""Attacks on the ingest path's data integrity: crops made in cell finding's pass (adopted by
cell_crops only when they are what cropping now would make), label masks tied to their
coordinates, crop settings checked before any step runs, and magnification on odd images."""

from __future__ import annotations

import shutil

import cv2
import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile

import gbm_assets.assets.cells as cells_module
from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.errors import ImageReadError
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.plate_cells import CROPS_PASS_KEY, find_plate_cells_sized, pending_crops_path
from gbm_assets.imaging.plate_coordinates import magnification_summary, plate_coordinates
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.imaging.segmentation import SegmentationParams
from gbm_assets.paths import plate_file
from gbm_assets.storage import host_tag, plate_dataset
from gbm_assets_tests.conftest import cropped_in, materialize_ingest

INGEST = [raw_plates, cell_coordinates, cell_crops]


def _setup(data_root):
    plate_id = find_ready_plates(data_root / "raw")[-1]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_id])
    data = DataDirs(root=str(data_root))
    return plate_id, instance, data


def test_masks_of_a_run_killed_before_its_coordinates_are_not_paired_with_older_coordinates(data_root, monkeypatch):
    """A cell_coordinates run that wrote its label masks but died before its coordinates left
    masks whose labels are not the stored coordinates' cell ids: cell_crops must refuse them,
    not cut each crop's mask from another segmentation."""
    plate_id, instance, data = _setup(data_root)
    assert materialize_ingest(data_root, plate_id, instance, INGEST, finding={"cell_diameter_px": 41}).success
    coords_file = plate_file(data.coordinates, plate_id)
    write = cells_module.write_parquet_atomic

    def dies_at_coordinates(table, final, *a, **k):
        if str(final) == str(coords_file):
            raise KeyboardInterrupt("killed")
        return write(table, final, *a, **k)

    monkeypatch.setattr(cells_module, "write_parquet_atomic", dies_at_coordinates)
    with pytest.raises(KeyboardInterrupt):
        materialize_ingest(data_root, plate_id, instance, [cell_coordinates], finding={"cell_diameter_px": 25})
    monkeypatch.undo()
    result = materialize_ingest(data_root, plate_id, instance, [cell_crops], raise_on_error=False)
    assert not result.success
    assert "another cell_coordinates run" in str(result.all_events)


def test_masks_written_before_they_carried_a_token_are_still_used(data_root):
    """Masks of the version before this check (no pass token) beside coordinates with one: the
    pair cannot be told apart from a stopped run, and cell_crops uses it as before."""
    plate_id, instance, data = _setup(data_root)
    assert materialize_ingest(data_root, plate_id, instance, INGEST).success
    masks = plate_file(data.masks, plate_id)
    table = pq.read_table(masks)
    meta = {k: v for k, v in table.schema.metadata.items() if k != CROPS_PASS_KEY}
    pq.write_table(table.replace_schema_metadata(meta), masks)
    result = materialize_ingest(data_root, plate_id, instance, [cell_crops])
    assert result.success and cropped_in(result) == "this step"


def test_pending_crops_replaced_after_the_check_are_not_adopted(data_root, monkeypatch):
    """Another run's cell_coordinates may replace the pending crops between cell_crops' check
    that they match and its adopting them: what is adopted must be what was checked."""
    plate_id, instance, data = _setup(data_root)
    crops_file = plate_file(data.crops, plate_id)
    assert materialize_ingest(data_root, plate_id, instance, INGEST, crops={"crop_size": 32}).success
    foreign = crops_file.with_name("other-run.parquet")
    shutil.copy(crops_file, foreign)  # crops of another run, at another size
    check = cells_module.check_plate_unchanged

    def meanwhile_another_run_writes(plate_dir, pid, version, since, *a, **k):
        if since == "cell_crops began":
            shutil.copy(foreign, pending_crops_path(crops_file))
        return check(plate_dir, pid, version, since, *a, **k)

    monkeypatch.setattr(cells_module, "check_plate_unchanged", meanwhile_another_run_writes)
    result = materialize_ingest(data_root, plate_id, instance, [cell_coordinates, cell_crops], crops={"crop_size": 64})
    assert result.success
    assert set(pq.read_table(crops_file, columns=["crop_size"])["crop_size"].to_pylist()) == {64}


def test_coordinates_replaced_by_another_run_while_cell_crops_runs_are_not_mixed(data_root, monkeypatch):
    """Another run of the same plate writes new coordinates, masks and pending crops after
    cell_crops has read the coordinates: cell_crops must not adopt crops cut from coordinates
    other than those it read (and counts against), nor crop with masks of another run."""
    plate_id, instance, data = _setup(data_root)
    coords_file, masks = plate_file(data.coordinates, plate_id), plate_file(data.masks, plate_id)
    crops_file = plate_file(data.crops, plate_id)
    pending = pending_crops_path(crops_file)
    assert materialize_ingest(data_root, plate_id, instance, INGEST, finding={"cell_diameter_px": 41}).success
    first = {path: path.read_bytes() for path in (coords_file, masks)}
    with monkeypatch.context() as patch:  # the other run: its cell_crops has not adopted its crops yet
        patch.setattr(cells_module, "parquet_plate_version", lambda *a: (_ for _ in ()).throw(OSError("later")))
        materialize_ingest(
            data_root, plate_id, instance, INGEST, finding={"cell_diameter_px": 25}, raise_on_error=False
        )
    other = {path: path.read_bytes() for path in (coords_file, masks, pending)}
    for path, content in first.items():
        path.write_bytes(content)
    pending.unlink()
    where = cells_module.pending_crops_path

    def the_other_run_finishes_now(path):
        for written, content in other.items():
            written.write_bytes(content)
        return where(path)

    monkeypatch.setattr(cells_module, "pending_crops_path", the_other_run_finishes_now)
    result = materialize_ingest(data_root, plate_id, instance, [cell_crops], raise_on_error=False)
    assert not result.success
    assert "another cell_coordinates run" in str(result.all_events)


@pytest.mark.parametrize(
    ("crops", "problem"),
    [({"crop_size": 63}, "crop_size"), ({"crop_size": 0}, "crop_size"), ({"keep_qc": ["cells"]}, "keep_qc")],
)
def test_bad_crop_settings_fail_cell_crops_not_cell_finding(data_root, crops, problem):
    """cell_crops' settings are checked before anything is cropped: a crop size that is not a
    positive even number or an unknown qc label fails cell_crops with a message naming the
    setting, and cell_coordinates (which crops in the same pass) still succeeds."""
    plate_id, instance, data = _setup(data_root)
    result = materialize_ingest(data_root, plate_id, instance, INGEST, crops=crops, raise_on_error=False)
    assert not result.success
    assert result.asset_materializations_for_node("cell_coordinates")
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failure] == ["cell_crops"]
    assert problem in failure[0].event_specific_data.error.to_string()
    assert not pending_crops_path(plate_file(data.crops, plate_id)).exists()


def test_no_pending_crops_outlive_the_coordinates_they_were_cut_from(data_root, monkeypatch):
    """Crops left pending by a run whose cell_crops never adopted them (it failed, or the run was
    killed) and a killed pass' half-written pending file are removed by the next cell_coordinates
    run, even one without cell_crops; meanwhile dataset readers of the crops folder skip them."""
    plate_id, instance, data = _setup(data_root)
    crops_file = plate_file(data.crops, plate_id)
    assert materialize_ingest(data_root, plate_id, instance, INGEST).success
    before = pq.read_table(crops_file)
    monkeypatch.setattr(cells_module, "parquet_plate_version", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    assert not materialize_ingest(
        data_root, plate_id, instance, [cell_coordinates, cell_crops], raise_on_error=False
    ).success
    monkeypatch.undo()
    pending = pending_crops_path(crops_file)
    assert pending.exists()  # cell_crops failed before adopting them
    half = pending.with_name(f".{pending.name}.{host_tag()}.999999999.0123abcd.tmp")  # a killed writer's
    half.write_bytes(b"PAR1")
    assert pd.read_parquet(crops_file.parent).shape[0] == before.num_rows  # readers skip hidden files
    assert plate_dataset(data.crops).count_rows() == before.num_rows

    assert materialize_ingest(data_root, plate_id, instance, [cell_coordinates]).success
    assert not pending.exists() and not half.exists()
    assert sorted(p.name for p in crops_file.parent.iterdir()) == [crops_file.name]


# ---------------------------------------------------------------- magnification and image size


def _write_plate(plate_dir, images) -> list[str]:
    plate_dir.mkdir(parents=True)
    names = [f"i{i}.tif" for i in range(len(images))]
    for name, image in zip(names, images, strict=True):
        tifffile.imwrite(plate_dir / name, image)
    pd.DataFrame({"image": names, "culture": "A"}).to_csv(plate_dir / "manifest.csv", index=False)
    return names


def test_images_too_small_to_hold_a_cell_are_refused_naming_the_file(tmp_path):
    """A 4x4 or 1-row image passed raw_plates and then failed deep in OpenCV's resize; it is
    refused by raw_plates, and by cell finding itself, naming the file and its size."""
    rng = np.random.default_rng(0)
    for shape in ((4, 4), (1, 512)):
        root = tmp_path / f"{shape[0]}x{shape[1]}"
        names = _write_plate(root / "raw" / "tiny", [rng.integers(900, 1100, shape).astype(np.uint16)] * 2)
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(plates.name, ["tiny"])
        result = materialize_ingest(root, "tiny", instance, [raw_plates], raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        message = failure.event_specific_data.error.to_string()
        assert "i0.tif" in message and f"{shape[1]}x{shape[0]} px" in message and "at least" in message
        with pytest.raises(ImageReadError, match=r"i0\.tif.*at least 32 px"):
            plate_coordinates("tiny", root / "raw" / "tiny", names, workers=1)


def test_small_real_tiles_do_not_pass_for_another_magnification(t98g, tmp_path):
    """64-px tiles of real 10x fields read a fine scale of about 12 px (3.9x the reference) and
    the plate was searched at a 160-px scale without a word; under magnification.MIN_SIDE_PX
    nothing is measured, the default scale stays, and the metadata summary says so."""
    frames = sorted((t98g / "images").glob("*.tif"))[:3]
    names = _write_plate(tmp_path / "tiles", [read_image(path)[:64, :64] for path in frames])
    size, params, _ = find_plate_cells_sized(tmp_path / "tiles", names)
    assert params.cell_diameter_px == SegmentationParams().cell_diameter_px
    summary = magnification_summary(size)
    assert summary["relative"] is None and summary["used"].startswith("not measured")
    assert summary["fine_scale_px"] == {"i0.tif": None, "i1.tif": None, "i2.tif": None}


def test_a_plate_mixing_two_magnifications_is_flagged_naming_the_images(t98g, tmp_path):
    """Real fields at 1x and at 2x in one plate: the median of the sampled images' fine scales
    is used for all of them, and the metadata warns, naming the images that disagree."""
    frames = [read_image(path)[:512, :512] for path in sorted((t98g / "images").glob("*.tif"))[:3]]
    doubled = cv2.resize(frames[2], None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)[:512, :512]
    names = _write_plate(tmp_path / "mixed", [frames[0], frames[1], np.ascontiguousarray(doubled)])
    size, _, _ = find_plate_cells_sized(tmp_path / "mixed", names)
    summary = magnification_summary(size)
    assert summary["relative"] is not None
    assert "disagree" in summary["warning"] and "'i2.tif'" in summary["warning"]
    same = magnification_summary(find_plate_cells_sized(tmp_path / "mixed", names[:2])[0])
    assert same["warning"] == "" and len(same["fine_scale_px"]) == 2


def test_cell_coordinates_metadata_says_when_the_magnification_was_not_measured(tmp_path):
    """A blank plate gives no fine scale: the magnification step is skipped, visibly."""
    _write_plate(tmp_path / "raw" / "blank", [np.full((300, 300), 1000, np.uint16)] * 2)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, ["blank"])
    result = materialize_ingest(tmp_path, "blank", instance, [raw_plates, cell_coordinates])
    meta = result.asset_materializations_for_node("cell_coordinates")[0].metadata
    summary = meta["magnification"].value
    assert summary["relative"] is None and summary["used"].startswith("not measured")
