"""Masks for CellProfiler's objects: cells at a plate's own centres, shapes from our segmentation.

When a plate brings a CellProfiler object table (read by gbm_assets.imaging.cellprofiler), its
cells are where CellProfiler put them; only their shapes come from our segmentation. Every
centre seeds an object that grows over its region of the segmented foreground until it meets
its neighbours, as CellProfiler's IdentifySecondaryObjects ("Distance - B") grows primary objects.

Until this module existed (inside plate_cells.py) the split was scipy.ndimage.watershed_ift on
the inverted distance map, which did not split at necks: of two touching equal discs seeded at
their centres, one point got 21 pixels and the other the rest; and a foreground region without
any point went to some object through the background (tests in test_cellprofiler_masks.py).
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

    Every point seeds an object in the segmented foreground (plus a small disc around each
    point, so a point on background still gets a mask); points sharing one region divide it,
    each pixel going to the nearest point in its region; regions without a point are dropped.

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
    labels = _split_between_seeds(foreground, markers)
    measured = measure_cells(labels).set_index("cell_id")
    cells = pd.DataFrame({"cell_id": np.arange(1, len(objects) + 1, dtype=np.int32)})
    cells["x"] = objects["x"].to_numpy(float)
    cells["y"] = objects["y"].to_numpy(float)
    for col in MEASUREMENT_COLUMNS:
        given = objects[col].to_numpy(float) if col in objects else np.full(len(objects), np.nan)
        fallback = measured[col].reindex(cells["cell_id"]).to_numpy(float)
        cells[col] = np.where(np.isnan(given), fallback, given)
    return cells, labels


def _split_between_seeds(foreground: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Give each pixel of a seeded foreground region to the nearest seed in that region.

    CellProfiler's IdentifySecondaryObjects "Distance - B" rule: objects grow from their seeds
    and stop where they meet, within the thresholded foreground; points sharing a region divide
    it between them (two touching cells seeded at their centres split at the midline), and a
    region holding no seed belongs to no object. foreground: (H, W) uint8 0/1; markers: (H, W)
    int32, 0 unknown, k > 0 the seed of object k (inside the foreground). Returns (H, W) int32.
    """
    labels = np.zeros(markers.shape, np.int32)
    _, regions = cv2.connectedComponents(foreground, connectivity=8)
    for index, box in enumerate(ndi.find_objects(regions), start=1):
        if box is None:
            continue
        region = regions[box] == index
        seeds = np.where(region, markers[box], 0)
        if not seeds.any():
            continue
        _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
        labels[box][region] = seeds[iy, ix][region]
    return labels
