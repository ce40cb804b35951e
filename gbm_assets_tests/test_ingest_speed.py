"""What keeps the ingest (raw_plates -> cell_coordinates -> cell_crops) fast, without changing its results:
label masks stored compressed (not as PNG) and still read from older plates, idle pool workers
starting on a plate's images while its size estimate finishes, and few progress log lines."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gbm_assets.assets.cells as cells_assets
import gbm_assets.imaging.plate_cells as plate_cells
from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.cell_size import sample_images
from gbm_assets.imaging.plate_cells import decode_labels, encode_labels, png_labels
from gbm_assets.imaging.plate_coordinates import plate_coordinates
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.imaging.segmentation import SegmentationParams
from gbm_assets.imaging.synthetic import write_plates
from gbm_assets.paths import plate_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ONE_WORKER = {
    "ops": {"cell_crops": {"config": {"crop_size": 64, "workers": 1}}, "cell_coordinates": {"config": {"workers": 1}}}
}


def _labels(shape=(64, 80), n=300, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n + 1, shape).astype(np.int32)


def test_label_masks_are_stored_compressed_and_png_masks_still_read():
    labels = _labels()
    stored = encode_labels(labels)
    assert not stored.startswith(PNG_SIGNATURE)
    assert np.array_equal(decode_labels(stored, labels.shape), labels)
    # masks written before the codec changed are 16-bit PNGs: read the same
    assert np.array_equal(decode_labels(png_labels(labels), labels.shape), labels)
    with pytest.raises(ValueError, match="img7.tif"):
        decode_labels(stored[: len(stored) // 2], labels.shape, "img7.tif")
    with pytest.raises(ValueError, match=r"img7.tif.*does not match image \(64, 81\)"):
        decode_labels(png_labels(labels), (64, 81), "img7.tif")
    with pytest.raises(ValueError, match="65535"):
        encode_labels(np.full((4, 4), 70_000, np.int32), "big.tif")


def _materialize(data_root, plate_id, instance, assets):
    return dg.materialize(
        assets,
        partition_key=plate_id,
        instance=instance,
        resources={"data": DataDirs(root=str(data_root))},
        run_config={"ops": {k: v for k, v in ONE_WORKER["ops"].items() if k in {a.key.path[-1] for a in assets}}},
    )


def _instance(plate_id):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_id])
    return instance


def test_cell_crops_same_from_stored_masks_and_from_png_masks_of_older_plates(data_root):
    plate_id = find_ready_plates(data_root / "raw")[0]
    instance = _instance(plate_id)
    assert _materialize(data_root, plate_id, instance, [raw_plates, cell_coordinates, cell_crops]).success
    data = DataDirs(root=str(data_root))
    masks_path = plate_file(data.masks, plate_id)
    masks = pq.read_table(masks_path)
    assert "labels_png" not in masks.column_names
    assert not any(b.startswith(PNG_SIGNATURE) for b in masks["labels_zstd"].to_pylist())
    crops_path = plate_file(data.crops, plate_id)
    first = pq.read_table(crops_path)
    assert first.num_rows > 0

    # a masks file as cell_coordinates wrote it before: PNG bytes in labels_png
    shapes = zip(masks["labels_zstd"].to_pylist(), masks["height"].to_pylist(), masks["width"].to_pylist(), strict=True)
    pngs = [png_labels(decode_labels(b, (h, w))) for b, h, w in shapes]
    legacy = masks.drop_columns(["labels_zstd"]).append_column("labels_png", pa.array(pngs, pa.binary()))
    pq.write_table(legacy.replace_schema_metadata(masks.schema.metadata), masks_path)
    assert _materialize(data_root, plate_id, instance, [cell_crops]).success
    again = pq.read_table(crops_path)
    assert again.equals(first)


def _messages(instance, result, prefix):
    return [e.user_message for e in instance.all_logs(result.run_id) if e.user_message.startswith(prefix)]


def test_a_short_plate_logs_no_line(data_root):
    """Each log line is a database write of Dagster's, inside the step's time: a plate done in
    seconds logs none (no progress lines, no line per step); its materializations say it all."""
    plate_id = find_ready_plates(data_root / "raw")[0]
    instance = _instance(plate_id)
    result = _materialize(data_root, plate_id, instance, [raw_plates, cell_coordinates, cell_crops])
    assert result.success
    lines = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    assert lines == []
    meta = result.asset_materializations_for_node("cell_coordinates")[0].metadata
    assert meta["source"].value == "segmentation"
    assert meta["cells_found_at_px"].value == meta["segmentation_params"].value["cell_diameter_px"]


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)


class _Context:
    def __init__(self):
        self.log = _Log()


def test_a_long_plate_still_logs_its_progress_at_most_every_10_s(monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(cells_assets.time, "monotonic", lambda: clock["now"])
    context = _Context()
    report = cells_assets._progress(context, "cell finding p")
    for done in range(1, 101):  # 100 images, 3 s each
        clock["now"] += 3.0
        report(done, 100)
    lines = context.log.lines
    assert lines[-1] == "cell finding p: 100/100 images (100%)"
    assert 8 <= len(lines) <= 11  # about every 10% (30 s apart here), never per image
    assert "cell finding p: 10/100 images (10%)" in lines

    quick = _Context()
    report = cells_assets._progress(quick, "cropping p")
    for done in range(1, 101):  # 100 images in 5 s: under PROGRESS_EVERY_S, no line at all
        clock["now"] += 0.05
        report(done, 100)
    assert quick.log.lines == []


def _tiny_plate(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((32, 32), i, np.uint8))
    return names


class _FakeFinder:
    """find_candidates_boxed stand-in: 5 cells of equivalent diameter `diameter_px` per image, x = the
    scale they were found at; the sample image `hold` waits until some other image has started."""

    def __init__(self, names, diameter_px, hold=None):
        self.names, self.area = names, np.pi * diameter_px**2 / 4
        self.hold, self.calls, self.lock = hold, [], threading.Lock()
        self.other_started = threading.Event()
        self.sample = set(sample_images(names))

    def __call__(self, image, params):
        name = self.names[int(image[0, 0])]
        with self.lock:
            self.calls.append((name, params.cell_diameter_px))
        if name not in self.sample:
            self.other_started.set()
        if name == self.hold:
            self.other_started.wait(timeout=5)
        n = 5
        cells = pd.DataFrame(
            {
                "cell_id": np.arange(1, n + 1),
                "x": np.full(n, params.cell_diameter_px),
                "y": np.arange(n, dtype=float),
                "area": np.full(n, self.area),
                # the whole object's area in cell areas at the scale found (what the size estimate reads)
                "qc_area_ratio": np.full(n, self.area / (np.pi * params.cell_diameter_px**2 / 4)),
                "qc": "cell",
            }
        )
        # no label has pixels: find_objects gives no box
        return cells, np.zeros(image.shape, np.int32), {"ImageQuality_FocusScore": 1.0}, []


def _thread_pool(monkeypatch):
    """The process pool swapped for threads, so that the fakes above are seen by every task."""
    pools = {}
    monkeypatch.setattr(plate_cells, "_pool", lambda workers: pools.setdefault(workers, ThreadPoolExecutor(workers)))
    return pools


def test_idle_workers_start_on_the_other_images_before_the_size_estimate(tmp_path, monkeypatch):
    names = _tiny_plate(tmp_path, 12)
    sample = sample_images(names)
    finder = _FakeFinder(names, diameter_px=48.0, hold=sample[-1])  # estimate 40 px: the default scale stays
    monkeypatch.setattr(plate_cells, "find_candidates_boxed", finder)
    started_at_estimate = []
    estimate = plate_cells.estimate_from_diameters

    def recording_estimate(diameters, *weights):
        started_at_estimate.extend(name for name, _ in finder.calls)
        return estimate(diameters, *weights)

    monkeypatch.setattr(plate_cells, "estimate_from_diameters", recording_estimate)
    reads = []
    read = plate_cells.read_image
    monkeypatch.setattr(plate_cells, "read_image", lambda path: reads.append(path.name) or read(path))
    pools = _thread_pool(monkeypatch)
    try:
        pooled = plate_coordinates("p", tmp_path, names, workers=2)
    finally:
        for pool in pools.values():
            pool.shutdown()
    assert set(started_at_estimate) - set(sample)  # the pool did not wait for the estimate
    assert pooled.params.cell_diameter_px == SegmentationParams().cell_diameter_px
    assert sorted(reads) == names  # each image read and segmented once
    assert sorted(name for name, _ in finder.calls) == names

    finder.calls.clear()
    serial = plate_coordinates("p", tmp_path, names, workers=1)
    pd.testing.assert_frame_equal(serial.coordinates, pooled.coordinates)
    assert serial.masks.equals(pooled.masks)


def test_a_rescaled_plate_keeps_only_images_found_at_the_new_scale(tmp_path, monkeypatch):
    names = _tiny_plate(tmp_path, 12)
    sample = sample_images(names)
    finder = _FakeFinder(names, diameter_px=240.0, hold=sample[-1])  # estimate 200 px: scale 0.6 x 200
    monkeypatch.setattr(plate_cells, "find_candidates_boxed", finder)
    pools = _thread_pool(monkeypatch)
    try:
        plate = plate_coordinates("p", tmp_path, names, workers=2)
    finally:
        for pool in pools.values():
            pool.shutdown()
    assert plate.params.cell_diameter_px == 120.0
    assert plate.coordinates["image"].drop_duplicates().tolist() == names
    assert (plate.coordinates["x"] == 120.0).all()  # no result of the first scale kept
    assert sorted(name for name, scale in finder.calls if scale == 120.0) == names


def test_plate_coordinates_identical_with_one_or_two_worker_processes(tmp_path):
    """The real pool (forkserver processes) over a plate longer than the size-estimate sample."""
    (plate,) = write_plates(tmp_path, n_cultures=1, n_concentrations=1, images_per_plate=10, size=192, seed=3)
    names = pd.read_csv(plate / "manifest.csv")["image"].tolist()
    serial = plate_coordinates("p", plate, names, workers=1)
    pooled = plate_coordinates("p", plate, names, workers=2)
    assert len(serial.coordinates) > 0
    pd.testing.assert_frame_equal(serial.coordinates, pooled.coordinates)
    assert serial.masks.equals(pooled.masks)
