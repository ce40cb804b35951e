"""The hand-crafted baseline: CellProfiler-style shape, intensity and texture features per crop.

What an image-based profiling pipeline (CellProfiler's MeasureObjectSizeShape,
MeasureObjectIntensity, MeasureTexture) would give each cell without learning anything: the
AreaShape measurements the crops already carry (schema.MEASUREMENT_COLUMNS), intensity
statistics of the crop's pixels inside the cell mask and in the background around it, and
texture of the masked pixels (Sobel gradient, Laplacian, Haralick grey-level co-occurrence
statistics from scikit-image). Learned embeddings must beat these to earn their cost.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from skimage.feature import graycomatrix, graycoprops

from gbm_assets.schema import MEASUREMENT_COLUMNS

INTENSITY_FEATURES = (
    "Intensity_MeanIntensity",
    "Intensity_StdIntensity",
    "Intensity_MedianIntensity",
    "Intensity_LowerQuartileIntensity",
    "Intensity_UpperQuartileIntensity",
    "Intensity_Percentile05",
    "Intensity_Percentile95",
    "Intensity_MeanBackground",
)
HARALICK = ("contrast", "dissimilarity", "homogeneity", "ASM", "correlation")
GLCM_DISTANCES = (1, 3)
GLCM_LEVELS = 16
TEXTURE_FEATURES = (
    "Texture_GradientMean",
    "Texture_GradientStd",
    "Texture_LaplacianVariance",
    *(f"Texture_{p}_{d}" for d in GLCM_DISTANCES for p in HARALICK),
)
PIXEL_FEATURES = INTENSITY_FEATURES + TEXTURE_FEATURES
HANDCRAFTED_FEATURES = tuple(f"AreaShape_{m}" for m in MEASUREMENT_COLUMNS) + PIXEL_FEATURES
_FALLBACK_RADIUS = 8  # px: a crop whose mask is empty is measured in a disc at its centre


def _centre_disc(side: int) -> np.ndarray:
    yy, xx = np.ogrid[:side, :side]
    return (yy - side // 2) ** 2 + (xx - side // 2) ** 2 <= _FALLBACK_RADIUS**2


def _haralick(pixels: np.ndarray, inside: np.ndarray) -> list[float]:
    """GLCM statistics of the masked pixels, averaged over 4 angles, at each of GLCM_DISTANCES.

    Pixels are quantised to 1..GLCM_LEVELS inside the mask and 0 outside; pairs touching level 0
    are dropped before the statistics, so the background does not count as texture.
    """
    levels = np.where(inside, 1 + (pixels.astype(np.int32) * GLCM_LEVELS) // 256, 0).astype(np.uint8)
    glcm = graycomatrix(
        levels, GLCM_DISTANCES, [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=GLCM_LEVELS + 1, symmetric=True
    )[1:, 1:].astype(np.float64)
    totals = glcm.sum(axis=(0, 1), keepdims=True)
    glcm = np.divide(glcm, totals, out=np.zeros_like(glcm), where=totals > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {p: np.nan_to_num(graycoprops(glcm, p).mean(axis=1)) for p in HARALICK}
    return [float(stats[p][i]) for i in range(len(GLCM_DISTANCES)) for p in HARALICK]


def pixel_features(pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Intensity and texture features of each crop inside its cell mask (PIXEL_FEATURES order).

    Parameters
    ----------
    pixels : (n, S, S) ndarray of uint8
        The crops (per-crop normalised grey levels, 0-255).
    masks : (n, S, S) ndarray
        Non-zero inside the crop's cell (the connected component at the centre). An empty mask
        is replaced by a disc of radius 8 px at the centre.

    Returns
    -------
    (n, len(PIXEL_FEATURES)) ndarray of float32
        Intensities in grey levels; gradient in grey levels per pixel (Sobel, 3x3); Laplacian
        variance in grey levels squared; Haralick statistics dimensionless. Always finite.

    Raises
    ------
    ValueError
        If pixels and masks differ in shape or are not (n, S, S).
    """
    pixels, masks = np.asarray(pixels), np.asarray(masks)
    if pixels.ndim == 4 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if pixels.ndim != 3 or pixels.shape != masks.shape:
        raise ValueError(f"pixels {pixels.shape} and masks {masks.shape} must both be (n, S, S)")
    out = np.zeros((len(pixels), len(PIXEL_FEATURES)), np.float32)
    disc = _centre_disc(pixels.shape[1]) if len(pixels) else None
    for i, (crop, mask) in enumerate(zip(pixels.astype(np.uint8), masks, strict=False)):
        inside = mask > 0
        if not inside.any():
            inside = disc
        values = crop[inside].astype(np.float64)
        outside = crop[~inside]
        p05, p25, p50, p75, p95 = np.percentile(values, [5, 25, 50, 75, 95])
        background = float(outside.mean()) if outside.size else float(values.mean())
        f = crop.astype(np.float64)  # float64 throughout: float32 SIMD paths made last digits vary between calls
        gradient = np.hypot(cv2.Sobel(f, cv2.CV_64F, 1, 0, ksize=3), cv2.Sobel(f, cv2.CV_64F, 0, 1, ksize=3))[inside]
        laplacian = cv2.Laplacian(f, cv2.CV_64F, ksize=3)[inside]
        out[i] = [
            values.mean(),
            values.std(),
            p50,
            p25,
            p75,
            p05,
            p95,
            background,
            gradient.mean(),
            gradient.std(),
            laplacian.var(),
            *_haralick(crop, inside),
        ]
    return out


def handcrafted_features(measurements: pd.DataFrame, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The hand-crafted baseline: AreaShape measurements beside pixel_features (HANDCRAFTED_FEATURES order).

    Parameters
    ----------
    measurements : DataFrame, n rows
        The crops' schema.MEASUREMENT_COLUMNS (area and lengths in pixels, ratios unitless), in
        the order of pixels. A missing value (NaN: a cell CellProfiler did not measure) takes its
        column's median over these crops (0 when the whole column is missing).
    pixels, masks : (n, S, S) ndarrays
        As pixel_features.

    Returns
    -------
    (n, len(HANDCRAFTED_FEATURES)) ndarray of float32, finite.

    Raises
    ------
    ValueError
        If measurements lacks a MEASUREMENT_COLUMNS column, or its length differs from pixels'.
    """
    missing = [c for c in MEASUREMENT_COLUMNS if c not in measurements]
    if missing:
        raise ValueError(f"measurements lack columns {missing}")
    if len(measurements) != len(pixels):
        raise ValueError(f"{len(measurements)} measurement rows for {len(pixels)} crops")
    shape = measurements[list(MEASUREMENT_COLUMNS)].astype(np.float64)
    shape = shape.fillna(shape.median()).fillna(0.0).to_numpy(np.float32)
    return np.hstack([shape, pixel_features(pixels, masks)])


def handcrafted_features_for(
    crops_dir: str | Path, crop_ids: pd.Series, pixels: np.ndarray | None = None
) -> np.ndarray:
    """handcrafted_features of the given crops of a crops dataset, in crop_ids order.

    Reads the crops' measurements, pixels and masks (only the rows asked for). pixels: the
    crops' (n, S, S) uint8 pixels in crop_ids order when the caller has already read them
    (read_crops(crops_dir, crop_ids)); they are then not read again. Raises KeyError naming
    crop ids that are not in the dataset, ValueError when pixels has another number of crops.
    """
    from gbm_assets.analysis.cell_types import read_measurements
    from gbm_assets.imaging.crop_dataset import read_crops

    measurements = read_measurements(crops_dir, crop_ids)
    for column in MEASUREMENT_COLUMNS:
        if column not in measurements:
            measurements[column] = np.nan
    if pixels is None:
        pixels = read_crops(crops_dir, crop_ids)
    elif len(pixels) != len(crop_ids):
        raise ValueError(f"{crops_dir}: {len(pixels)} crops of pixels given for {len(crop_ids)} crop ids")
    return handcrafted_features(measurements, pixels, read_crops(crops_dir, crop_ids, column="mask"))
