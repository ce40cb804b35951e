"""A CellProfiler-style reference for cell finding, built from scikit-image (benchmark only).

It follows IdentifyPrimaryObjects: Gaussian smoothing, a global Otsu threshold, hole filling,
size filtering, "shape" declumping (distance-transform maxima as markers, watershed) and
regionprops measurements. Raw intensity cannot separate phase-contrast cells from the medium
(bodies can be darker or brighter, halos bright), so the threshold is taken on a local
standard deviation (texture) map, the usual CellProfiler workaround. scikit-image is a
development dependency: import this module only where it is installed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation

from gbm_assets.imaging.segmentation import CELL_COLUMNS, SegmentationParams


def reference_find_cells(
    image: np.ndarray, params: SegmentationParams = SegmentationParams()
) -> tuple[pd.DataFrame, np.ndarray]:
    """Same contract as segmentation.find_cells: (cells table, int32 instance labels)."""
    d = params.cell_diameter_px
    cell_area = np.pi * d * d / 4
    img = image.astype(np.float64)
    lo, hi = np.percentile(img, (1, 99))
    img = (img - lo) / max(hi - lo, 1e-9)
    side = max(3, int(round(params.texture_scale * d)) | 1)
    mean = ndi.uniform_filter(img, side)
    texture = np.sqrt(np.maximum(ndi.uniform_filter(img * img, side) - mean * mean, 0))
    # CellProfiler's automatic smoothing: a Gaussian filter of size diameter / 3.5.
    texture = filters.gaussian(texture, sigma=d / 3.5 / 2.35)
    mask = texture > filters.threshold_otsu(texture) * params.threshold_correction
    mask = ndi.binary_fill_holes(mask)
    mask = morphology.remove_small_objects(mask, max_size=int(params.min_area_scale * cell_area))
    distance = ndi.distance_transform_edt(mask)
    peaks = feature.peak_local_max(
        filters.gaussian(distance, sigma=2), min_distance=max(1, int(d / 4)), labels=measure.label(mask)
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-distance, markers, mask=mask)
    areas = np.bincount(labels.ravel())
    too_small = areas < params.min_area_scale * cell_area
    too_big = areas > params.max_area_scale * cell_area
    labels[(too_small | too_big)[labels]] = 0
    labels, _, _ = segmentation.relabel_sequential(labels)
    labels = labels.astype(np.int32)
    return regionprops_cells(labels), labels


def regionprops_cells(labels: np.ndarray) -> pd.DataFrame:
    """CellProfiler AreaShape measurements straight from skimage.measure.regionprops."""
    props = measure.regionprops_table(
        labels,
        properties=(
            "label", "centroid", "area", "perimeter", "major_axis_length",
            "minor_axis_length", "eccentricity", "solidity",
        ),
    )
    cells = pd.DataFrame(
        {
            "cell_id": props["label"].astype(np.int32),
            "x": props["centroid-1"],
            "y": props["centroid-0"],
            "area": props["area"].astype(float),
            "perimeter": props["perimeter"],
            "major_axis_length": props["major_axis_length"],
            "minor_axis_length": props["minor_axis_length"],
            "eccentricity": props["eccentricity"],
            "solidity": props["solidity"],
        }
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        cells["form_factor"] = np.where(
            cells["perimeter"] > 0, 4 * np.pi * cells["area"] / cells["perimeter"] ** 2, 0.0
        )
    return cells[list(CELL_COLUMNS)]
