"""Which parts of a phase-contrast field are culture surface, and how good the image is.

A field can hold more than cells on the dish: the well's edge or wall (a wide band of extreme
brightness and darkness, full of texture), saturated glare, large out-of-focus blobs. Cell
finding would cut them into cell-sized "cells". They differ from cells in size and contrast at
once: a cell is at most a few diameters across and, averaged over a window one diameter wide,
stays near the medium's level (phase contrast makes its body darker and its halo brighter),
while the well's edge is many diameters long and stays far from the medium's level over whole
windows. So a region is not culture surface when its mean level over windows one cell
diameter wide departs from the medium's by more than `extreme_level` noise units over an area of
several cells, or when it is saturated over an area of a cell or more. A well's edge whose
bright and dark stripes average out to the medium's level is found by its texture instead:
strong and oriented one way (the structure tensor's coherence; Jahne, "Digital Image
Processing", 6th ed. 2005, ch. 13) over windows two diameters wide, over an area of many cells.
A cell is oriented too, but only over its own few cell areas: on the 24 Usiigaci and 6 T98G
fields no culture region reached 9 cell areas, the two well edges 44 and 90.

Image-level measures follow CellProfiler's MeasureImageQuality (FocusScore, PercentMaximal,
PercentMinimal), plus the usable (culture) fraction of the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gbm_assets.imaging.percentiles import percentiles

IMAGE_QUALITY_COLUMNS = (
    "ImageQuality_FocusScore",
    "ImageQuality_PercentMaximal",
    "ImageQuality_PercentMinimal",
    "ImageQuality_UsableFraction",
)


@dataclass(frozen=True)
class FieldQuality:
    """usable: bool (H, W), True on culture surface; measures: IMAGE_QUALITY_COLUMNS -> float."""

    usable: np.ndarray
    measures: dict[str, float]


def focus_score(image: np.ndarray) -> float:
    """CellProfiler's FocusScore: the image's variance over its mean (normalised variance).

    Groen et al., Cytometry 6 (1985) 81-91, as in CellProfiler's MeasureImageQuality. Higher is
    sharper for one set-up; compare it between images of one plate, not between microscopes.
    """
    mean, sd = cv2.meanStdDev(np.asarray(image, np.float32))
    mean, var = float(mean[0, 0]), float(sd[0, 0]) ** 2
    return var / mean if mean > 0 else 0.0


def _as_pixel(image: np.ndarray, value: float) -> float | np.generic:
    """value as a scalar of image's dtype where that is exact (an integer value, integer pixels of
    at most 32 bits), so that image == value compares without a float64 copy of the image (NumPy
    promotes integer pixels to float64 against a Python float); else value itself."""
    if image.dtype.kind in "ui" and image.dtype.itemsize <= 4 and float(value).is_integer():
        info = np.iinfo(image.dtype)
        if info.min <= value <= info.max:
            return image.dtype.type(value)
    return value


def _percent_at(image: np.ndarray, value: float) -> float:
    return 100.0 * float(np.count_nonzero(image == _as_pixel(image, value))) / image.size


def _saturation_value(image: np.ndarray) -> float | None:
    """The value a clipped (saturated) pixel holds: the integer dtype's maximum, else the image max."""
    if np.issubdtype(image.dtype, np.integer):
        return float(np.iinfo(image.dtype).max)
    return float(image.max()) if image.size else None


def non_culture_regions(
    image: np.ndarray,
    objects: np.ndarray,
    cell_diameter_px: float,
    extreme_level: float = 12.0,
    min_area_cells: float = 4.0,
    window_scale: float = 0.5,
    band_window_scale: float = 2.0,
    band_coherence: float = 0.7,
    band_energy: float = 60.0,
    band_min_area_cells: float = 20.0,
    as_float: np.ndarray | None = None,
) -> np.ndarray:
    """bool (H, W) mask of regions that are not culture surface (well edge, wall, glare).

    image: the raw 2-D image, any dtype. objects: int (H, W) labels of the textured foreground
    objects (0 = medium, the background between cells, whose median and robust spread set the
    level and the noise unit). cell_diameter_px: the typical cell's diameter in pixels.
    Regions are those where the image, averaged over a window window_scale diameters wide,
    departs from the medium's level by more than extreme_level noise units over at least
    min_area_cells cell areas, plus saturated areas of a cell area or more, plus oriented bands
    (oriented_bands) of at least band_min_area_cells cell areas; a foreground object
    that an extreme or saturated region covers over a quarter of its area is taken whole (the
    rest of the well's edge, whose bright and dark stripes average out), and everything is
    widened by a quarter diameter.
    Returns all False when the medium cannot be measured (fewer than 100 medium pixels).
    as_float: image as float32 (H, W) when the caller has it (cell finding does), else made here.
    """
    image = np.asarray(image)
    d = max(float(cell_diameter_px), 4.0)
    cell_area = np.pi * d * d / 4
    values = image[::4, ::4][objects[::4, ::4] == 0].astype(np.float64)  # the medium, sampled
    out = np.zeros(image.shape, bool)
    if values.size < 100:
        return out
    q25, q50, q75 = percentiles(values, (25, 50, 75))
    spread = (q75 - q25) / 1.349 or float(values.std())
    if spread <= 0:
        return out
    # Work at a few pixels per diameter: the regions are many diameters wide.
    factor = max(1, int(d // 8))
    small = cv2.resize(
        np.ascontiguousarray(image, np.float32) if as_float is None else as_float,
        None,
        fx=1 / factor,
        fy=1 / factor,
        interpolation=cv2.INTER_AREA,
    )
    window = max(3, int(round(window_scale * d / factor)) | 1)
    level = (cv2.blur(small, (window, window), borderType=cv2.BORDER_REFLECT) - q50) / spread
    extreme = (np.abs(level) > extreme_level).astype(np.uint8)
    saturated_value = _saturation_value(image)
    regions = _large_components(extreme, min_area_cells * cell_area / factor**2)
    bands = oriented_bands((small - q50) / spread, band_window_scale * d / factor, band_coherence, band_energy)
    bands = _large_components(bands, band_min_area_cells * cell_area / factor**2)
    if bands.any():  # bridge the notches that bright blobs on the band's rim cut into it
        close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * max(1, round(d / factor)) + 1,) * 2)
        bands = cv2.morphologyEx(bands.astype(np.uint8), cv2.MORPH_CLOSE, close) > 0
    at_maximum = None
    if saturated_value is not None:  # compared in the image's own dtype: no float copy of the image
        at_maximum = image == _as_pixel(image, saturated_value)
    # A downsampled pixel is saturated when over half of its footprint is, and a saturated
    # region needs cell_area / factor**2 of them: with under 0.4x that many footprints' worth of
    # saturated pixels in the whole image there is none (0.4, not 0.5: a margin for rounding).
    footprint = image.shape[0] / small.shape[0] * image.shape[1] / small.shape[1]
    if at_maximum is not None and np.count_nonzero(at_maximum) > 0.4 * cell_area / factor**2 * footprint:
        saturated = cv2.resize(at_maximum.astype(np.float32), small.shape[::-1], interpolation=cv2.INTER_AREA)
        regions |= _large_components((saturated > 0.5).astype(np.uint8), cell_area / factor**2)
    if not regions.any() and not bands.any():
        return out
    if regions.any():
        regions = cv2.resize(regions.astype(np.uint8), image.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
        n = int(objects.max()) + 1
        covered = np.bincount(objects[regions], minlength=n)
        size = np.maximum(np.bincount(objects.ravel(), minlength=n), 1)
        whole = covered >= 0.25 * size
        whole[0] = False
        regions |= whole[objects]
        regions = cv2.resize(regions.astype(np.uint8), small.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    regions |= bands  # a band's texture covers the band; the cells on its object's far side stay
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * max(1, round(d / 4 / factor)) + 1,) * 2)
    regions = cv2.dilate(regions.astype(np.uint8), grow)
    return cv2.resize(regions, image.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)


def oriented_bands(z: np.ndarray, window_px: float, min_coherence: float, min_energy: float) -> np.ndarray:
    """uint8 mask (z's shape) of strong, one-way texture: stripes, a well's edge, a scratch.

    z: float32 (H, W) image in medium-noise units. Over square windows window_px wide, the
    structure tensor J of z's Sobel gradients gives the texture's energy sqrt(trace J) (noise
    units per pixel) and its coherence (l1 - l2) / (l1 + l2) of J's eigenvalues (0: no preferred
    orientation, 1: perfect stripes); the mask is where both pass their minimum.
    """
    z = np.asarray(z, np.float32)
    gx = cv2.Sobel(z, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(z, cv2.CV_32F, 0, 1, ksize=3)
    window = (max(3, int(round(window_px)) | 1),) * 2
    jxx = cv2.blur(gx * gx, window, borderType=cv2.BORDER_REFLECT)
    jyy = cv2.blur(gy * gy, window, borderType=cv2.BORDER_REFLECT)
    jxy = cv2.blur(gx * gy, window, borderType=cv2.BORDER_REFLECT)
    trace = jxx + jyy
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / np.maximum(trace, 1e-6)
    return ((coherence > min_coherence) & (trace > min_energy**2)).astype(np.uint8)


def _large_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """bool mask of the 8-connected components of a uint8 mask with at least min_area pixels."""
    # areas counted here: OpenCV's connectedComponentsWithStats takes several times longer
    n, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    keep = np.bincount(labels.ravel(), minlength=n) >= min_area
    keep[0] = False
    return keep[labels]


def field_quality(
    image: np.ndarray, objects: np.ndarray, cell_diameter_px: float, as_float: np.ndarray | None = None
) -> FieldQuality:
    """Culture-surface mask and CellProfiler-style image quality measures of one image.

    image: 2-D, any dtype. objects: int (H, W) foreground object labels, 0 = medium (see
    non_culture_regions).
    Returns FieldQuality(usable, measures): measures hold ImageQuality_FocusScore (variance
    / mean), ImageQuality_PercentMaximal and _PercentMinimal (percent of pixels at the image's
    maximum / minimum, as CellProfiler reports them) and ImageQuality_UsableFraction (share of
    the field that is culture surface, 0-1). as_float: image as float32 (H, W) when the caller
    has it (cell finding does), else made here.
    Raises ValueError when image is not 2-D or medium does not match its shape.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if objects.shape != image.shape:
        raise ValueError(f"object labels {objects.shape} do not match image {image.shape}")
    as_float = np.ascontiguousarray(image, np.float32) if as_float is None else as_float  # one copy for both
    usable = ~non_culture_regions(image, objects, cell_diameter_px, as_float=as_float)
    measures = {
        "ImageQuality_FocusScore": focus_score(as_float),
        "ImageQuality_PercentMaximal": _percent_at(image, float(image.max())) if image.size else 0.0,
        "ImageQuality_PercentMinimal": _percent_at(image, float(image.min())) if image.size else 0.0,
        "ImageQuality_UsableFraction": np.count_nonzero(usable) / usable.size if usable.size else 0.0,
    }
    return FieldQuality(usable, measures)
