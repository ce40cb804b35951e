"""Single-cell crops centred on each cell, with per-crop intensity normalisation to 8 bits.

Normalisation: each crop is stretched so that its 1st and 99th intensity percentiles map to
0 and 255 (clipped), then stored as uint8. Per-crop (rather than per-image or raw 16-bit)
removes illumination and exposure differences between images, plates and microscopes and
raises the contrast of each cell, as the thesis' per-image normalisation meant to; the
encoders see intensities in [0, 1] anyway, and 256 levels over a crop's own range are finer
than phase-contrast noise. uint8 is 2x smaller than float16 and 4x smaller than float32, which
matters at millions of crops.

Stored, a crop is its S x S bytes in row order (Parquet binary); decode_crops reads a column of
them back as an array, for training, embedding and looking crops up alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

from gbm_assets.errors import InputError

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.0


@dataclass
class CropBatch:
    """Crops of one image: the kept cells (with integer crop centres x, y) and their pixels/masks."""

    cells: pd.DataFrame
    pixels: np.ndarray  # (N, S, S) uint8, normalised
    masks: np.ndarray  # (N, S, S) uint8, 1 inside the cell's component at the centre


def normalise_crops(windows: np.ndarray) -> np.ndarray:
    """Stretch each crop's [p1, p99] to [0, 255] and return uint8 (N, S, S).

    Percentiles as numpy's default (linear interpolation), from one sort of all crops.

    Parameters
    ----------
    windows : (N, S, S) ndarray of any real dtype
        Raw image intensities of N crops (uint8 or uint16 as read_image gives them).

    Returns
    -------
    crops : (N, S, S) ndarray of uint8
        Each crop mapped linearly so that its 1st percentile is 0 and its 99th is 255, clipped
        and rounded; a flat crop (p99 = p1) becomes all zeros. N = 0 gives an empty array.
    """
    n = int(np.prod(windows.shape[1:]))
    flat = windows.reshape(len(windows), n)
    if len(flat) == 0:
        return np.zeros(windows.shape, np.uint8)
    pos = np.array([LOW_PERCENTILE, HIGH_PERCENTILE]) / 100 * (n - 1)
    below = np.floor(pos).astype(int)
    above = np.minimum(below + 1, n - 1)
    # a full sort, not a partition: numpy sorts 8- and 16-bit rows with SIMD several times faster
    part = np.sort(flat, axis=1)
    frac = (pos - below).astype(np.float32)
    lo, hi = (
        part[:, i].astype(np.float32) * (1 - f) + part[:, j].astype(np.float32) * f
        for i, j, f in zip(below, above, frac, strict=False)
    )
    out = flat.astype(np.float32)
    out -= lo[:, None]
    out *= (255.0 / np.maximum(hi - lo, 1e-6))[:, None]
    np.clip(out, 0, 255, out=out)
    return np.rint(out, out=out).astype(np.uint8).reshape(windows.shape)


def crop_origin(x: np.ndarray, y: np.ndarray, crop_size: int) -> tuple[np.ndarray, ...]:
    """Integer centres (cx, cy) and top-left corners (x0, y0) of the crops around (x, y).

    x, y are cells' centroids in pixels (x = column, y = row; float arrays of one shape, or
    scalars); crop_size is the crop's side in pixels. Returns four int64 arrays of that shape,
    in pixels: the centres rounded half to even (as Python's round) and cx - crop_size // 2,
    cy - crop_size // 2 (negative near the image's top or left edge).
    """
    cx, cy = (np.rint(np.asarray(v, np.float64)).astype(np.int64) for v in (x, y))
    half = crop_size // 2
    return cx, cy, cx - half, cy - half


def centre_component(cell_mask: np.ndarray) -> np.ndarray:
    """Keep only the connected component of a binary crop mask at (or nearest to) the centre.

    Parameters
    ----------
    cell_mask : (S, S) ndarray of bool or integer
        Non-zero where the crop shows the cell's label.

    Returns
    -------
    mask : (S, S) ndarray of uint8
        1 on the 8-connected component holding the centre pixel (S // 2, S // 2), or the one
        nearest to it when the centre is background; 0 elsewhere (all 0 for an empty mask).
    """
    mask = cell_mask.astype(np.uint8)
    n, comp = cv2.connectedComponents(mask, connectivity=8)
    if n <= 2:  # one component or none: the mask as 0/1
        return mask if cell_mask.dtype == bool else (comp > 0).astype(np.uint8)
    c = cell_mask.shape[0] // 2
    label = comp[c, c]
    if label == 0:
        ys, xs = np.nonzero(comp)
        nearest = np.argmin((ys - c) ** 2 + (xs - c) ** 2)
        label = comp[ys[nearest], xs[nearest]]
    return (comp == label).astype(np.uint8)


def extract_crops(image: np.ndarray, cells: pd.DataFrame, labels: np.ndarray, crop_size: int = 128) -> CropBatch:
    """Crop every cell whose crop_size x crop_size window lies fully inside the image.

    A crop that would cross the image edge is dropped, as in the thesis.

    Parameters
    ----------
    image : (H, W) ndarray of uint8 or uint16
        The grey image the cells were found in.
    cells : DataFrame
        One row per cell with cell_id (its label value in `labels`, unique) and x, y (its
        centroid in pixels, x = column, y = row); other columns are carried along.
    labels : (H, W) ndarray of int
        Instance labels of the image (0 = background), as segmentation.find_cells returns.
    crop_size : int
        Side S of the square crops, in pixels; positive and even.

    Returns
    -------
    CropBatch
        cells: the kept rows, with x, y replaced by the integer crop centres (int32, pixels);
        pixels: (N, S, S) uint8, each crop normalised by normalise_crops; masks: (N, S, S) uint8,
        1 on the cell's component at the centre (centre_component). N = 0 when no crop fits.

    Raises
    ------
    ValueError
        If crop_size is not a positive even number.
    """
    if crop_size <= 0 or crop_size % 2:
        raise ValueError(f"crop_size must be a positive even number, got {crop_size}")
    h, w = image.shape
    cx, cy, x0, y0 = crop_origin(cells["x"].to_numpy(), cells["y"].to_numpy(), crop_size)
    inside = np.flatnonzero((x0 >= 0) & (y0 >= 0) & (x0 + crop_size <= w) & (y0 + crop_size <= h))
    cell_ids = cells["cell_id"].to_numpy()
    windows, masks = [], []
    for i in inside:
        rows, cols = slice(y0[i], y0[i] + crop_size), slice(x0[i], x0[i] + crop_size)
        windows.append(image[rows, cols])
        masks.append(centre_component(labels[rows, cols] == cell_ids[i]))
    # the kept rows, cell_id first as int64 (as set_index / loc / reset_index gave them, faster)
    out = cells.take(inside).reset_index(drop=True)
    out.insert(0, "cell_id", out.pop("cell_id").to_numpy(np.int64))
    out["x"] = cx[inside].astype(np.int32)
    out["y"] = cy[inside].astype(np.int32)
    if not len(inside):
        empty = np.zeros((0, crop_size, crop_size), np.uint8)
        return CropBatch(out, empty, empty.copy())
    return CropBatch(out, normalise_crops(np.stack(windows)), np.stack(masks))


def decode_crops(column: pa.Array, crop_size: int) -> np.ndarray:
    """View a binary column of n crops as an (n, S, S) uint8 array without copying.

    Parameters
    ----------
    column : pyarrow binary or large_binary Array
        One crop per entry, its S x S bytes in row order (the pixels or mask column of cell_crops).
    crop_size : int
        S, the side of a crop in pixels.

    Returns
    -------
    crops : (n, S, S) ndarray of uint8
        A read-only view of the column's data buffer (copy it before writing to it).

    Raises
    ------
    InputError
        Naming cell_crops when the column holds nulls or an entry is not S x S bytes long.
    """
    if column.null_count:
        raise InputError("cell_crops", "pixels/mask column holds nulls")
    offsets_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    _, offsets, data = column.buffers()
    n = len(column)
    offsets = np.frombuffer(offsets, offsets_type)[column.offset : column.offset + n + 1]
    if n and not np.all(np.diff(offsets) == crop_size * crop_size):
        raise InputError("cell_crops", f"crops are not all {crop_size}x{crop_size} bytes")
    if n == 0:
        return np.zeros((0, crop_size, crop_size), np.uint8)
    return np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]].reshape(n, crop_size, crop_size)
