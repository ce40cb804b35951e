"""The typical cell diameter of a plate, found from its images.

Cell finding measures everything in cell diameters, and the right diameter differs several-fold
between microscopes, objectives, binning and cell lines (about 30-55 px for the synthetic plates,
55-75 px for the Usiigaci and T98G frames at 10x with 2x2 binning, 80 px or more at 20x). A
first pass of cell finding at the default scale finds cells and pieces of cells whatever their
true size, and the median equivalent diameter of what it finds tracks the true diameter: over
the 24 hand-annotated Usiigaci fields, the 6 T98G frames and synthetic fields drawn at 0.7x,
1x and 1.6x it was 1.2 times the annotated mean diameter (our objects include the halo ring),
with a spread of about 15% between fields. Iterating (re-finding at the estimate) does not
converge: larger scales merge neighbours and the estimate runs away, so one pass it is.

That holds at the magnification the default scale was chosen on. At another one the first pass
finds pieces or merged neighbours whose size is set by its own scale (58 px for cells of 130 px at
twice the magnification), so the set-up's magnification is measured first, from the scale of the
image's fine structure (see magnification), and where it is far from the reference the first pass
and the default scale are multiplied by it. Cell finding then runs at that scale (41 px at the
reference magnification) moved just enough to lie within SCALE_RANGE of the estimate. The
segmentation's length scale is that of a cell's dark body and seeds rather than of its whole outline with halo and protrusions, so the best scale hardly follows the outline:
on the 24 hand-annotated Usiigaci fields the per-field best scale was 45-50 px for cells of 40
px as for cells of 72 px, and T98G's 40-50 px (cells of 54-65 px), while the densest synthetic
fields (4,000 cells plated) lose recall above about 41 px (0.91 at 41, 0.90 at 42, 0.88 at 43).
41 px is the largest default that keeps synthetic precision and recall at 0.9 or more at every
density (Usiigaci precision 0.61 -> 0.64 and T98G F1 0.81 -> 0.82 against the former 40 px; 43
px would give Usiigaci 0.68). The estimate moves the scale only where cells are far from that:
above 1.4 diameters (a culture of mixed sizes, many small rounded cells among spread ones, pulls
the median down, and finding it at that median lost recall) or below 0.6 diameters (20x, 40x,
other binning: cells cut in pieces).

Inside the band a reading over magnification.CHECKED_ABOVE may be magnification or blur; the
first pass then runs again at the multiplied scale, kept when the cells found there confirm it
(confirms_magnification: x1.5 Usiigaci fields reading 1.38-1.48 were found at 41 px, precision
0.38-0.45 on cells of 95-109 px; with the check 4 of those 5 at about 60 px, set9 at 41).

Above the magnification band a field holds fewer, larger cells, and more of them are cut by its
edge (about 2 in 3 on 696 x 520 tiles at twice the magnification, 1 in 5 on the reference fields,
whose share is in the 1.2 above): their pieces read as small cells, and so do pieces of cells that
a small field's own quality rules let pass. There the estimate is edge-corrected
(edge_corrected, estimate_from_diameters with whole_cell_weights): pieces under 0.4 of the
plate's typical cell are left out, and the cells seen whole are weighted as in the
Miles-Lantuejoul correction. On U373-like plates (benchmarks/microscopes.py --fields 8: Usiigaci
fields at x2 cut into 696 x 520 8-bit tiles, a plate per field) 0.77x the annotated diameter
(4 of 8 within 25%) -> 0.87x (7 of 8), T98G 0.94x -> 0.99x.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from gbm_assets.imaging import magnification
from gbm_assets.imaging.cell_quality import FOUND_PER_TRUE_DIAMETER, MIN_CELLS, MIN_TYPICAL, QualityRules
from gbm_assets.imaging.segmentation import SegmentationParams, find_candidates

SCALE_RANGE = (0.6, 1.4)  # segmentation scales that find cells of a diameter well, in diameters
MIN_DIAMETER_PX, MAX_DIAMETER_PX = 8.0, 400.0
# the edge-corrected median of the cells seen whole (estimate_from_diameters with weights) over the
# annotated mean diameter: measured as FOUND_PER_TRUE_DIAMETER was (the median of all, cut cells
# included, 1.2), on the 24 Usiigaci and 6 T98G fields it reads 1.035x that median (median 1.243)
WHOLE_FOUND_PER_TRUE_DIAMETER = 1.24
# The default scale over the cells it was chosen on: 41 px over the mean annotated diameter of the
# 24 Usiigaci and 6 T98G fields (60.2 px). A magnification read inside the band (checked) is
# confirmed when the cells found at the multiplied scale are at least this large against it.
REFERENCE_SCALE_PER_DIAMETER = 0.68


@dataclass(frozen=True)
class CellSizeEstimate:
    """diameter_px: typical whole-cell diameter (equivalent diameter, px), None without an
    estimate; n_cells and n_images: what the first pass saw; reason: why there is no estimate."""

    diameter_px: float | None
    n_cells: int
    n_images: int
    reason: str = ""
    magnification: float | None = None  # relative to the reference set-up (see magnification); None: not measured
    fine_scales: tuple[tuple[str, float], ...] = ()  # (image, magnification.fine_scale px, nan: none) measured
    n_whole: int | None = None  # cells seen whole that an edge-corrected estimate used; None: not edge-corrected
    confirmed: bool = False  # a magnification inside the band, confirmed by the cells (confirms_magnification)

    def note(self) -> str:
        """One line for logs and metadata."""
        if self.magnification is None:
            seen = ""
        elif self.confirmed:
            seen = (
                f"; magnification {self.magnification}x the reference set-up's, inside the band but confirmed by "
                "the cells found at the multiplied scale (scale multiplied by it)"
            )
        elif not magnification.rescales(self.magnification):
            seen = f"; magnification {self.magnification}x the reference set-up's (default scale kept)"
        else:
            seen = f"; magnification {self.magnification}x the reference set-up's (scale multiplied by it)"
        if self.diameter_px is None:
            return f"cell diameter not estimated ({self.reason}); the default scale is used{seen}"
        whole = f" (edge-corrected: the {self.n_whole} seen whole)" if self.n_whole is not None else ""
        return (
            f"estimated cell diameter {self.diameter_px} px from {self.n_cells} cells in {self.n_images} images"
            f"{whole}{seen}"
        )

    def params(self, params: SegmentationParams) -> SegmentationParams:
        """params magnified as self.magnification calls for (magnification.magnified; multiplied by
        it inside the band when confirmed), then with
        their scale moved into SCALE_RANGE of this diameter (without one, just magnified)."""
        if self.confirmed and self.magnification is not None:
            params = magnification.multiplied(params, self.magnification)
        else:
            params = magnification.magnified(params, self.magnification)
        if self.diameter_px is None:
            return params
        low, high = (f * self.diameter_px for f in SCALE_RANGE)
        return replace(params, cell_diameter_px=round(float(np.clip(params.cell_diameter_px, low, high)), 1))


def first_pass_diameters(image: np.ndarray, params: SegmentationParams = SegmentationParams()) -> np.ndarray:
    """float64 (n,) equivalent diameters (px) of the cells a first pass finds in one 2-D image.

    The first pass runs at params' scale (default 41 px); only candidates labelled "cell" by
    the quality rules count. Raises ValueError when the image is not 2-D.
    """
    return first_pass(image, params)[0]


def first_pass(image: np.ndarray, params: SegmentationParams = SegmentationParams()) -> tuple[np.ndarray, np.ndarray]:
    """(first_pass_diameters, their whole_cell_weights) of one 2-D image, from one pass of cell
    finding. Raises ValueError when the image is not 2-D."""
    candidates, labels, _ = find_candidates(image, params)
    return cell_diameters(candidates, params.cell_diameter_px), whole_cell_weights(candidates, labels)


def cell_diameters(candidates: pd.DataFrame, cell_diameter_px: float) -> np.ndarray:
    """float64 (n,) equivalent diameters (px) of the candidates labelled "cell".

    Of their whole objects (halo rim included: the areas FOUND_PER_TRUE_DIAMETER was measured
    on), not of the reported outline: the object area is qc_area_ratio (cell areas, pi d^2 / 4
    at cell_diameter_px, the scale the candidates were found at) times that, a whole number of
    pixels.
    """
    cells = candidates[candidates["qc"] == "cell"]
    area = np.rint(cells["qc_area_ratio"].to_numpy(np.float64) * (np.pi * cell_diameter_px**2 / 4))
    return 2 * np.sqrt(area / np.pi)


def whole_cell_weights(candidates: pd.DataFrame, labels: np.ndarray) -> np.ndarray:
    """float64 (n,) edge-correction weights of the candidates labelled "cell" (cell_diameters' order).

    A field sees a cell whole only when the cell lies inside it, and a large cell is more often
    cut by the field's edge than a small one, so the cells seen whole under-represent the large
    ones (minus-sampling). The Miles-Lantuejoul correction (Miles R.E. 1978, "The sampling, by
    quadrats, of planar aggregates", J Microsc 113:257-267; see Baddeley A. & Vedel Jensen E.B.
    "Stereology for Statisticians", Chapman & Hall/CRC 2005) weights each whole object by the
    inverse of the chance that an object of its bounding box, placed at random, lies inside the
    field: H W / ((H - h - 1)(W - w - 1)) for an h x w box in an H x W image (not touching the
    border: one pixel left on each side). A candidate whose object touches the image's border (cut), or whose
    label has no pixel in labels, gets 0. labels: int (H, W) instance labels of the candidates
    (find_candidates' labels, the whole objects), 0 = background.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    ids = candidates.loc[candidates["qc"] == "cell", "cell_id"].to_numpy(np.int64)
    weights = np.zeros(len(ids))
    if len(ids) == 0:
        return weights
    n = int(max(labels.max(initial=0), ids.max())) + 1
    cut = np.zeros(n, bool)
    cut[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).astype(np.int64)] = True
    boxes = ndi.find_objects(labels)
    for k, label in enumerate(ids):
        box = boxes[label - 1] if 0 < label <= len(boxes) else None
        if box is None or cut[label]:
            continue
        bh, bw = (s.stop - s.start for s in box)
        weights[k] = h * w / max((h - bh - 1) * (w - bw - 1), 1)
    return weights


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The median of values (float (n,), n >= 1) under positive weights (same shape): the value
    where the cumulated weight, in increasing order of value, reaches half the total (the mean of
    that value and the next when it reaches it exactly, so that equal weights give np.median)."""
    order = np.argsort(values, kind="stable")
    values, cum = np.asarray(values, np.float64)[order], np.cumsum(np.asarray(weights, np.float64)[order])
    k = int(np.searchsorted(cum, cum[-1] / 2))
    if k + 1 < len(values) and cum[k] == cum[-1] / 2:
        return float(values[k] + values[k + 1]) / 2
    return float(values[k])


def estimate_from_diameters(
    diameters: Iterable[np.ndarray], weights: Iterable[np.ndarray] | None = None
) -> CellSizeEstimate:
    """The plate's diameter from first_pass_diameters of some of its images (see module doc).

    Without weights: the median of all of them over FOUND_PER_TRUE_DIAMETER. With weights
    (whole_cell_weights of the same images, arrays of the same lengths), the cells of a field too
    small for its cells are read as a field of the plate's own size would show them:
    - pieces: a cell smaller than min_typical_area_scale (0.4) of the plate's typical cell (the
      median of all, as above) is left out. Each image's quality rules drop these against the
      image's own typical cell, which a small field (a few cells, most cut by its edge) reads
      too small, so pieces of cells and debris pass there;
    - cut cells: of the rest, the edge-corrected median of the cells seen whole (weighted median
      under their weights, see whole_cell_weights) over WHOLE_FOUND_PER_TRUE_DIAMETER, when at
      least MIN_TYPICAL are; else the median of all, as without weights.
    Returns diameter_px None (with the reason) when fewer than MIN_CELLS cells were found; n_whole
    the cells the edge-corrected median used (None when it was not). Raises ValueError when
    weights do not match diameters in length.
    """
    per_image = [np.asarray(d, np.float64) for d in diameters]
    pooled = np.concatenate(per_image) if per_image else np.zeros(0)
    if len(pooled) < MIN_CELLS:
        return CellSizeEstimate(
            None, len(pooled), len(per_image), f"only {len(pooled)} cells in a first pass (need {MIN_CELLS})"
        )
    typical, per_true, n_whole = float(np.median(pooled)), FOUND_PER_TRUE_DIAMETER, None
    if weights is not None:
        weight = np.concatenate([np.asarray(w, np.float64) for w in weights] or [np.zeros(0)])
        if weight.shape != pooled.shape:
            raise ValueError(f"{len(weight)} weights for {len(pooled)} diameters")
        least = np.sqrt(QualityRules().min_typical_area_scale) * typical / FOUND_PER_TRUE_DIAMETER
        whole = (weight > 0) & (pooled >= least)
        if np.count_nonzero(whole) >= MIN_TYPICAL:
            typical, per_true = weighted_median(pooled[whole], weight[whole]), WHOLE_FOUND_PER_TRUE_DIAMETER
            n_whole = int(np.count_nonzero(whole))
    diameter = float(np.clip(typical / per_true, MIN_DIAMETER_PX, MAX_DIAMETER_PX))
    return CellSizeEstimate(round(diameter, 1), len(pooled), len(per_image), n_whole=n_whole)


def confirms_magnification(scale_px: float, estimate: CellSizeEstimate) -> bool:
    """True when a first pass at a scale multiplied by a magnification read inside the band
    (magnification.checked) found cells large enough to confirm it.

    scale_px: the multiplied scale (px); estimate: estimate_from_diameters of that pass. The fine
    scale reads blur as well as magnification, so inside the band it alone does not decide: the
    multiplied scale is kept when it is at most REFERENCE_SCALE_PER_DIAMETER of the diameter the
    cells found at it show, as the default scale is of the cells it was chosen on. Cells of the
    reference size, blurred, found at a larger scale read about as large as it (0.76-1.13x it on
    hard synthetic plates reading 1.09-1.41); cells truly magnified read about twice it. At the
    default scale a field at 1.5x shows no such thing: its cells are cut into pieces the size of
    the scale (0.53-0.59x the multiplied scale read at 41 px). Without an estimate, False.
    """
    return estimate.diameter_px is not None and scale_px <= REFERENCE_SCALE_PER_DIAMETER * estimate.diameter_px


def edge_corrected(relative_magnification: float | None) -> bool:
    """True when a plate's size estimate is edge-corrected (estimate_from_diameters with
    whole_cell_weights): above magnification.MAGNIFICATION_BAND, where the first pass runs at a
    multiplied scale. At the reference set-up the median of all the first pass's cells, cut ones
    included, is what FOUND_PER_TRUE_DIAMETER was measured on, so the share of cut cells its
    fields show is in that calibration; at m times the magnification a field of the same pixels
    holds m^2 fewer cells, each m times larger against the field, and more of them are cut (about
    2 in 3 on the U373-like tiles, 696 x 520 at twice the magnification, against 1 in 5 on the
    reference fields). Below the band fewer are cut than in the calibration, not more.
    """
    return relative_magnification is not None and relative_magnification > magnification.MAGNIFICATION_BAND[1]


def estimate_cell_diameter(
    images: Iterable[np.ndarray], params: SegmentationParams = SegmentationParams()
) -> CellSizeEstimate:
    """Typical whole-cell diameter (px) of a set of 2-D images of one plate.

    As a plate's ingest does it: the set-up's magnification from up to magnification.IMAGES of
    the images (spread over the list), then one pass over every image at params magnified by it,
    edge-corrected where the magnification calls for it (edge_corrected); a magnification inside
    the band but checked (magnification.checked), with enough cells found for an estimate, runs
    that pass again at the multiplied scale, kept when confirms_magnification. Raises ValueError when
    an image is not 2-D.
    """
    images = list(images)
    probes = sample_images(list(range(len(images))), magnification.IMAGES)
    ratio = magnification.relative_magnification(magnification.fine_scale(images[i]) for i in probes)
    params = magnification.magnified(params, ratio)
    passes = [first_pass(image, params) for image in images]
    confirmed = False
    seen = estimate_from_diameters([d for d, _ in passes]).diameter_px is not None
    if seen and magnification.checked(ratio):  # inside the band, far from 1: the cells at the multiplied scale decide
        at = magnification.multiplied(params, ratio)
        again = [first_pass(image, at) for image in images]
        if confirms_magnification(at.cell_diameter_px, estimate_from_diameters([d for d, _ in again])):
            passes, confirmed = again, True
    found = estimate_from_diameters([d for d, _ in passes], [w for _, w in passes] if edge_corrected(ratio) else None)
    return replace(found, magnification=ratio, confirmed=confirmed)


def sample_images(names: list[str], k: int = 8) -> list[str]:
    """Up to k names spread evenly over the list (first and last included), in list order."""
    if len(names) <= k:
        return list(names)
    picks = np.unique(np.rint(np.linspace(0, len(names) - 1, k)).astype(int))
    return [names[i] for i in picks]
