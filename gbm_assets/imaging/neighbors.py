"""CellProfiler's MeasureObjectNeighbors for the cells of one image, from its label mask.

Measured after cell finding (plate_coordinates calls it on each image's candidates and label
mask), with the object set and the neighbour set both the candidates labelled "cell": the
columns are CellProfiler's ``Neighbors_<Feature>_<distance>`` for the method "Within a specified
distance" (its distance in pixels in the name), e.g. ``Neighbors_NumberOfNeighbors_5``.

Source: CellProfiler's MeasureObjectNeighbors module (cellprofiler/modules/
measureobjectneighbors.py; Stirling et al., BMC Bioinformatics 2021, CellProfiler 4), whose
conventions are kept: a neighbour is another object that overlaps the object dilated by a disc
of radius `distance` (edge to edge, pixels); PercentTouching is the percentage of the object's
outline pixels (8-connected, image edge included) that lie within distance + 0.5 px of another
object; the closest distances are between object centroids (not edges), over all objects of
the image whatever the distance; AngleBetweenNeighbors is the angle, in degrees, at the object's
centroid between the first and second closest centroids. Where CellProfiler writes 0 for an
object with no other object in the image (closest distances, angle), NaN is written here; the
closest object numbers are our cell_id (the label value), 0 for none, as CellProfiler's.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from gbm_assets.schema import NEIGHBOR_DISTANCE_PX as DEFAULT_DISTANCE_PX
from gbm_assets.schema import NEIGHBOR_FEATURES


def neighbor_columns(distance: int = DEFAULT_DISTANCE_PX) -> list[str]:
    """CellProfiler's column names for a neighbour distance (px): Neighbors_<Feature>_<distance>."""
    return [f"Neighbors_{feature}_{int(distance)}" for feature in NEIGHBOR_FEATURES]


def _disk(radius: float) -> np.ndarray:
    """CellProfiler's (centrosome's) strel_disk: offsets with x^2 + y^2 <= radius^2."""
    r = int(radius)
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius * radius


def measure_neighbors(
    labels: np.ndarray, cell_ids: np.ndarray, distance: int = DEFAULT_DISTANCE_PX, boxes: list | None = None
) -> pd.DataFrame:
    """CellProfiler's neighbour measurements of the objects `cell_ids` among themselves.

    Parameters
    ----------
    labels : (H, W) ndarray of non-negative int
        The image's label mask (object k is the pixels equal to k); labels not in cell_ids (other
        candidates, background) are neither measured nor neighbours.
    cell_ids : (N,) array of int
        The objects measured, label values present in `labels` (an id without pixels gets
        NumberOfNeighbors 0, PercentTouching 0 and NaN distances, as CellProfiler's empty objects).
    distance : int
        Neighbour distance in pixels (>= 0): objects within it edge to edge are neighbours.
    boxes : list of (slice, slice) or None, optional
        scipy.ndimage.find_objects(labels), when the caller has it already (cell finding does:
        segmentation.find_candidates_boxed); found here otherwise.

    Returns
    -------
    DataFrame, index cell_id (in the given order), columns neighbor_columns(distance): counts and
    object numbers int64, PercentTouching (percent, 0-100), distances (px, centroid to centroid)
    and the angle (degrees, 0-180) float64.

    Raises
    ------
    ValueError
        If labels is not 2-D, distance is negative or cell_ids repeat an id.
    """
    ids, out = _neighbor_arrays(labels, cell_ids, distance, boxes)
    return pd.DataFrame(out, index=pd.Index(ids, name="cell_id"))


def _neighbor_arrays(
    labels: np.ndarray, cell_ids: np.ndarray, distance: int, boxes: list | None = None
) -> tuple[np.ndarray, dict]:
    """measure_neighbors' ids (int64 (N,)) and columns, as a dict of (N,) arrays in
    neighbor_columns(distance) order (counts and object numbers int64, the rest float64);
    boxes: find_objects(labels) or None."""
    labels = np.asarray(labels)
    ids = np.asarray(cell_ids, dtype=np.int64)
    if labels.ndim != 2:
        raise ValueError(f"neighbour measurements need a 2-D label mask, got shape {labels.shape}")
    if distance < 0:
        raise ValueError(f"neighbour distance must be >= 0 px, got {distance}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("cell_ids repeat an id: each object is measured once")
    columns = neighbor_columns(distance)
    n = len(ids)
    out = {c: np.zeros(n, np.int64) if "Number" in c else np.full(n, np.nan) for c in columns}
    out[f"Neighbors_PercentTouching_{distance}"] = np.zeros(n)
    if n == 0:
        return ids, {c: out[c] for c in columns}
    # Each object is measured on its box grown by the distance (+1 for the touching disc): the
    # image is never copied or scanned per object, so this costs a few ms per image.
    if boxes is None:
        boxes = ndi.find_objects(labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64))
    # labels' largest value: len(boxes) (find_objects gives one entry per value up to it)
    top = int(max(len(boxes), ids.max()))
    chosen = np.zeros(top + 1, bool)
    chosen[ids[ids > 0]] = True
    h, w = labels.shape
    grow = distance + 1
    reach_kernel = _disk(distance).astype(np.uint8)
    touch_kernel = _disk(distance + 0.5).astype(np.uint8)
    ring = np.ones((3, 3), np.uint8)
    cy, cx = np.full(n, np.nan), np.full(n, np.nan)
    n_neighbors = out[f"Neighbors_NumberOfNeighbors_{distance}"]
    touching = out[f"Neighbors_PercentTouching_{distance}"]
    every = bool(chosen[1:].all())  # every object of the mask measured: "other" is any other label
    for i, cell in enumerate(ids.tolist()):
        if cell <= 0 or cell > len(boxes) or boxes[cell - 1] is None:
            continue
        ys, xs = boxes[cell - 1]
        y0, x0 = max(ys.start - grow, 0), max(xs.start - grow, 0)
        patch = labels[y0 : min(ys.stop + grow, h), x0 : min(xs.stop + grow, w)]
        is_mine = patch == cell
        mine = is_mine.view(np.uint8)
        m = cv2.moments(mine, binaryImage=True)
        cy[i], cx[i] = m["m01"] / m["m00"] + y0, m["m10"] / m["m00"] + x0
        # the other measured objects' pixels (the object's own are among the chosen: xor drops them)
        others = ((patch > 0) if every else np.take(chosen, patch)) ^ is_mine  # (take: faster than chosen[patch])
        if not others.any():  # no other object within reach: no neighbour, no touching
            continue
        reach = cv2.dilate(mine, reach_kernel).view(bool) if distance > 0 else is_mine
        # distinct labels in reach: a count of the label values present (labels are few per image)
        n_neighbors[i] = np.count_nonzero(np.bincount(patch[reach & others].astype(np.intp), minlength=1))
        # the outline: pixels of the object with an 8-connected neighbour outside it, or on the
        # image's edge (the patch reaches past the object except where the image ends)
        edge = is_mine & (cv2.erode(mine, ring, borderType=cv2.BORDER_CONSTANT, borderValue=0) == 0)
        near = cv2.dilate(others.view(np.uint8), touch_kernel).view(bool)
        touching[i] = 100.0 * np.count_nonzero(near & edge) / max(np.count_nonzero(edge), 1)

    # Closest objects: centroid to centroid, over every object with pixels.
    has_pixels = np.isfinite(cy)
    if n > 1 and has_pixels.sum() > 1:
        where = np.flatnonzero(has_pixels)
        centres = np.stack([cx[where], cy[where]], 1)
        k = min(3, len(where))
        dist, near_index = cKDTree(centres).query(centres, k=k)
        dist, near_index = np.atleast_2d(dist)[:, 1:], np.atleast_2d(near_index)[:, 1:]  # self first
        for rank, name in ((0, "First"), (1, "Second")):
            if rank >= k - 1:
                break
            j = where[near_index[:, rank]]
            out[f"Neighbors_{name}ClosestObjectNumber_{distance}"][where] = ids[j]
            out[f"Neighbors_{name}ClosestDistance_{distance}"][where] = dist[:, rank]
        if k == 3:
            j1, j2 = where[near_index[:, 0]], where[near_index[:, 1]]
            v1 = np.stack([cx[j1] - cx[where], cy[j1] - cy[where]])
            v2 = np.stack([cx[j2] - cx[where], cy[j2] - cy[where]])
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = (v1 * v2).sum(0) / np.sqrt((v1**2).sum(0) * (v2**2).sum(0))
            out[f"Neighbors_AngleBetweenNeighbors_{distance}"][where] = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    return ids, {c: out[c] for c in columns}


def with_neighbors(
    cells: pd.DataFrame,
    labels: np.ndarray,
    distance: int = DEFAULT_DISTANCE_PX,
    objects: tuple[str, ...] = ("cell",),
    boxes: list | None = None,
) -> pd.DataFrame:
    """One image's candidate table with measure_neighbors' columns added (float64).

    The object set (measured, and counted as neighbours) is the candidates whose qc label is in
    `objects` (every row when the table has no qc column); other rows get NaN. cells: one row per
    candidate with cell_id (its label value in labels); labels: the image's (H, W) label mask;
    boxes: scipy.ndimage.find_objects(labels) when the caller has it (cell finding does), else
    None. Raises what measure_neighbors raises.
    """
    chosen = cells["cell_id"].to_numpy()
    if "qc" in cells:
        chosen = chosen[cells["qc"].isin(list(objects)).to_numpy()]
    ids, measured = _neighbor_arrays(labels, chosen, distance, boxes)
    # each row's measured row by cell_id (-1: not measured, NaN), as reindex would
    at = pd.Index(ids).get_indexer(cells["cell_id"].to_numpy()) if len(ids) else np.full(len(cells), -1)
    missing = at < 0
    added = {}
    for name, values in measured.items():
        column = values.astype(np.float64)[at] if len(ids) else np.empty(len(cells))
        column[missing] = np.nan
        added[name] = column
    if any(name in cells.columns for name in added):  # measured again: replaced where they are
        return cells.assign(**added)
    # new columns appended: one concat, not a copy of the table per column as assign makes
    return pd.concat([cells, pd.DataFrame(added, index=cells.index)], axis=1)
