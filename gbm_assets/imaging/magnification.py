"""How magnified a set-up is, from the finest structure its phase-contrast images show.

The first pass of the size estimate (cell_size) runs at a fixed scale, and what it finds has a
size set by that scale as much as by the cells: at twice the magnification it cuts every cell
into pieces of the same size in pixels as before, and at half it merges neighbours, so its
estimate hardly moves when the pixel size changes (benchmarks/microscopes.py: 58 px for cells
of 130 px). Something that does not depend on the scale of cell finding has to come first.

The fine structure of a phase-contrast culture (halos, granules, the outline's ripples) has a
characteristic scale: the sigma at which the scale-normalised Laplacian of Gaussian of the
cells (sigma^2 |LoG|, Lindeberg T. "Feature detection with automatic scale selection", Int J
Comput Vision 30:79-116, 1998) has the most energy. It is a property of the optics and the pixel
size, not of the cell line: 3.0-3.6 px on all 30 Usiigaci and T98G fields (cells of 40 to 72 px,
10x, 2x2 binning) and on the synthetic plates, and it follows a rescaled field to within about
10% between 0.5x and 2x. Its ratio to that reference is the set-up's magnification relative to
the one cell finding's default scale was chosen on; where it is far from 1, the default scale
is multiplied by it before the first pass. Blur widens the fine structure too, so a reading
inside the band but over CHECKED_ABOVE is checked against the cells found at the multiplied scale
(checked; cell_size.confirms_magnification) before the scale follows it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import cv2
import numpy as np

from gbm_assets.imaging.segmentation import SegmentationParams, foreground, normalise, texture

REFERENCE_FINE_SCALE_PX = 3.2  # median fine scale of the Usiigaci and T98G fields (10x, 2x2 binning)
MAGNIFICATION_BAND = (0.7, 1.5)  # relative magnifications within which the default scale stays
SIGMAS_PX = 2.0 ** np.arange(0.0, 4.01, 0.25)  # 1-16 px: about 0.3x-5x the reference
MIN_FOREGROUND = 0.005  # less of the field textured than this: no cells to measure
IMAGES = 3  # images of a plate whose fine scale is measured (their median is the plate's)
# Smaller images give no fine scale: on T98G tiles 18% of 64-px, 5% of 128-px and 1% of 192-px
# ones read outside MAGNIFICATION_BAND (up to 4.5x), none of 256 px (2.7-3.6 px, like whole fields).
MIN_SIDE_PX = 256
# Readings inside the band but above this are checked against the cells themselves (see
# checked and cell_size.confirms_magnification): further from 1 than any reference field (0.91-1.09
# per field) or easy synthetic plate (at most 1.125) reads, but the fine scale reads blur as well
# as magnification (the hard generator's widest halo and defocus read up to 1.39 for cells of the
# reference size), and a real field at 1.5x reads 1.38-1.60 (benchmarks/microscopes.py).
CHECKED_ABOVE = 1.2


def fine_scale(image: np.ndarray) -> float:
    """The characteristic scale (px, a Gaussian sigma) of the cells' fine structure in one image.

    image: 2-D array of any real dtype. The image is flattened and scaled as cell finding does
    (segmentation.normalise at the default parameters), its textured foreground found
    (segmentation.foreground), and sigma^2 |LoG| averaged over the foreground at sigmas of 1-16 px
    (quarter-octave steps, on a copy downsampled to about sigma / 2 per pixel); the curve is
    smoothed over log sigma and its highest local maximum located to a fraction of a step.
    Returns nan when the image is under MIN_SIDE_PX on a side, under MIN_FOREGROUND of the field
    is textured or the curve has no maximum inside the range. Raises ValueError when the image
    is not 2-D.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D single-channel image, got shape {image.shape}")
    if min(image.shape) < MIN_SIDE_PX:
        return float("nan")
    params = SegmentationParams()
    norm = normalise(image, params)
    mask = foreground(texture(norm, params), params)
    if np.count_nonzero(mask) < MIN_FOREGROUND * mask.size:
        return float("nan")
    energy = np.zeros(len(SIGMAS_PX))
    for i, sigma in enumerate(SIGMAS_PX):
        factor = max(1, int(sigma // 2))
        part, where = norm, mask
        if factor > 1:
            part = cv2.resize(norm, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
            where = cv2.resize(mask, part.shape[::-1], interpolation=cv2.INTER_NEAREST)
        if not where.any():
            return float("nan")
        log = cv2.Laplacian(cv2.GaussianBlur(part, (0, 0), sigma / factor), cv2.CV_32F, ksize=3)
        energy[i] = cv2.mean(cv2.absdiff(log, 0), mask=where)[0] * (sigma / factor) ** 2
    kernel = np.exp(-0.5 * np.arange(-2, 3) ** 2)  # a quarter octave: the pyramid leaves small dents
    smooth = np.convolve(np.pad(energy, 2, mode="edge"), kernel / kernel.sum(), mode="valid")
    peaks = [i for i in range(1, len(smooth) - 1) if smooth[i - 1] <= smooth[i] >= smooth[i + 1]]
    if not peaks:
        return float("nan")
    i = max(peaks, key=lambda k: smooth[k])
    a, b, c = smooth[i - 1 : i + 2]
    offset = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c else 0.0
    return float(SIGMAS_PX[0] * 2.0 ** (0.25 * (i + offset)))


def relative_magnification(fine_scales: Iterable[float]) -> float | None:
    """The median of some images' fine_scale over REFERENCE_FINE_SCALE_PX (None when none is finite)."""
    finite = [s for s in fine_scales if np.isfinite(s)]
    return round(float(np.median(finite)) / REFERENCE_FINE_SCALE_PX, 3) if finite else None


def rescales(magnification: float | None) -> bool:
    """True when a plate of this relative magnification is searched at a multiplied scale: outside
    MAGNIFICATION_BAND (False inside it, or for None: not measured)."""
    return magnification is not None and not MAGNIFICATION_BAND[0] <= magnification <= MAGNIFICATION_BAND[1]


def checked(magnification: float | None) -> bool:
    """True when a plate of this relative magnification, inside MAGNIFICATION_BAND, reads above
    CHECKED_ABOVE: its first pass is run again at the multiplied scale, which is kept when the
    cells found there confirm it (cell_size.confirms_magnification)."""
    return magnification is not None and CHECKED_ABOVE < magnification <= MAGNIFICATION_BAND[1]


def multiplied(params: SegmentationParams, magnification: float) -> SegmentationParams:
    """params with cell_diameter_px multiplied by magnification (rounded to 0.1 px)."""
    return replace(params, cell_diameter_px=round(params.cell_diameter_px * magnification, 1))


def magnified(params: SegmentationParams, magnification: float | None) -> SegmentationParams:
    """params with cell_diameter_px multiplied by magnification when it lies outside
    MAGNIFICATION_BAND (unchanged inside it, or for None)."""
    if not rescales(magnification):
        return params
    return multiplied(params, magnification)
