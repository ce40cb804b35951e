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

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

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


def _outline(labels: np.ndarray) -> np.ndarray:
    """Object pixels with an 8-connected neighbour of another value, or on the image's edge
    (centrosome.cpmorphology.outline, which CellProfiler's PercentTouching divides by)."""
    padded = np.pad(labels.astype(np.int64), 1, constant_values=-1)
    inner = padded[1:-1, 1:-1]
    different = np.zeros(labels.shape, bool)
    h, w = labels.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                different |= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] != inner
    return different & (labels > 0)


def measure_neighbors(labels: np.ndarray, cell_ids: np.ndarray, distance: int = DEFAULT_DISTANCE_PX) -> pd.DataFrame:
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
        return pd.DataFrame(out, index=pd.Index(ids, name="cell_id"))
    top = int(max(labels.max(initial=0), ids.max()))
    keep = np.zeros(top + 1, bool)
    keep[ids[ids > 0]] = True
    objects = np.where(keep[labels], labels, 0).astype(np.int64)
    index = ids.tolist()
    area = ndi.sum_labels(np.ones(objects.shape), objects, index)
    has_pixels = area > 0
    rows, cols = np.indices(objects.shape)
    cy = np.asarray(ndi.sum_labels(rows, objects, index)) / np.maximum(area, 1)
    cx = np.asarray(ndi.sum_labels(cols, objects, index)) / np.maximum(area, 1)

    # Closest objects: centroid to centroid, over every object with pixels.
    dy = cy[:, None] - cy[None, :]
    dx = cx[:, None] - cx[None, :]
    dist = np.hypot(dy, dx)
    dist[~has_pixels, :] = np.inf
    dist[:, ~has_pixels] = np.inf
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    for rank, name in ((0, "First"), (1, "Second")):
        if rank >= n:
            break
        j = order[:, rank]
        d = dist[np.arange(n), j]
        found = np.isfinite(d)
        out[f"Neighbors_{name}ClosestObjectNumber_{distance}"][found] = ids[j[found]]
        out[f"Neighbors_{name}ClosestDistance_{distance}"][found] = d[found]
    if n > 2:
        j1, j2 = order[:, 0], order[:, 1]
        v1 = np.stack([cx[j1] - cx, cy[j1] - cy])
        v2 = np.stack([cx[j2] - cx, cy[j2] - cy])
        both = np.isfinite(dist[np.arange(n), j2])
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = (v1 * v2).sum(0) / np.sqrt((v1**2).sum(0) * (v2**2).sum(0))
        angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        out[f"Neighbors_AngleBetweenNeighbors_{distance}"][both] = angle[both]

    # Neighbours and touching: each object's box grown by the distance (+1 for the touching disc).
    grow = distance + 1
    strel, strel_touching = _disk(distance), _disk(distance + 0.5)
    outline = _outline(objects)
    boxes = ndi.find_objects(objects)
    h, w = objects.shape
    for i, cell in enumerate(index):
        if cell <= 0 or cell > len(boxes) or boxes[cell - 1] is None:
            continue
        ys, xs = boxes[cell - 1]
        window = (
            slice(max(ys.start - grow, 0), min(ys.stop + grow, h)),
            slice(max(xs.start - grow, 0), min(xs.stop + grow, w)),
        )
        patch = objects[window]
        mine = patch == cell
        reach = ndi.binary_dilation(mine, strel) if distance > 0 else mine
        found = np.unique(patch[reach])
        out[f"Neighbors_NumberOfNeighbors_{distance}"][i] = int(np.count_nonzero((found != 0) & (found != cell)))
        others = (patch != 0) & ~mine
        edge = outline[window] & mine
        touching = ndi.binary_dilation(others, strel_touching) & edge
        out[f"Neighbors_PercentTouching_{distance}"][i] = (
            100.0 * np.count_nonzero(touching) / max(np.count_nonzero(edge), 1)
        )
    return pd.DataFrame(out, index=pd.Index(ids, name="cell_id"))[columns]


def with_neighbors(
    cells: pd.DataFrame, labels: np.ndarray, distance: int = DEFAULT_DISTANCE_PX, objects: tuple[str, ...] = ("cell",)
) -> pd.DataFrame:
    """One image's candidate table with measure_neighbors' columns added (float64).

    The object set (measured, and counted as neighbours) is the candidates whose qc label is in
    `objects` (every row when the table has no qc column); other rows get NaN. cells: one row per
    candidate with cell_id (its label value in labels); labels: the image's (H, W) label mask.
    Raises what measure_neighbors raises.
    """
    chosen = cells if "qc" not in cells else cells[cells["qc"].isin(list(objects))]
    measured = measure_neighbors(labels, chosen["cell_id"].to_numpy(), distance)
    added = measured.reindex(cells["cell_id"].to_numpy()).astype(np.float64)
    return cells.assign(**{c: added[c].to_numpy() for c in added.columns})
