"""Masks for CellProfiler's objects (imaging.cellprofiler_masks): every centre seeds a watershed
over our segmented foreground; points on background get a small disc."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

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
