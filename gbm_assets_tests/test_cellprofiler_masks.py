"""Masks for CellProfiler's objects (imaging.cellprofiler_masks): every centre seeds a watershed
over our segmented foreground; points on background get a small disc."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from gbm_assets.imaging import cellprofiler_masks
from gbm_assets.imaging.cellprofiler_masks import cells_at_objects
from gbm_assets.imaging.segmentation import SegmentationParams
from gbm_assets.schema import MEASUREMENT_COLUMNS

PARAMS = SegmentationParams(cell_diameter_px=40.0)  # seed discs of radius 40 / 8 = 5 px


def test_points_on_background_get_seed_discs_and_keep_cellprofiler_values():
    image = np.full((120, 160), 100, np.uint8)  # flat: our segmentation finds nothing
    objects = pd.DataFrame({"x": [30.2, 100.0, 500.0], "y": [40.0, 60.7, 50.0], "area": [123.0, np.nan, np.nan]})
    cells, labels = cells_at_objects(image, objects, PARAMS)
    assert labels.shape == image.shape and labels.dtype == np.int32
    assert cells["cell_id"].tolist() == [1, 2, 3] and cells["cell_id"].dtype == np.int32
    assert list(cells.columns) == ["cell_id", "x", "y", *MEASUREMENT_COLUMNS]
    # CellProfiler's centres are kept as given, even the one outside the image.
    assert cells["x"].tolist() == [30.2, 100.0, 500.0] and cells["y"].tolist() == [40.0, 60.7, 50.0]
    assert labels[40, 30] == 1 and labels[61, 100] == 2 and labels[50, 159] == 3  # clipped to the border
    disc = np.count_nonzero(cv2.circle(np.zeros((40, 40), np.uint8), (20, 20), 5, 1, -1))
    assert np.count_nonzero(labels == 2) == disc
    # CellProfiler's area where given, else measured on our mask.
    assert cells["area"].tolist() == [123.0, disc, pytest.approx(np.count_nonzero(labels == 3))]
    assert not cells[list(MEASUREMENT_COLUMNS)].isna().any().any()


def _with_segmentation(monkeypatch, seg: np.ndarray) -> None:
    """Make our cell finding return seg as its label image, so the watershed alone is tested."""
    monkeypatch.setattr(cellprofiler_masks, "find_cells", lambda image, params: (None, seg))


def test_points_sharing_one_region_divide_it_at_the_neck(monkeypatch):
    seg = np.zeros((100, 200), np.int32)
    cv2.circle(seg, (70, 50), 30, 1, -1)  # two touching cells, one segmented region
    cv2.circle(seg, (125, 50), 30, 1, -1)
    _with_segmentation(monkeypatch, seg)
    objects = pd.DataFrame({"x": [70.0, 125.0], "y": [50.0, 50.0]})
    cells, labels = cells_at_objects(np.zeros(seg.shape, np.uint8), objects, PARAMS)
    assert np.array_equal(labels > 0, seg > 0)  # the region, no more, no less
    assert (labels[:, :95] != 2).all() and (labels[:, 101:] != 1).all()  # split at the neck (x = 97.5)
    areas = [np.count_nonzero(labels == 1), np.count_nonzero(labels == 2)]
    assert abs(areas[0] - areas[1]) < 0.03 * sum(areas)  # two equal discs, two equal halves
    assert cells["area"].tolist() == areas


def test_a_region_without_a_point_belongs_to_no_object(monkeypatch):
    seg = np.zeros((100, 200), np.int32)
    cv2.circle(seg, (50, 50), 25, 1, -1)  # CellProfiler's cell
    cv2.circle(seg, (150, 50), 25, 2, -1)  # something our segmentation found but CellProfiler did not
    _with_segmentation(monkeypatch, seg)
    cells, labels = cells_at_objects(np.zeros(seg.shape, np.uint8), pd.DataFrame({"x": [50.0], "y": [50.0]}), PARAMS)
    assert np.array_equal(labels == 1, seg == 1) and not labels[seg == 2].any()
    assert cells["area"].item() == np.count_nonzero(seg == 1)
