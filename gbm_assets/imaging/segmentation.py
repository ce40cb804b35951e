"""Finding cells in phase-contrast images with OpenCV, and measuring their shape.

Phase contrast does not separate cells from background by brightness: cell bodies can be
darker or brighter than the medium and are ringed by bright halos. What separates them is
texture: the medium is flat, cells are not. So cell finding is

1. flatten the background (large blur) and scale robustly, so thresholds mean the same
   thing on every microscope and bit depth;
2. take a local standard deviation (texture) map and threshold it with Otsu;
3. clean the mask: close small gaps, fill holes, open away debris, thin halos and fibres;
4. split touching cells by distance-transform watershed, then merge pieces whose neck is
   nearly as wide as the pieces themselves (an elongated cell is not a clump);
5. drop objects outside the area limits and measure the rest.

All sizes are given relative to the expected cell diameter, so one parameter adapts the
method to another magnification.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from gbm_assets.schema import MEASUREMENT_COLUMNS

CELL_COLUMNS = ("cell_id", "x", "y", *MEASUREMENT_COLUMNS)


@dataclass
class SegmentationParams:
    """Cell-finding settings; every size is a fraction or multiple of cell_diameter_px."""

    cell_diameter_px: float = 40.0  # expected diameter of a cell body in pixels
    background_scale: float = 2.0  # Gaussian sigma of the background estimate, in diameters
    texture_scale: float = 0.2  # side of the local-std window, in diameters
    threshold_correction: float = 1.0  # multiplies the Otsu threshold (as in CellProfiler)
    closing_scale: float = 0.1  # radius closing gaps between textured patches, in diameters
    opening_scale: float = 0.15  # radius removing debris and thin halos/fibres, in diameters
    min_area_scale: float = 0.2  # smallest object, in expected cell areas
    max_area_scale: float = 12.0  # largest object, in expected cell areas
    declump: bool = True  # split touching cells
    min_peak_distance_scale: float = 0.5  # closest two cell centres may be, in diameters
    merge_neck_ratio: float = 0.7  # merge two pieces when neck width >= this x smaller width


def _disc(radius: float) -> np.ndarray:
    size = 2 * max(1, int(round(radius))) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def normalise(image: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Background-flattened image in units of the background's robust standard deviation."""
    image = image.astype(np.float32)
    sigma = params.background_scale * params.cell_diameter_px
    # Blurring a downsampled copy is as good for a smooth background and far faster.
    factor = max(1, int(sigma // 8))
    small = cv2.resize(image, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor, borderType=cv2.BORDER_REFLECT)
    flat = image - cv2.resize(small, image.shape[::-1], interpolation=cv2.INTER_LINEAR)
    q25, q50, q75 = np.percentile(flat[::4, ::4], (25, 50, 75))
    spread = max(float(q75 - q25) / 1.349, 1e-6)
    return (flat - q50) / spread


def texture(norm: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Local standard deviation over a window a fraction of a cell wide."""
    side = max(3, int(round(params.texture_scale * params.cell_diameter_px)) | 1)
    mean = cv2.blur(norm, (side, side))
    mean_sq = cv2.blur(norm * norm, (side, side))
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on log values, where cell and background texture are closer to normal."""
    logs = np.log(values[::2, ::2] + 1e-3).ravel()
    lo, hi = np.percentile(logs, (0.5, 99.5))
    hist, edges = np.histogram(logs, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_lo = np.cumsum(hist)
    weight_hi = weight_lo[-1] - weight_lo
    mean_lo = np.cumsum(hist * centres) / np.maximum(weight_lo, 1)
    mean_hi = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(weight_hi, 1)
    between = weight_lo * weight_hi * (mean_lo - mean_hi) ** 2
    return float(np.exp(centres[int(np.argmax(between[:-1]))]))


def foreground(tex: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Binary cell mask: textured, gap-closed, hole-filled, with debris and thin rims removed."""
    d = params.cell_diameter_px
    mask = (tex > otsu_threshold(tex) * params.threshold_correction).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(params.closing_scale * d))
    mask = fill_holes(mask, max_hole_area=np.pi * d * d / 4)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(params.opening_scale * d))


def fill_holes(mask: np.ndarray, max_hole_area: float) -> np.ndarray:
    """Fill holes up to a cell's size; larger ones are medium enclosed by a ring of cells."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return mask
    holes = [c for c, h in zip(contours, hierarchy[0]) if h[3] >= 0 and cv2.contourArea(c) <= max_hole_area]
    filled = mask.copy()
    cv2.drawContours(filled, holes, -1, 1, thickness=cv2.FILLED)
    return filled


def split_clumps(mask: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Instance labels: connected components, each clump cut at its distance-transform necks."""
    _, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    if not params.declump:
        return labels
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_5)
    seeds = _seeds(dist, params)
    next_label = int(labels.max()) + 1
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        inside = labels[box] == index
        box_seeds = np.where(inside, seeds[box], 0)
        if len(np.unique(box_seeds)) < 3:  # background plus at most one seed: nothing to split
            continue
        pieces = _watershed(dist[box], inside, box_seeds)
        pieces = _merge_wide_necks(pieces, dist[box], params.merge_neck_ratio)
        ids = np.unique(pieces[pieces > 0])
        relabel = np.zeros(int(pieces.max()) + 1, np.int32)
        relabel[ids] = np.arange(next_label, next_label + len(ids), dtype=np.int32)
        labels[box][inside] = relabel[pieces[inside]]
        next_label += len(ids)
    return labels


def _seeds(dist: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Labelled distance-transform maxima at least min_peak_distance apart."""
    d = params.cell_diameter_px
    smooth = cv2.GaussianBlur(dist, (0, 0), max(1.0, 0.05 * d))
    spacing = params.min_peak_distance_scale * d
    peaks = (smooth >= cv2.dilate(smooth, _disc(spacing / 2))) & (dist >= 0.1 * d)
    _, seeds = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return seeds


_EIGHT = np.ones((3, 3), bool)


def _watershed(dist: np.ndarray, inside: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Flood the inverted distance transform from the seeds, within one connected component."""
    relief = np.where(inside, (dist.max() - dist) * 64, np.iinfo(np.uint16).max)
    markers = np.where(inside, seeds, -1).astype(np.int32)
    flooded = ndi.watershed_ift(relief.astype(np.uint16), markers, structure=_EIGHT)
    return np.where(inside, np.maximum(flooded, 0), 0)


def _merge_wide_necks(pieces: np.ndarray, dist: np.ndarray, ratio: float) -> np.ndarray:
    """Merge adjacent pieces whose shared boundary is nearly as wide as the narrower piece.

    The neck between two pieces is the largest distance-transform value along their border;
    a true clump of two cells has a neck much thinner than either cell, an elongated or
    lobed single cell does not. Pairs are merged widest neck first, like Kruskal's algorithm.
    """
    n = int(pieces.max())
    peak = ndi.maximum(dist, pieces, index=np.arange(n + 1)).astype(float)
    pairs = []
    for a_pix, b_pix, da, db in (
        (pieces[:, :-1], pieces[:, 1:], dist[:, :-1], dist[:, 1:]),
        (pieces[:-1, :], pieces[1:, :], dist[:-1, :], dist[1:, :]),
    ):
        touching = (a_pix != b_pix) & (a_pix > 0) & (b_pix > 0)
        pairs.append(np.stack([a_pix[touching], b_pix[touching], np.minimum(da[touching], db[touching])], 1))
    pairs = np.concatenate(pairs)
    if len(pairs) == 0:
        return pieces
    lo = np.minimum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    hi = np.maximum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    key = lo * (n + 1) + hi
    keys, inverse = np.unique(key, return_inverse=True)
    neck = np.zeros(len(keys))
    np.maximum.at(neck, inverse, pairs[:, 2])
    parent = np.arange(n + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k in np.argsort(-neck):
        a, b = root(int(keys[k] // (n + 1))), root(int(keys[k] % (n + 1)))
        if a != b and neck[k] >= ratio * min(peak[a], peak[b]):
            parent[b] = a
            peak[a] = max(peak[a], peak[b])
    return np.array([root(i) for i in range(n + 1)])[pieces]


def filter_by_area(labels: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Drop objects outside the area limits and renumber the rest 1..n in raster order."""
    cell_area = np.pi * params.cell_diameter_px**2 / 4
    area = np.bincount(labels.ravel())
    keep = (area >= params.min_area_scale * cell_area) & (area <= params.max_area_scale * cell_area)
    keep[0] = False
    relabel = np.zeros(len(area), np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labels]


# skimage.measure.perimeter (4-connectivity): each border pixel is scored by which of its
# neighbours are also border pixels; straight runs count 1, diagonal steps sqrt(2), corners
# in between. The same weights make our perimeter equal to CellProfiler's.
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
    hull = cv2.convexHull(np.concatenate(contours))
    filled = obj.copy()
    cv2.fillConvexPoly(filled, hull, 1)
    return int(np.count_nonzero(filled))


def measure_cells(labels: np.ndarray) -> pd.DataFrame:
    """One row per labelled object: cell_id, centroid x, y and CellProfiler AreaShape measures.

    Axis lengths are those of the ellipse with the same second central moments
    (4 * sqrt(eigenvalue), as skimage and CellProfiler define them); solidity is area over
    convex-hull area; form factor is 4 pi area / perimeter^2. Work is done per object on its
    bounding box, so cost grows with cell pixels, not image size.
    """
    rows = []
    for index, box in enumerate(ndi.find_objects(np.asarray(labels)), start=1):
        if box is None:
            continue
        obj = cv2.copyMakeBorder((labels[box] == index).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
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
    cells = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
    return cells.astype({"cell_id": np.int32, **{name: np.float64 for name in CELL_COLUMNS[1:]}})


def find_cells(
    image: np.ndarray, params: SegmentationParams = SegmentationParams()
) -> tuple[pd.DataFrame, np.ndarray]:
    """Find the cells of one phase-contrast image.

    Returns (cells, labels): a table with one row per cell (see measure_cells; cell_id is
    the cell's value in labels) and an int32 instance mask, 0 for background.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D single-channel image, got shape {image.shape}")
    tex = texture(normalise(image, params), params)
    labels = filter_by_area(split_clumps(foreground(tex, params), params), params)
    return measure_cells(labels), labels
