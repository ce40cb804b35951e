"""CellProfiler's AreaShape measurements of labelled objects, computed with OpenCV.

One row per object: centroid, area, perimeter, major and minor axis lengths, eccentricity,
solidity and form factor, with CellProfiler's (scikit-image's) definitions, so tables from
our segmentation and from a CellProfiler run mean the same thing.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from gbm_assets.schema import MEASUREMENT_COLUMNS

CELL_COLUMNS = ("cell_id", "x", "y", *MEASUREMENT_COLUMNS)

# skimage.measure.perimeter (4-connectivity), which CellProfiler's AreaShape uses: each border
# pixel is scored by which neighbours are also border pixels; straight runs count 1, diagonal
# steps sqrt(2), corners in between.
_PERIMETER_KERNEL = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]], np.float32)
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _perimeter(obj: np.ndarray) -> float:
    """CellProfiler/skimage perimeter of one binary object (uint8, padded by one pixel)."""
    border = obj - cv2.erode(obj, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    code = cv2.filter2D(border.astype(np.float32), -1, _PERIMETER_KERNEL, borderType=cv2.BORDER_CONSTANT)
    counts = np.bincount(code[border > 0].astype(np.int64), minlength=50)[:50]
    return float(counts @ _PERIMETER_WEIGHTS)


def _convex_area(obj: np.ndarray) -> int:
    """Pixels inside the convex hull of the object (never fewer than the object has)."""
    contours, _ = cv2.findContours(obj, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = obj.copy()
    cv2.fillConvexPoly(filled, cv2.convexHull(np.concatenate(contours)), 1)
    return int(np.count_nonzero(filled))


def _moments_table(rows: list) -> pd.DataFrame:
    """measure_objects' whole-object table from its (cell_id, x, y, area) rows."""
    values = np.array(rows, np.float64).reshape(len(rows), 4)
    nan = np.full(len(rows), np.nan)
    return pd.DataFrame(
        {
            "cell_id": values[:, 0].astype(np.int32),
            "x": values[:, 1],
            "y": values[:, 2],
            "area": values[:, 3],
            **{name: nan.copy() for name in CELL_COLUMNS[4:]},
        }
    )


def measure_cells(labels: np.ndarray, boxes: list | None = None, within: np.ndarray | None = None) -> pd.DataFrame:
    """One row per labelled object: cell_id, centroid x, y and CellProfiler AreaShape measures.

    Axis lengths are those of the ellipse with the same second central moments
    (4 * sqrt(eigenvalue), as skimage and CellProfiler define them); solidity is area over
    convex-hull area; form factor is 4 pi area / perimeter^2. Each object is measured on its
    bounding box, so the cost grows with cell pixels, not with the image size.

    Parameters
    ----------
    labels : (H, W) ndarray of non-negative int
        Instance labels: 0 is background, object k is the pixels equal to k. Missing label
        values are skipped.
    boxes : list of (slice, slice) or None, optional
        scipy.ndimage.find_objects(labels), when the caller has it already (found here otherwise).
    within : (H, W) bool ndarray or None, optional
        Measure each object's pixels inside this mask only (its outline, without the halo rim
        outside it: segmentation.find_candidates, halo_rim_width); an object with no pixel inside
        it is measured whole. None: every object whole.

    Returns
    -------
    cells : DataFrame
        One row per object present, in label order, with the columns CELL_COLUMNS: cell_id
        (int32, the label value); x, y (float64, centroid in pixels, x = column, y = row, 0-based);
        area (pixels); perimeter, major_axis_length, minor_axis_length (pixels); eccentricity,
        solidity, form_factor (float64, unitless, 0..1). Empty for a label image without objects.
    """
    return _measured(labels, boxes, within)[1]


def measure_objects(
    labels: np.ndarray, boxes: list | None = None, within: np.ndarray | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(whole, outline): each object's whole moments, and measure_cells(labels, boxes, within), from one pass.

    whole is measure_cells' table with only cell_id, x, y and area filled (the rest NaN): the
    whole objects' pixel counts and centroids (px), the same values to the bit as
    measure_cells(labels, boxes) gives in those columns, for rules that need no more (the
    quality rules judge the whole object). outline is measure_cells' table (see it for the
    columns). Each object's box is cut and its whole moments taken once, for both. labels:
    (H, W) int instance labels; boxes: find_objects(labels) or None; within: (H, W) bool or None.
    """
    return _measured(labels, boxes, within)


def _measured(labels: np.ndarray, boxes: list | None, within: np.ndarray | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """measure_objects' two tables, from one loop over the objects."""
    labels = np.asarray(labels)
    whole, rows = [], []
    for index, box in enumerate(ndi.find_objects(labels) if boxes is None else boxes, start=1):
        if box is None:
            continue
        cut = (labels[box] == index).astype(np.uint8)
        obj = cv2.copyMakeBorder(cut, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        m = cv2.moments(obj, binaryImage=True)
        area = m["m00"]
        whole.append((index, box[1].start - 1 + m["m10"] / area, box[0].start - 1 + m["m01"] / area, area))
        if within is not None:
            inner = cut & within[box]
            if inner.any():
                obj = cv2.copyMakeBorder(inner, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
                m = cv2.moments(obj, binaryImage=True)
                area = m["m00"]
        a, b, c = m["mu20"] / area, m["mu11"] / area, m["mu02"] / area
        spread = np.sqrt(((a - c) / 2) ** 2 + b * b)
        major_var, minor_var = (a + c) / 2 + spread, max((a + c) / 2 - spread, 0.0)
        perimeter = _perimeter(obj)
        rows.append(
            (
                index,
                box[1].start - 1 + m["m10"] / area,
                box[0].start - 1 + m["m01"] / area,
                area,
                perimeter,
                4 * np.sqrt(major_var),
                4 * np.sqrt(minor_var),
                np.sqrt(1 - minor_var / major_var) if major_var > 0 else 0.0,
                area / _convex_area(obj),
                4 * np.pi * area / perimeter**2 if perimeter > 0 else 0.0,
            )
        )
    # one float64 array, then the columns: several times faster than DataFrame.astype per column
    values = np.array(rows, np.float64).reshape(len(rows), len(CELL_COLUMNS))
    shapes = pd.DataFrame(
        {"cell_id": values[:, 0].astype(np.int32), **{name: values[:, i] for i, name in enumerate(CELL_COLUMNS) if i}}
    )
    return _moments_table(whole), shapes


_RIM_LOW, _RIM_STEP, _RIM_BINS = -50.0, 0.25, 400  # noise units: -50..50


def halo_rim_width(
    depth: np.ndarray, z: np.ndarray, foreground: np.ndarray, max_width: float, halo_level: float
) -> int:
    """Width (px, int >= 0) of the phase halo ring that the foreground holds around its cells.

    Phase contrast rings every cell with a bright halo just outside its outline, and texture
    (a local SD over a window) marks the halo and the medium next to it as foreground too: the
    foreground's outer band is the halo, not the cell. Across the band, the median brightness
    of the foreground's pixels at each whole-pixel distance from the medium rises to the halo's
    crest, then falls back, inside the cell, below halo_level. The rim is every distance up to
    that fall (where the median never reaches halo_level, there is no halo: 0).

    depth: float32 (H, W), distance (px) of each foreground pixel to the medium; z: float32
    (H, W), the image in noise units (bright positive); foreground: bool (H, W); max_width: px,
    the widest rim looked for; halo_level: noise units. Sampled every other row and column.
    """
    inside = foreground[::2, ::2]
    top = max(1, int(max_width))
    dist = np.minimum(depth[::2, ::2][inside], top + 1).astype(np.int64)
    # medians from a histogram per distance (bins of _RIM_STEP noise units): linear time
    bins = np.clip(((z[::2, ::2][inside] - _RIM_LOW) / _RIM_STEP).astype(np.int64), 0, _RIM_BINS - 1)
    hist = np.bincount(dist * _RIM_BINS + bins, minlength=(top + 2) * _RIM_BINS).reshape(top + 2, _RIM_BINS)[: top + 1]
    counts = hist.sum(1)
    below_half = (np.cumsum(hist, 1) < (counts[:, None] + 1) / 2).sum(1)
    medians = np.where(counts > 0, _RIM_LOW + (below_half + 0.5) * _RIM_STEP, np.nan)
    if not np.nanmax(medians, initial=-np.inf) >= halo_level:
        return 0
    crest = int(np.nanargmax(medians))
    below = np.flatnonzero(medians[crest:] < halo_level)
    return crest + int(below[0]) if below.size else top
