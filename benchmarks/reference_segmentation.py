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

from gbm_assets.imaging.measurements import CELL_COLUMNS

# CellProfiler asks for the typical object diameter range; objects outside it are discarded.
MIN_DIAMETER_SCALE = 0.5
MAX_DIAMETER_SCALE = 4.0
TEXTURE_SCALE = 0.2  # texture window, in cell diameters (as in segmentation.find_cells)


def reference_find_cells(image: np.ndarray, cell_diameter_px: float = 40.0) -> tuple[pd.DataFrame, np.ndarray]:
    """Same contract as segmentation.find_cells: (cells table, int32 instance labels)."""
    d = cell_diameter_px
    min_area = np.pi * (MIN_DIAMETER_SCALE * d) ** 2 / 4
    max_area = np.pi * (MAX_DIAMETER_SCALE * d) ** 2 / 4
    img = image.astype(np.float64)
    lo, hi = np.percentile(img, (1, 99))
    img = (img - lo) / max(hi - lo, 1e-9)
    side = max(3, round(TEXTURE_SCALE * d) | 1)
    mean = ndi.uniform_filter(img, side)
    texture = np.sqrt(np.maximum(ndi.uniform_filter(img * img, side) - mean * mean, 0))
    # CellProfiler's automatic smoothing: a Gaussian filter of size diameter / 3.5.
    texture = filters.gaussian(texture, sigma=d / 3.5 / 2.35)
    mask = ndi.binary_fill_holes(texture > filters.threshold_otsu(texture))
    mask = morphology.remove_small_objects(mask, max_size=int(min_area))
    distance = ndi.distance_transform_edt(mask)
    peaks = feature.peak_local_max(
        filters.gaussian(distance, sigma=2), min_distance=max(1, int(d / 4)), labels=measure.label(mask)
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-distance, markers, mask=mask)
    areas = np.bincount(labels.ravel())
    labels[((areas < min_area) | (areas > max_area))[labels]] = 0
    labels, _, _ = segmentation.relabel_sequential(labels)
    labels = labels.astype(np.int32)
    return regionprops_cells(labels), labels


def regionprops_cells(labels: np.ndarray) -> pd.DataFrame:
    """CellProfiler AreaShape measurements straight from skimage.measure.regionprops."""
    props = measure.regionprops_table(
        labels,
        properties=(
            "label",
            "centroid",
            "area",
            "perimeter",
            "major_axis_length",
            "minor_axis_length",
            "eccentricity",
            "solidity",
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
