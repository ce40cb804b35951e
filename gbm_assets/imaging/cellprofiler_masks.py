"""Masks for CellProfiler's objects: cells at a plate's own centres, shapes from our segmentation.

When a plate brings a CellProfiler object table (read by gbm_assets.imaging.cellprofiler), its
cells are where CellProfiler put them; only their shapes come from our segmentation. Every
centre seeds a marker-based watershed over the segmented foreground, as CellProfiler's seeded
identification (IdentifySecondaryObjects, "Watershed - Distance") propagates primary objects.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from gbm_assets.imaging.measurements import measure_cells
from gbm_assets.imaging.segmentation import SegmentationParams, find_cells
from gbm_assets.schema import MEASUREMENT_COLUMNS


def cells_at_objects(
    image: np.ndarray, objects: pd.DataFrame, params: SegmentationParams
) -> tuple[pd.DataFrame, np.ndarray]:
    """Cells at CellProfiler's coordinates; shapes from our segmentation, split between the points.

    Every point seeds a marker-based watershed over the segmented foreground (plus a small disc
    around each point, so a point on background still gets a mask); points sharing one region
    divide it, as CellProfiler's seeded identification would.

    Parameters
    ----------
    image : (H, W) ndarray
        Grey phase-contrast image, any real dtype (as returned by io.read_image).
    objects : DataFrame
        One row per CellProfiler object of this image: ``x``, ``y`` (float, 0-based pixel
        position, x = column, y = row) and optionally measurement columns of
        schema.MEASUREMENT_COLUMNS (NaN where CellProfiler gave none). Points outside the image
        are clipped to its border.
    params : SegmentationParams
        Our cell finding's parameters; ``cell_diameter_px`` (pixels) also sets the seed discs'
        radius (diameter / 8, at least 2 px).

    Returns
    -------
    cells : DataFrame
        One row per object, in the table's order: ``cell_id`` (int32, 1..N), ``x``, ``y``
        (float, pixels, CellProfiler's) and every measurement column (pixels / pixels²):
        CellProfiler's value where given, else measured on our mask.
    labels : (H, W) ndarray of int32
        Instance labels; object i (1-based, table order) has label i, background is 0.
    """
    _, seg = find_cells(image, params)
    h, w = seg.shape
    xy = np.rint(objects[["x", "y"]].to_numpy(float)).astype(int)
    xy[:, 0] = xy[:, 0].clip(0, w - 1)
    xy[:, 1] = xy[:, 1].clip(0, h - 1)
    foreground = (seg > 0).astype(np.uint8)
    markers = np.zeros((h, w), np.int32)
    seed_radius = max(2, int(round(params.cell_diameter_px / 8)))
    for cx, cy in xy:
        cv2.circle(foreground, (int(cx), int(cy)), seed_radius, 1, -1)
    for obj_id, (cx, cy) in enumerate(xy, start=1):
        cv2.circle(markers, (int(cx), int(cy)), 1, obj_id, -1)
    distance = cv2.distanceTransform(foreground, cv2.DIST_L2, 5)
    cost = (255 - 255 * distance / max(float(distance.max()), 1e-6)).astype(np.uint8)
    labels = ndi.watershed_ift(cost, markers) * foreground
    measured = measure_cells(labels).set_index("cell_id")
    cells = pd.DataFrame({"cell_id": np.arange(1, len(objects) + 1, dtype=np.int32)})
    cells["x"] = objects["x"].to_numpy(float)
    cells["y"] = objects["y"].to_numpy(float)
    for col in MEASUREMENT_COLUMNS:
        given = objects[col].to_numpy(float) if col in objects else np.full(len(objects), np.nan)
        fallback = measured[col].reindex(cells["cell_id"]).to_numpy(float)
        cells[col] = np.where(np.isnan(given), fallback, given)
    return cells, labels
