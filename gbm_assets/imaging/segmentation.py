"""Finding cells in phase-contrast images with OpenCV, and measuring their shape.

Phase contrast does not separate cells from the medium by brightness: cell bodies can be
darker or brighter than the medium and are ringed by bright halos. What does separate them:

- texture: the medium is flat, cells are not. A local standard deviation map thresholded with
  Otsu gives the cell mask, whatever the microscope or bit depth;
- darkness: a cell body (cytoplasm, granules around the nucleus) is darker than the medium on
  average, so each cell holds a blob in a smoothed darkness map. Blobs are the cell seeds;
- halos: the bright rims that phase contrast draws around every cell also run between
  touching cells. Two seeds joined by a dark path that crosses no halo belong to one cell.

Cells come in two kinds, so seeds are looked for at two scales. Spread, flat cells (the
usual adherent culture) are textured, grey and granular: their body only shows as a blob at
a coarse scale (a quarter of a cell diameter). Rounded or compact cells (freshly plated,
dividing, clumped) are solid dark discs that touch each other: they need a fine scale (a
tenth of a diameter) or a whole clump becomes one blob. A halo-enclosed body that is small,
roundish and solidly dark gets fine seeds, everything else coarse ones; a body that is a
chain of such discs is cut at its necks first, one compact body per disc. In a field of
spread cells the few compact bodies are organelles or debris, so fine seeds need compact
bodies to hold a share of the cell area. Rounded cells that phase contrast shows bright (no
dark blob) seed themselves as compact bright bodies where compact cells are, and anywhere as
bright objects of their own, split at their necks. In a crowded field (objects over a third of
it with under FEW_SEEDS dark seeds per cell area of them, measured against the whole image's
statistics, which are then partly the cells'; a medium share under half alone does not make a
field crowded: a small field that a few large cells fill shows their seeds) cells merge into a few
large objects: there bright bodies seed everywhere and are cut out as
objects of their own, a small roundish halo-ringed body gets fine seeds however dark, and seeds
are grouped across nothing brighter than halo_level, and only up to CROWDED_SEED_REACH diameters
apart. Where a crowded field's flat pixels show two modes (flat grey cell interiors left outside
the objects, and the medium), darkness is measured against the brighter mode, cell bodies are
the pixels darker than the level between the two (a body covering at most DISC_AREA_RATIO
inscribed discs is a round cell's), seeds are grouped across nothing brighter than that level,
cell centres are placed on the pixels dark against that medium, and a body no seed reached gets
one (seedless_body_seeds); where they show one mode, a body is what is darker than the medium
by CROWDED_BODY_LEVEL: seedless ones are seeded the same way, and discs are compact bodies too.

Seeds of one cell are grouped (no halo, no dimming and no waist between them; fine seeds
only within one compact body). Each object is then shared among its groups along the halos:
a halo-bounded body goes whole to the group whose seeds it holds, shared bodies and the rest
by nearest seed, and halo pixels join the nearest body. Objects outside the area limits are
dropped, and measure_cells computes CellProfiler's AreaShape measurements. All sizes are
fractions or multiples of cell_diameter_px.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from gbm_assets.imaging.cell_quality import (
    QualityRules,
    body_centres,
    centres_inside,
    dark_joined_map,
    dark_line_pieces,
    faint_seam_map,
    fragment_map,
    inner_depth,
    inscribed_radius,
    join_step,
    label_quality,
    labelled_pixels,
    merged_depth,
    pale_outliers,
    quality_measures,
    spread_typical_area,
    typical_cell_area,
    within_border_frame,
)
from gbm_assets.imaging.field_quality import field_quality
from gbm_assets.imaging.measurements import halo_rim_width, measure_objects
from gbm_assets.imaging.percentiles import percentiles
from gbm_assets.schema import MEASUREMENT_COLUMNS


@dataclass(frozen=True)
class SegmentationParams:
    """Cell-finding settings. Sizes are in cell diameters (d) or cell areas (pi d^2 / 4);
    intensities are in units of the image's robust spread ("spread") or of the background
    noise ("noise"), so the defaults carry over between microscopes and bit depths.
    Frozen, so the default instance shared by every call can never be changed."""

    cell_diameter_px: float = 41.0  # the length scale of cell finding, px (see cell_size for how it is chosen)
    background_scale: float = 2.0  # Gaussian sigma of the background (flat-field) estimate, d
    texture_scale: float = 0.2  # side of the local standard deviation window, d
    threshold_correction: float = 1.0  # multiplies the Otsu texture threshold (as in CellProfiler)
    closing_scale: float = 0.1  # radius closing gaps between textured patches, d
    opening_scale: float = 0.15  # radius opening away thin halos and fibres, d
    min_object_area_scale: float = 0.35  # smallest foreground object (else debris), cell areas
    min_object_thickness_scale: float = 0.2  # thinnest foreground object (else debris), d
    min_area_scale: float = 0.1  # smallest cell, cell areas
    max_area_scale: float = 12.0  # largest cell, cell areas
    declump: bool = True  # split touching cells
    coarse_seed_scale: float = 0.25  # darkness smoothing for spread cells, d
    fine_seed_scale: float = 0.1  # darkness smoothing for compact dark cells, d
    seed_spacing: float = 1.5  # closest seeds at one scale, in that scale's smoothing widths
    seed_darkness: float = 1.5  # least smoothed darkness of a seed, spread
    halo_level: float = 3.0  # brighter than this is halo, not body, noise
    dark_level: float = 5.0  # darker than this is solid body, noise
    solid_fraction: float = 0.7  # a body this dark throughout is compact: fine seeds
    compact_radius_scale: float = 0.3  # a compact body is at most this thick (inscribed radius), d
    compact_elongation: float = 4.0  # and at most this many inscribed discs in area (not a strip)
    min_compact_share: float = 0.01  # compact bodies count when they cover this share of objects
    merge_halo: float = 12.0  # a path crossing pixels this bright crosses a cell border, noise
    merge_darkness_ratio: float = 0.8  # a path dimming below this x the seeds' darkness leaves the cell
    max_body_scale: float = 3.0  # a halo-bounded body up to this big is one cell's, cell areas
    merge_neck_ratio: float = 0.8  # an outline narrower than this x its width at the seeds is a waist
    strip_scale: float = 0.5  # seeds on a dark path in a strip at most this half-wide (d) pair further: one long cell
    strip_length_scale: float = 3.0  # seeds in one strip are paired up to this far apart, d
    bright_level: float = 10.0  # bright-cell pixels, noise
    bright_radius_scale: float = 0.4  # thickest rounded bright cell (inscribed radius), d
    bright_area_scale: float = 0.1  # a seedless object with this much bright area is a cell, cell areas
    neck_ratio: float = 0.7  # bright cells: pieces joined by a neck this wide are one cell


def _disc(radius: float) -> np.ndarray:
    size = 2 * max(1, round(radius)) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _cell_area(params: SegmentationParams) -> float:
    return np.pi * params.cell_diameter_px**2 / 4


# ---- foreground ---------------------------------------------------------------------------


def normalise(image: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Background-flattened float32 image in units of its robust spread (IQR / 1.349)."""
    image = np.ascontiguousarray(image, np.float32)  # (not modified: no copy of a float32 image)
    sigma = params.background_scale * params.cell_diameter_px
    # Blurring a downsampled copy is as good for a smooth background and far faster.
    factor = max(1, int(sigma // 8))
    small = cv2.resize(image, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor, borderType=cv2.BORDER_REFLECT)
    flat = cv2.subtract(image, cv2.resize(small, image.shape[::-1], interpolation=cv2.INTER_LINEAR))
    centre, spread = robust_scale(flat[::4, ::4], floor=1e-4 * max(float(np.abs(small).max()), 1.0))
    if spread == 0:  # no structure above float rounding of the image level: a featureless image
        return np.zeros_like(flat)
    flat -= centre
    flat *= 1 / spread
    return flat


def robust_scale(values: np.ndarray, floor: float) -> tuple[float, float]:
    """Median and robust SD (IQR / 1.349) of values, for scaling an image to noise units.

    Where half or more of the values are equal (a flat, coarsely quantised or noiseless
    background) the IQR is about 0 and the SD stands in; a spread at or below floor is 0.
    """
    q25, q50, q75 = percentiles(values, (25, 50, 75))
    spread = float(q75 - q25) / 1.349
    if spread <= floor:
        spread = float(np.std(values))
    return float(q50), spread if spread > floor else 0.0


def texture(norm: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Local standard deviation over a window a fraction of a cell wide."""
    window = (max(3, round(params.texture_scale * params.cell_diameter_px) | 1),) * 2
    mean = cv2.blur(norm, window)
    square = cv2.multiply(norm, norm)
    variance = cv2.blur(square, window)
    # the same operations into buffers already made: a fresh image-sized array costs page faults
    cv2.multiply(mean, mean, dst=square)
    cv2.subtract(variance, square, dst=variance)
    cv2.max(variance, 0, dst=variance)
    return cv2.sqrt(variance, dst=variance)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on log values, where medium and cell texture are closer to normal."""
    logs = np.sort(np.log(values[::4, ::4] + 1e-3), axis=None)
    lo, hi = np.percentile(logs, (0.5, 99.5))  # (percentiles(), on the values sorted once for both)
    if hi - lo < 1e-6:  # a featureless image: nothing is textured
        return float("inf")
    hist, edges = sorted_histogram(logs, bins, lo, hi)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_lo = np.cumsum(hist)
    weight_hi = weight_lo[-1] - weight_lo
    sum_lo = np.cumsum(hist * centres)
    mean_lo = sum_lo / np.maximum(weight_lo, 1)
    mean_hi = (sum_lo[-1] - sum_lo) / np.maximum(weight_hi, 1)
    between = weight_lo * weight_hi * (mean_lo - mean_hi) ** 2
    return float(np.exp(centres[int(np.argmax(between[:-1]))]))


def sorted_histogram(ordered: np.ndarray, bins: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """np.histogram(ordered, bins, range=(lo, hi)) of values already sorted (1-D, ascending):
    the same counts (int64 (bins,)) and edges (bins + 1,), to the bit, from a binary search per
    edge instead of a pass over the values. A bin holds edge[i] <= v < edge[i + 1], the last
    one its right edge too, values outside the range none. Raises ValueError as np.histogram
    does for a range that is not finite or not increasing."""
    edges = np.histogram_bin_edges(ordered, bins=bins, range=(lo, hi))
    at = np.searchsorted(ordered, edges, side="left")
    at[-1] = np.searchsorted(ordered, edges[-1], side="right")
    return np.diff(at), edges


def fill_holes(mask: np.ndarray, max_hole_area: float) -> np.ndarray:
    """Fill holes up to max_hole_area; larger ones are medium enclosed by a ring of cells."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return mask
    holes = [
        c for c, h in zip(contours, hierarchy[0], strict=False) if h[3] >= 0 and cv2.contourArea(c) <= max_hole_area
    ]
    filled = mask.copy()
    cv2.drawContours(filled, holes, -1, 1, thickness=cv2.FILLED)
    return filled


def texture_threshold(tex: np.ndarray, params: SegmentationParams) -> float:
    """The foreground's texture threshold: Otsu's on tex, times threshold_correction."""
    return otsu_threshold(tex) * params.threshold_correction


def foreground(tex: np.ndarray, params: SegmentationParams, threshold: float | None = None) -> np.ndarray:
    """uint8 cell mask: textured, gap-closed, hole-filled, with thin halos and fibres opened away.

    threshold: the texture threshold (texture_threshold(tex, params) when None).
    """
    d = params.cell_diameter_px
    threshold = texture_threshold(tex, params) if threshold is None else threshold
    mask = (tex > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(params.closing_scale * d))
    mask = fill_holes(mask, max_hole_area=_cell_area(params))
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(params.opening_scale * d))


def objects(mask: np.ndarray, depth: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Connected foreground objects (int32 labels) big and thick enough to hold a cell.

    Debris and dish texture make small or thin textured specks; a cell is at least a fraction
    of a cell's area and somewhere a fraction of a diameter thick (depth: the mask's distance
    transform).
    """
    n, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    where = np.flatnonzero(mask.ravel() != 0)  # on a bool array: several times faster
    label = labels.ravel()[where]
    half_thickness = params.min_object_thickness_scale * params.cell_diameter_px / 2
    thick = np.zeros(n, bool)
    thick[label[depth.ravel()[where] >= half_thickness]] = True
    big = np.bincount(label, minlength=n) >= params.min_object_area_scale * _cell_area(params)
    keep = thick & big
    keep[0] = False
    out = np.zeros(labels.shape, np.int32)
    out.ravel()[where] = np.where(keep, np.arange(n, dtype=np.int32), 0)[label]
    return out


def medium_units(norm: np.ndarray, background: np.ndarray, crowded: bool) -> np.ndarray:
    """norm (float32 (H, W)), re-referenced to the medium (background, bool (H, W)) pixels in a
    crowded field.

    normalise() measures level and spread over the whole image. Where the medium is most of
    it (a field that is not crowded) those are the medium's, and norm is returned as is. Where
    cells cover most of the field (crowded, see crowded_field) they are the cells' own: the
    cells are then no darker than "the image" and no seed would pass seed_darkness, so level
    and spread are measured on the medium alone. With too little medium visible (under 100
    sampled pixels) norm is returned as is.
    """
    if not crowded:
        return norm
    values = norm[::4, ::4][background[::4, ::4]]
    if values.size < 100:
        return norm
    centre, spread = robust_scale(values, floor=1e-6)
    if spread <= 0:
        return norm
    return (norm - centre) * (1 / spread)


def confluent_split(norm: np.ndarray, tex: np.ndarray, threshold: float) -> float | None:
    """The level (norm's units) between cell interior and medium among a crowded field's flat
    pixels, or None where they show one mode.

    In a crowded field the flat pixels left outside the objects are not all medium: the flat
    grey interiors of large cells are flat too, and the "medium" is then a mix of cell interior
    and medium, no darker than the cells' bodies. The flat pixels (tex, the local SD, below the
    texture threshold) then fall into two modes of brightness (norm, float32 (H, W)): cell
    interior, darker, and medium, brighter (phase contrast shows cell bodies darker than the
    medium). Two modes: in their lightly smoothed 64-bin histogram, a second peak at least
    MODE_RATIO as high as the highest, with a valley below VALLEY_RATIO of it between the two;
    the level returned is the valley's.
    """
    low = tex[::4, ::4] < threshold
    values = norm[::4, ::4][low]
    if values.size < 100:
        return None
    lo, hi = percentiles(values, (0.5, 99.5))
    if hi - lo < 1e-6:
        return None
    hist = np.histogram(values, bins=64, range=(lo, hi))[0].astype(float)
    hist = np.convolve(hist, np.ones(3) / 3, mode="same")
    # the other mode: the highest bin with a valley below VALLEY_RATIO of it between it and
    # the highest bin (the lowest bin between the two is the valley)
    top = int(np.argmax(hist))
    best, best_height = None, 0.0
    for step in (-1, 1):
        side = hist[top + step :: step] if step > 0 or top > 0 else hist[:0]  # bins outward from the top
        if side.size < 2:
            continue
        between = np.minimum.accumulate(side)[:-1]  # the lowest bin between the top and each farther one
        ok = np.flatnonzero((between <= VALLEY_RATIO * side[1:]) & (side[1:] >= MODE_RATIO * hist[top])) + 1
        if ok.size and side[ok].max() > best_height:
            peak = int(ok[np.argmax(side[ok])])
            best_height = float(side[peak])
            best = top + step * (1 + int(np.argmin(side[:peak])))
    return None if best is None else float(lo + (best + 0.5) * (hi - lo) / 64)


def confluent_medium(norm: np.ndarray, tex: np.ndarray, threshold: float, split: float) -> np.ndarray:
    """bool (H, W): a crowded field's medium, its flat pixels (tex below threshold) brighter
    than split (confluent_split's level)."""
    return (tex < threshold) & (norm > split)


VALLEY_RATIO = 0.8
MODE_RATIO = 0.25
# a round cell's body covers at most this many of its inscribed discs (a star's or a spindle's more)
DISC_AREA_RATIO = 2.0


def confluent_units(norm: np.ndarray, medium: np.ndarray, split: float) -> tuple[np.ndarray, float]:
    """norm (float32 (H, W)) in noise units of a confluent field's medium (bool (H, W):
    confluent_medium's), and split (confluent_split's level, norm's units) in those units: the
    level above which a pixel is medium, not cell (float32 (H, W), float)."""
    smooth, centre, spread = _noise_units_scaled(norm, medium)
    return smooth, (split - centre) / spread


def noise_units(norm: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Lightly smoothed image in units of the background noise, measured off the cells."""
    return _noise_units_scaled(norm, background)[0]


def _noise_units_scaled(norm: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(noise_units(norm, background), its centre and its spread, at least 1e-6, in norm's units)."""
    smooth = cv2.GaussianBlur(norm, (0, 0), 1.0)
    centre, spread = noise_scale(smooth, background)
    spread = max(spread, 1e-6)
    smooth -= centre
    smooth *= 1 / spread
    return smooth, centre, spread


def noise_scale(smooth: np.ndarray, background: np.ndarray) -> tuple[float, float]:
    """noise_units' (centre, spread): the robust level and spread of smooth (float32 (H, W),
    norm lightly smoothed) over background (bool (H, W)), over the whole image when under 100
    of its pixels are sampled (a confluent field)."""
    values = smooth[::4, ::4][background[::4, ::4]]
    if values.size < 100:  # a confluent field: fall back to the whole image
        values = smooth[::4, ::4].ravel()
    return robust_scale(values, floor=1e-6)


# ---- seeds --------------------------------------------------------------------------------

# seeds up to this many cell diameters apart may be one cell's (group_seeds' near_scale; a crowded
# field uses CROWDED_SEED_REACH)
SEED_REACH = 1.5


def _components(mask: np.ndarray, connectivity: int) -> tuple[int, *tuple[np.ndarray, ...]]:
    """Connected components of a uint8 mask, with statistics from its pixels alone.

    Returns (n, labels, where, label_of_where, area, radius): where holds the flat indices of
    the mask's pixels; area (at least 1) and radius (of the largest inscribed disc) are per
    label. Counting only mask pixels is several times faster than OpenCV's full-image stats.
    """
    n, labels = cv2.connectedComponents(mask, connectivity=connectivity, ltype=cv2.CV_32S)
    where = np.flatnonzero(mask.ravel() != 0)  # on a bool array: several times faster
    label = labels.ravel()[where]
    area = np.maximum(np.bincount(label, minlength=n), 1)
    radius = np.zeros(n, np.float32)
    np.maximum.at(radius, label, cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_5).ravel()[where])
    return n, labels, where, label, area, radius


def _boxes(where: np.ndarray, label: np.ndarray, width: int) -> list[tuple[int, tuple[slice, slice]]]:
    """(label, bounding box) of each label among the pixels at flat indices where."""
    if len(label) == 0:
        return []
    order = np.argsort(label, kind="stable")
    label, (rows, cols) = label[order], np.divmod(where[order], width)
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    bounds = [f.reduceat(v, starts) for v in (rows, cols) for f in (np.minimum, np.maximum)]
    return [
        (int(label[s]), (slice(int(r0), int(r1) + 1), slice(int(c0), int(c1) + 1)))
        for s, r0, r1, c0, c1 in zip(starts, *bounds, strict=False)
    ]


def compact_bodies(z: np.ndarray, obj: np.ndarray, params: SegmentationParams, discs_only: bool = False) -> np.ndarray:
    """Labels (0 elsewhere) of compact cell bodies: halo-enclosed, small and solidly dark.

    Removing halo pixels from the objects leaves each cell's body; touching rounded cells
    stay separate bodies or join through narrow dark contacts, while a spread cell's body is
    large, grey and granular. Compact bodies get fine-scale seeds, the rest coarse ones.
    A few compact specks in a field of spread cells are organelles or debris on the cells,
    not cells: compact bodies count only when they hold a noticeable share of the cell area.
    A thin, dark body too long to be roundish is either a spindle or a chain of touching
    round cells: cut at its necks, the chain falls into discs, each its own compact body.
    discs_only: every body must be thick enough for a fine seed (inscribed radius at least
    fine_seed_scale d, as a chain's discs) and chains are not cut (the bodies darker than the medium
    of a crowded field whose flat pixels show one mode, see _seeds).
    """
    in_object = obj > 0
    core = (in_object & (z < params.halo_level)).astype(np.uint8)
    core = cv2.morphologyEx(core, cv2.MORPH_OPEN, _disc(1))
    n, bodies, where, body, area, radius = _components(core, connectivity=4)
    dark = np.bincount(body[z.ravel()[where] < -params.dark_level], minlength=n) / area
    small = radius < params.compact_radius_scale * params.cell_diameter_px
    roundish = area <= params.compact_elongation * np.pi * radius**2
    if discs_only:
        small &= radius >= params.fine_seed_scale * params.cell_diameter_px
    compact = (dark >= params.solid_fraction) & small & roundish
    compact[0] = False
    chains = (dark >= params.solid_fraction) & small & ~roundish & (not discs_only)
    chains[0] = False
    least = params.min_compact_share * np.count_nonzero(in_object)
    if area[compact].sum() + area[chains].sum() < least:  # too few even if every chain were discs
        return np.zeros(obj.shape, np.int32)
    out = np.zeros(bodies.shape, np.int32)
    out.ravel()[where] = np.where(compact, np.arange(n, dtype=np.int32), 0)[body]
    next_id = n
    in_chain = chains[body]
    for index, box in _boxes(where[in_chain], body[in_chain], core.shape[1]):
        inside = bodies[box] == index
        pieces = split_at_necks(inside, params)
        for piece in np.unique(pieces[inside]):
            disc = (inside & (pieces == piece)).astype(np.uint8)
            padded = cv2.copyMakeBorder(disc, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
            r = float(cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5).max())
            # a disc: thick enough for a fine seed and at most twice its inscribed circle
            if r >= params.fine_seed_scale * params.cell_diameter_px and disc.sum() <= 2 * np.pi * r**2:
                out[box][disc > 0] = next_id
                next_id += 1
    if np.count_nonzero(out) < least:
        return np.zeros(obj.shape, np.int32)
    return out


def seedless_body_seeds(
    z: np.ndarray, level: float, obj: np.ndarray, xy: np.ndarray, params: SegmentationParams
) -> np.ndarray:
    """Seeds (x, y), float (k, 2) px, for the bodies that hold none of the seeds xy (float (n, 2)
    px): the connected pixels of obj (int (H, W) labels) darker than level in z (float32 (H, W),
    noise units; a confluent field: confluent_units), lightly opened, at least
    min_object_area_scale cell areas and fine_seed_scale d thick; each seed at its body's
    deepest pixel (distance transform)."""
    core = cv2.morphologyEx(((obj > 0) & (z < level)).astype(np.uint8), cv2.MORPH_OPEN, _disc(1))
    n, bodies, where, body, area, radius = _components(core, connectivity=4)
    held = np.zeros(n, bool)
    held[bodies[xy[:, 1].astype(int), xy[:, 0].astype(int)]] = True
    d = params.cell_diameter_px
    want = ~held & (area >= params.min_object_area_scale * _cell_area(params)) & (radius >= params.fine_seed_scale * d)
    want[0] = False
    if not want.any():
        return np.zeros((0, 2))
    # each wanted body's deepest pixel, the first in raster order (radius is the same transform's maximum)
    depth = cv2.distanceTransform(core, cv2.DIST_L2, cv2.DIST_MASK_5).ravel()[where]
    top = want[body] & (depth >= radius[body])
    first = np.unique(body[top], return_index=True)[1]
    rows, cols = np.divmod(where[top][first], core.shape[1])
    return np.stack([cols, rows], 1).astype(float)


def bright_bodies(z: np.ndarray, obj: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """int32 (H, W) labels (0 elsewhere) of compact bright bodies: rounded cells, which phase
    contrast shows bright.

    A bright body is a hole-filled region of obj brighter than bright_level (z: noise units),
    thick enough not to be a halo line (inscribed radius at least fine_seed_scale d), thinner than
    bright_radius_scale d and as roundish as a compact dark body.
    """
    d = params.cell_diameter_px
    bright = fill_holes(((obj > 0) & (z > params.bright_level)).astype(np.uint8), 0.1 * _cell_area(params))
    n, labels, where, body, area, radius = _components(bright, connectivity=8)
    keep = (radius >= params.fine_seed_scale * d) & (radius < params.bright_radius_scale * d)
    keep &= area <= params.compact_elongation * np.pi * radius**2
    keep[0] = False
    out = np.zeros(labels.shape, np.int32)
    out.ravel()[where] = np.where(keep, np.arange(n, dtype=np.int32), 0)[body]
    return out


def bright_seeds(
    z: np.ndarray, obj: np.ndarray, params: SegmentationParams, bodies: np.ndarray | None = None
) -> np.ndarray:
    """Centres (x, y), float (k, 2) px, of the compact bright bodies whose centre lies in obj
    (bodies: bright_bodies(z, obj, params), computed when None)."""
    bodies = bright_bodies(z, obj, params) if bodies is None else bodies
    where = np.flatnonzero(bodies.ravel() != 0)
    body = bodies.ravel()[where]
    n = int(body.max(initial=0)) + 1
    rows, cols = np.divmod(where, bodies.shape[1])
    area = np.bincount(body, minlength=n)
    keep = area > 0
    sums = np.stack([np.bincount(body, cols, n), np.bincount(body, rows, n)], 1)
    centres = np.rint(sums[keep] / area[keep, None])
    return centres[obj[centres[:, 1].astype(int), centres[:, 0].astype(int)] > 0]


def with_bright_bodies(obj: np.ndarray, bodies: np.ndarray) -> np.ndarray:
    """obj (int32 (H, W) object labels) with each bright body of bodies (bright_bodies' labels)
    inside it made an object of its own, numbered after obj's labels.

    For a crowded field, whose cells merge into a few large objects: a rounded bright cell is
    then its bright disc, not the share of a large object nearest its seed (whose dark parts,
    a neighbour's, would set its centre), and no seed outside it is grouped with one inside.
    """
    inside = (bodies > 0) & (obj > 0)
    return np.where(inside, bodies + np.int32(obj.max(initial=0)), obj).astype(np.int32)


@dataclass
class _BlobMap:
    """A smoothed darkness map kept at reduced resolution (factor) with its peaks (x, y)."""

    smooth: np.ndarray
    factor: int
    xy: np.ndarray

    def sample(self, xy: np.ndarray) -> np.ndarray:
        h, w = self.smooth.shape
        cols = np.clip((xy[..., 0] / self.factor).astype(int), 0, w - 1)
        rows = np.clip((xy[..., 1] / self.factor).astype(int), 0, h - 1)
        return self.smooth[rows, cols]


def blob_map(darkness: np.ndarray, sigma: float, params: SegmentationParams) -> _BlobMap:
    """Darkness smoothed at sigma and its local maxima at least seed_spacing * sigma apart.

    Work happens on a copy downsampled to about sigma / 2 per pixel: the smoothed map has
    nothing finer, and a 1024 x 1024 image costs a few milliseconds.
    """
    factor = max(1, int(sigma // 2))
    small = darkness
    if factor > 1:
        small = cv2.resize(darkness, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
    smooth = cv2.GaussianBlur(small, (0, 0), sigma / factor)
    peaks = (smooth >= cv2.dilate(smooth, _disc(params.seed_spacing * sigma / factor))) & (
        smooth > params.seed_darkness
    )
    return _BlobMap(smooth, factor, component_centroids(peaks) * factor + (factor - 1) / 2)


def component_centroids(mask: np.ndarray) -> np.ndarray:
    """Centroids (x, y; float64 (k, 2), px) of the 8-connected components of mask (bool (H, W)),
    in label order: the same values to the bit as cv2.connectedComponentsWithStats' centroids[1:]
    (integer coordinate sums over pixel counts), from the mask's pixels alone, about 3x faster
    on a sparse mask (blob_map's peaks) than OpenCV's full-image statistics. Raises TypeError
    for a mask that is not bool (a wider dtype viewed as bytes would give other components)."""
    if mask.dtype != bool:
        raise TypeError(f"component_centroids takes a bool mask, not {mask.dtype}")
    n, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    where = np.flatnonzero(mask.ravel())
    label = labels.ravel()[where]
    rows, cols = np.divmod(where, mask.shape[1])
    count = np.bincount(label, minlength=n)[1:]
    return np.stack([np.bincount(label, cols, n)[1:] / count, np.bincount(label, rows, n)[1:] / count], 1)


def dark_seeds(
    norm: np.ndarray, obj: np.ndarray, compact: np.ndarray, params: SegmentationParams
) -> tuple[np.ndarray, np.ndarray, list[_BlobMap]]:
    """Seed points (x, y), the scale each was found at (0 fine, 1 coarse) and both maps.

    Fine seeds count only inside compact bodies, coarse seeds only outside them.
    """
    darkness = np.minimum(norm, 0)
    np.negative(darkness, out=darkness)  # (in place: one image pass and allocation less)
    d = params.cell_diameter_px
    maps = [blob_map(darkness, scale * d, params) for scale in (params.fine_seed_scale, params.coarse_seed_scale)]
    h, w = obj.shape
    points, scales = [], []
    for scale, blobs in enumerate(maps):
        cols = np.clip(np.rint(blobs.xy[:, 0]).astype(int), 0, w - 1)
        rows = np.clip(np.rint(blobs.xy[:, 1]).astype(int), 0, h - 1)
        keep = (obj[rows, cols] > 0) & ((compact[rows, cols] > 0) == (scale == 0))
        points.append(np.stack([cols[keep], rows[keep]], 1))
        scales.append(np.full(int(keep.sum()), scale))
    return np.concatenate(points).astype(float), np.concatenate(scales), maps


def group_seeds(
    xy: np.ndarray,
    scale: np.ndarray,
    maps: list[_BlobMap],
    z: np.ndarray,
    obj: np.ndarray,
    depth: np.ndarray,
    compact: np.ndarray,
    params: SegmentationParams,
    near_scale: float = SEED_REACH,
) -> np.ndarray:
    """Group index per seed: seeds joined by a path inside one cell form one group.

    Two nearby seeds lie in one cell when a path between them crosses no halo and a path
    between them stays nearly as dark as the seeds (at the finer of the two seeds' scales),
    both without leaving the object. A few paths are tried for each test, so that one bright
    vesicle or a curved cell does not cut a cell in two, while a border between two cells
    stops them all: for the halo, the straight path and two parallel to it; for darkness,
    the straight path and paths bowed to either side. Two more rules keep touching cells
    apart where no halo shows between them: the object must not narrow to a waist on the
    straight path (merge_neck_ratio of its width at the seeds), and fine seeds must share
    one compact body. A long, thin cell (a spindle) shows its nucleus and the far end of its
    body as two dark blobs further apart than near cells' seeds: seeds joined by such a
    path (no halo, dark, no waist) inside a strip at most strip_scale half-wide are paired
    up to strip_length_scale apart; other seeds only up to near_scale d apart (1.5 d: a spread
    or long cell's seeds lie further apart than its diameter; a crowded field's cells press on
    each other, so there CROWDED_SEED_REACH). Groups are the connected components.
    """
    n = len(xy)
    d = params.cell_diameter_px
    reach = max(near_scale, params.strip_length_scale) * d
    pairs = cKDTree(xy).query_pairs(reach, output_type="ndarray") if n > 1 else np.zeros((0, 2), int)
    if len(pairs) == 0:
        return np.arange(n)
    a, b = xy[pairs[:, 0]], xy[pairs[:, 1]]
    near = np.linalg.norm(b - a, axis=1) <= near_scale * d
    steps = np.linspace(0, 1, int(reach) + 2)[None, :, None]
    straight = a[:, None, :] + (b - a)[:, None, :] * steps
    start = obj[a[:, 1].astype(int), a[:, 0].astype(int)]
    finer = np.minimum(scale[pairs[:, 0]], scale[pairs[:, 1]])

    def follow(path: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = obj.shape
        cols = np.clip(np.rint(path[..., 0]).astype(int), 0, w - 1)
        rows = np.clip(np.rint(path[..., 1]).astype(int), 0, h - 1)
        return (obj[rows, cols] == start[:, None]).all(1), rows, cols

    # The waist, compact-body and strip tests first, on the straight path: the halo and
    # darkness tests, which try several paths, are needed only for the pairs these leave.
    inside, rows, cols = follow(straight, start)
    profile = depth[rows, cols]
    no_neck = profile.min(1) >= params.merge_neck_ratio * np.minimum(profile[:, 0], profile[:, -1])
    in_strip = inside & (profile.max(1) <= params.strip_scale * d)
    body_a = compact[a[:, 1].astype(int), a[:, 0].astype(int)]
    body_b = compact[b[:, 1].astype(int), b[:, 0].astype(int)]
    one_body = (finer == 1) | (body_a == body_b)
    test = np.flatnonzero(one_body & no_neck & (near | in_strip))
    a, b, straight, start, inside, rows, cols = (v[test] for v in (a, b, straight, start, inside, rows, cols))
    fine = finer[test] == 0
    normal = np.stack([a[:, 1] - b[:, 1], b[:, 0] - a[:, 0]], 1)
    normal = (normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9))[:, None, :]

    def darkness(points: np.ndarray) -> np.ndarray:
        """Each pair's points sampled on the map of its finer scale."""
        out = np.empty(points.shape[:-1], maps[0].smooth.dtype)
        out[fine], out[~fine] = maps[0].sample(points[fine]), maps[1].sample(points[~fine])
        return out

    ends = np.minimum(darkness(a), darkness(b))
    no_halo = inside & (z[rows, cols].max(1) < params.merge_halo)
    for offset in (-0.1 * d, 0.1 * d):
        inside_here, rows_here, cols_here = follow(straight + normal * offset, start)
        no_halo |= inside_here & (z[rows_here, cols_here].max(1) < params.merge_halo)
    dark = inside & (darkness(straight).min(1) >= params.merge_darkness_ratio * ends)
    bow = np.sin(np.pi * steps)
    for offset in (-0.15 * d, 0.15 * d, -0.3 * d, 0.3 * d):
        path = straight + normal * offset * bow
        dark |= follow(path, start)[0] & (darkness(path).min(1) >= params.merge_darkness_ratio * ends)
    same = pairs[test[no_halo & dark]]
    graph = coo_matrix((np.ones(len(same)), (same[:, 0], same[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


# ---- cells --------------------------------------------------------------------------------


def _nearest_seed_pixel(seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """voronoi's parts: lut, nearest and dist, where lut[nearest] is every pixel's label."""
    background = (seeds == 0).astype(np.uint8)
    dist, nearest = cv2.distanceTransformWithLabels(
        background, cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    at = np.flatnonzero(background.ravel() == 0)
    lut = np.zeros(len(at) + 1, np.int32)  # DIST_LABEL_PIXEL numbers the seed pixels 1..k
    lut[nearest.ravel()[at]] = seeds.ravel()[at]
    return lut, nearest, dist


def voronoi(seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's nearest labelled pixel of seeds (int (H, W), 0 = none): its label (int32
    (H, W)) and the distance to it (float32 (H, W), px; 0 on labelled pixels). A Voronoi split."""
    lut, nearest, dist = _nearest_seed_pixel(seeds)
    return np.take(lut, nearest), dist


def nearest_label(seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give every mask pixel the label of its nearest labelled seed pixel (a Voronoi split)."""
    labels = voronoi(seeds)[0]
    labels *= mask != 0  # (faster than labels[mask == 0] = 0)
    return labels


def merge_wide_necks(pieces: np.ndarray, dist: np.ndarray, ratio: float) -> np.ndarray:
    """Merge touching pieces whose shared border is nearly as wide as the narrower piece.

    The neck between two pieces is the largest distance-transform value on their border;
    two touching round cells meet at a neck much thinner than either, one lobed cell does
    not. Pairs are merged widest neck first, like Kruskal's algorithm.
    """
    n = int(pieces.max()) + 1
    peak = np.zeros(n, dist.dtype)  # each piece's largest distance (dist >= 0; 0 off the pieces)
    np.maximum.at(peak, pieces.ravel(), dist.ravel())
    found = []
    for p, q, dp, dq in (
        (pieces[:, :-1], pieces[:, 1:], dist[:, :-1], dist[:, 1:]),
        (pieces[:-1], pieces[1:], dist[:-1], dist[1:]),
    ):
        touch = (p != q) & (p > 0) & (q > 0)
        p, q = p[touch], q[touch]
        found.append(np.stack([np.minimum(p, q), np.maximum(p, q), np.minimum(dp[touch], dq[touch])], 1))
    border = np.concatenate(found)
    if len(border) == 0:
        return pieces
    pair_key = border[:, 0].astype(np.int64) * n + border[:, 1].astype(np.int64)
    keys, inverse = np.unique(pair_key, return_inverse=True)
    neck = np.zeros(len(keys))
    np.maximum.at(neck, inverse, border[:, 2])
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k in np.argsort(-neck):
        a, b = root(int(keys[k] // n)), root(int(keys[k] % n))
        if a != b and neck[k] >= ratio * min(peak[a], peak[b]):
            parent[b] = a
            peak[a] = max(peak[a], peak[b])
    return np.array([root(i) for i in range(n)], np.int32)[pieces]


def split_at_necks(mask: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Pieces (1..k) of one seedless object, cut where its outline pinches (round cells)."""
    d = params.cell_diameter_px
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5)
    smooth = cv2.GaussianBlur(dist, (0, 0), 1.0)
    peaks = (smooth >= cv2.dilate(smooth, _disc(0.25 * d))) & (dist >= 0.1 * d)
    count, seeds = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if count <= 2:
        return mask.astype(np.int32)
    pieces = merge_wide_necks(nearest_label(seeds, padded), dist, params.neck_ratio)
    return pieces[1:-1, 1:-1]


def split_along_halos(inside: np.ndarray, seeds: np.ndarray, z: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Split one object (inside: its mask in a box) among its seed groups along the halos.

    Pixels darker than halo form bodies bounded by halos. A body holding one seed group
    belongs to that cell whole; one holding several is shared by nearest seed. A body bigger
    than max_body_scale cell areas is several cells whose borders do not show, so it is
    shared by nearest seed too, as are bodies without seeds. Halo pixels then join the
    nearest body, so each cell keeps the halo that rings it. Shared borders therefore follow
    halos where the image shows them and are straight (nearest seed) where it does not.
    """
    core = cv2.morphologyEx((inside & (z < params.halo_level)).astype(np.uint8), cv2.MORPH_OPEN, _disc(1))
    n, comp = cv2.connectedComponents(core, connectivity=4, ltype=cv2.CV_32S)
    # the seed pixels by flat index (np.nonzero of a 2-D array takes several times longer)
    flat = np.flatnonzero((seeds != 0).ravel())
    values = seeds[np.divmod(flat, seeds.shape[1])]  # (seeds: a view into the image's, not raveled)
    top = int(values.max(initial=0)) + 1
    key = np.unique(comp.ravel()[flat].astype(np.int64) * top + values)
    pairs = np.stack(np.divmod(key, top))
    pairs = pairs[:, pairs[0] > 0]  # (body, group) for every seed in a body
    groups = np.bincount(pairs[0], minlength=n)
    one_cell = np.bincount(comp.ravel(), minlength=n) <= params.max_body_scale * _cell_area(params)
    claim = (groups > 0) & one_cell
    claim[0] = False
    owner = np.zeros(n, np.int32)
    sole = (groups == 1)[pairs[0]]
    owner[pairs[0][sole]] = pairs[1][sole]
    body = np.take(np.where(claim, owner, 0), comp)  # (take: faster than indexing by comp)
    unclaimed = ~claim
    unclaimed[0] = False  # label 0 is everything outside core
    rest = np.take(unclaimed, comp)
    if rest.any():
        lut, nearest, _ = _nearest_seed_pixel(np.where(inside, seeds, 0))
        body[rest] = lut[nearest[rest]]
    shared = np.flatnonzero(claim & (groups > 1))
    if len(shared):
        boxes = ndi.find_objects(comp)
        for index in shared:
            part = comp[boxes[index - 1]] == index
            local = nearest_label(np.where(part, seeds[boxes[index - 1]], 0), part)
            body[boxes[index - 1]][part] = local[part]
    present = np.zeros(top, bool)
    present[values[body.ravel()[flat] == values]] = True
    lost = ~present[values]  # a group that holds none of its own seeds
    body.ravel()[flat[lost]] = values[lost]
    return nearest_label(body, inside)


def assign_cells(
    obj: np.ndarray,
    xy: np.ndarray,
    group: np.ndarray,
    z: np.ndarray,
    params: SegmentationParams,
    bodies: tuple[np.ndarray, float] | None = None,
) -> np.ndarray:
    """Instance labels: each object split among its seed groups (nearest group wins).

    An object without seeds is a bright (rounded) cell when enough of it is bright, split at
    its necks; otherwise it is debris or dish texture and dropped. bodies: (z', level), where
    the cell bodies split_along_halos shares are the pixels of z' below level rather than the
    pixels of z below halo_level (a confluent field: confluent_units).
    """
    cols, rows = xy[:, 0].astype(int), xy[:, 1].astype(int)
    seeds = np.zeros(obj.shape, np.int32)
    seeds[rows, cols] = group + 1
    groups_per_object = np.zeros(int(obj.max()) + 1, np.int64)
    stride = np.int64(group.max(initial=0)) + 1  # (object, group) pairs as one sortable key
    key = np.unique(obj[rows, cols].astype(np.int64) * stride + group)
    pairs = np.stack([key // stride, key % stride])
    np.add.at(groups_per_object, pairs[0], 1)
    sole_group = np.zeros_like(groups_per_object, dtype=np.int32)
    sole = groups_per_object[pairs[0]] == 1
    sole_group[pairs[0][sole]] = pairs[1][sole] + 1
    sole_group[0] = 0  # background stays background
    labels = np.take(sole_group, obj)  # (take: twice as fast as sole_group[obj])
    next_label = int(group.max(initial=-1)) + 2
    min_bright = params.bright_area_scale * _cell_area(params)
    for index, box in enumerate(ndi.find_objects(obj), start=1):
        if box is None or groups_per_object[index] == 1:
            continue
        inside = obj[box] == index
        if groups_per_object[index] > 1:
            if bodies is None:
                labels[box][inside] = split_along_halos(inside, seeds[box], z[box], params)[inside]
            else:
                body_z, level = bodies
                labels[box][inside] = split_along_halos(
                    inside, seeds[box], body_z[box], replace(params, halo_level=level)
                )[inside]
        elif np.count_nonzero(z[box][inside] > params.bright_level) >= min_bright:
            pieces = split_at_necks(inside, params) if params.declump else inside.astype(np.int32)
            ids, piece = np.unique(pieces[inside], return_inverse=True)
            labels[box][inside] = piece.astype(np.int32) + next_label
            next_label += len(ids)
    return labels


def filter_by_area(labels: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Drop objects outside the area limits and renumber the rest 1..n in label order."""
    return filtered_by_area(labels, params)[0]


def filtered_by_area(labels: np.ndarray, params: SegmentationParams) -> tuple[np.ndarray, np.ndarray]:
    """filter_by_area's int32 (H, W) labels and their areas: int64 (n + 1,), the pixel count of
    each label value 0..n (0 for the background), which cell_quality.fragment_map reads."""
    where = np.flatnonzero(labels.ravel() != 0)
    label = labels.ravel()[where]
    area = np.bincount(label, minlength=int(label.max(initial=0)) + 1)
    cell_area = _cell_area(params)
    keep = (area >= params.min_area_scale * cell_area) & (area <= params.max_area_scale * cell_area)
    keep[0] = False
    relabel = np.zeros(len(area), np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    out = np.zeros(labels.shape, np.int32)
    out.ravel()[where] = relabel[label]
    # (out.max() + 1,): label values kept without pixels (area limits at 0) past the last one dropped
    present = np.flatnonzero(keep & (area > 0))
    top = int(relabel[present[-1]]) if len(present) else 0
    kept = np.zeros(top + 1, area.dtype)
    kept[1:] = area[keep][:top]
    return out, kept


# A field whose objects cover at least FEW_SEEDS_COVER of it (so the whole image's level and
# spread are partly the cells') and whose dark seeds, measured against them, number under
# FEW_SEEDS per cell area of its objects, is crowded. On the 24 Usiigaci and 6 T98G fields
# (objects over 26-44% of the field) these seeds number 0.25-0.50 per cell area; on the dense
# synthetic and neuroblastoma-like tiles with under half of them medium, 0.00-0.07; on U373-like
# tiles (Usiigaci at x2, 696 x 520) that large cells fill over half of, 0.16-0.47 (one at 0.00).
FEW_SEEDS = 0.1
FEW_SEEDS_COVER = 1 / 3
# The least ratio of the image's spread (normalise's unit) to the medium's noise (noise_units')
# that seed darkness is measured against (seed_params). The spread is the unit of seed darkness
# because it follows the culture's contrast; but in a field that is mostly medium (a small field
# of a few large cells, a sparse plate) it is the medium's own, debris and all, and dark specks of
# debris pass seed_darkness. On the 24 Usiigaci and 6 T98G fields the ratio is 1.54-2.34 (easy
# synthetic fields 1.54-2.81), so none of them is changed; U373-like tiles (Usiigaci and T98G at
# x2, 696 x 520, 8-bit) with under a fifth of them objects read 1.29-1.38, their whole fields 1.5-1.85.
MIN_SPREAD_PER_NOISE = 1.5


def seed_params(params: SegmentationParams, noise: float) -> SegmentationParams:
    """params with seed_darkness raised so that it is measured against at least MIN_SPREAD_PER_NOISE
    medium noise units: noise is the medium's noise in the image's spread units (noise_units'
    spread, _noise_units_scaled's third value); unchanged when the spread is at least that many."""
    if noise * MIN_SPREAD_PER_NOISE <= 1:
        return params
    return replace(params, seed_darkness=params.seed_darkness * MIN_SPREAD_PER_NOISE * noise)


# In a crowded field seeds more than one cell diameter apart are never grouped (but along a
# strip): cells press on each other there, a seed lies in its cell, and pressed cells show next
# to no seam between them (on the dense synthetic tiles the straight path between the seeds of
# two large flat cells pressed together never rises a noise unit above the medium), so two seeds
# further apart than a cell is wide are two cells'. Measured on the 12 dense synthetic tiles
# (1,573 cells): true / false detections 1,154 / 18 at 1.5 d, 1,230 / 19 at 1.0, 1,243 / 22 at
# 0.75, 1,246 / 27 at 0.5.
CROWDED_SEED_REACH = 1.0
# In a crowded field whose flat pixels show one mode, a cell's body is also what is darker than
# the medium by this many noise units (the seam level mirrored: darker than the medium by more
# than its noise). Measured (true / false detections), these discs added to the halo-bounded
# compact bodies: 12 dense synthetic tiles 1,230 / 19 -> 1,268 / 22; 8 neuroblastoma-like tiles of
# 350 cells 1,105 / 42 -> 1,283 / 49; U373-like T98G tiles (x2, 82 px) unchanged. In their place:
# 1,235 / 17 and 1,275 / 49, but T98G tiles 405 / 114 -> 402 / 114 (1,238 / 17 at 1.5 and
# 1,218 / 19 at 2.5 on the dense tiles; with chains cut at their necks 1,270 / 45; with no least
# thickness 1,302 / 137). Such bodies that no seed reached, seeded (seedless_body_seeds): dense
# tiles 1,268 / 22 -> 1,307 / 25, tiles of 350 cells 1,298 / 52 -> 1,320 / 53, the T98G tile at x2
# (82 px) 5 / 1 -> 6 / 1 of 11 (at 3 noise units about the same: 1,299 / 24, 1,320 / 50)
CROWDED_BODY_LEVEL = 2.0
# the widest halo rim looked for around the objects (measurements.halo_rim_width), diameters
HALO_RIM_SCALE = 0.5


def _seeds(
    norm: np.ndarray,
    tex: np.ndarray,
    threshold: float,
    z: np.ndarray,
    obj: np.ndarray,
    medium: np.ndarray,
    crowded: bool,
    params: SegmentationParams,
) -> tuple[tuple[np.ndarray, float] | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[_BlobMap]]:
    """find_candidates' seeding: (confluent, reference, compact, xy, scale, maps).

    confluent: confluent_units' (z', level) where a crowded field's flat pixels show two modes
    (else None); reference: bool (H, W), the medium darkness is measured against; compact:
    compact_bodies' labels; xy, scale, maps: dark_seeds' seeds (x, y px), scales and maps.
    """
    # in a crowded field whose flat pixels show two modes, the medium is the brighter one
    split = confluent_split(norm, tex, threshold) if crowded else None
    reference = medium if split is None else confluent_medium(norm, tex, threshold, split)
    # in a crowded field a small, roundish body ringed by halo is a cell however dark: clumped
    # round cells pressed together show no solidly dark body
    body_z, body_params, confluent = z, replace(params, solid_fraction=0.0) if crowded else params, None
    if split is not None:
        # with the medium found, a cell's body is what is darker than the level between cell
        # interior and medium (medium inside the merged objects, under halo_level, would join
        # every body into one); a body counts as a round cell's only when it covers at most
        # DISC_AREA_RATIO inscribed discs (a star-shaped cell is not one)
        confluent = body_z, level = confluent_units(norm, reference, split)
        body_params = replace(body_params, halo_level=level, compact_elongation=DISC_AREA_RATIO)
    compact = compact_bodies(body_z, obj, body_params)
    if crowded and split is None:
        # a crowded field whose flat pixels show one mode: medium shows inside its merged objects
        # too, below halo_level, and joins the bodies of clumped round cells into one. There a
        # body is also what is darker than the medium by CROWDED_BODY_LEVEL, and counts as a round
        # cell's when it is a disc (at most DISC_AREA_RATIO inscribed discs, thick enough for a
        # fine seed; a longer dark body there is a spread cell's granular patch, not a chain of
        # round cells); such discs that no halo-bounded compact body overlaps are added to them
        discs = compact_bodies(
            z,
            obj,
            replace(body_params, halo_level=-CROWDED_BODY_LEVEL, compact_elongation=DISC_AREA_RATIO),
            discs_only=True,
        )
        overlapping = np.unique(discs[(discs > 0) & (compact > 0)])
        extra = (discs > 0) & ~np.isin(discs, overlapping)
        compact = np.where(extra, discs + np.int32(compact.max(initial=0)), compact).astype(np.int32)
    xy, scale, maps = dark_seeds(medium_units(norm, reference, crowded), obj, compact, params)
    return confluent, reference, compact, xy, scale, maps


def find_candidates(
    image: np.ndarray, params: SegmentationParams = SegmentationParams(), rules: QualityRules = QualityRules()
) -> tuple[pd.DataFrame, np.ndarray, dict[str, float]]:
    """Find every cell candidate of one phase-contrast image and judge its quality.

    find_candidates_boxed's first three values (see it for the returns). Raises ValueError when
    the image is not 2-D.
    """
    return find_candidates_boxed(image, params, rules)[:3]


def find_candidates_boxed(
    image: np.ndarray, params: SegmentationParams = SegmentationParams(), rules: QualityRules = QualityRules()
) -> tuple[pd.DataFrame, np.ndarray, dict[str, float], list]:
    """Find every cell candidate of one phase-contrast image and judge its quality, with the
    candidates' bounding boxes.

    image: 2-D array, any numeric dtype. Returns (candidates, labels, image_measures, boxes):
    candidates has one row per candidate, with measure_cells' columns (cell_id is its value
    in labels; x, y in px, the centre of its dark body: cell_quality.body_centres) and
    cell_quality.QUALITY_COLUMNS (qc is "cell", "debris",
    "fragment" or "edge"; qc_joined: how many dark-joined or faint-seam pieces were merged into
    it); labels is an int32 (H, W) instance mask, 0 for background, of every candidate
    (fragments against a neighbour, pieces joined to one by dark cytoplasm,
    cell_quality.merge_dark_joined, and pieces parted by no clear seam,
    cell_quality.merge_faint_seams, already merged into it); image_measures holds
    field_quality's ImageQuality_* measures and ImageQuality_FragmentsMerged (a count of every
    kind of merge); boxes is scipy.ndimage.find_objects(labels) (a (slice, slice) per label
    value 1..labels.max(), None for a value without pixels), which cell finding has anyway and
    the neighbour measurements take (neighbors.with_neighbors' boxes) instead of finding again.
    Raises ValueError when the image is not 2-D.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D single-channel image, got shape {image.shape}")
    d = params.cell_diameter_px
    as_float = np.ascontiguousarray(image, np.float32)  # one float copy, for normalise and field_quality
    norm = normalise(as_float, params)
    tex = texture(norm, params)
    threshold = texture_threshold(tex, params)
    mask = foreground(tex, params, threshold)
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_5)  # distance to the medium
    obj = objects(mask, depth, params)
    medium = obj == 0
    z, _, noise = _noise_units_scaled(norm, medium)
    # seed darkness is in units of the image's spread, which a field that is mostly medium reads
    # as the medium's own: there it is measured against at least MIN_SPREAD_PER_NOISE noise units
    params = seed_params(params, noise)
    # a crowded field: its cells press on each other and merge into a few large objects, and
    # the whole image's level and spread are the cells' own, so that darkness measured against
    # them shows next to no dark seed in the foreground. Cells over more of the field than the
    # medium alone do not make it crowded: in a small field that a few large cells fill, the
    # medium left still shows their dark bodies, as their whole field does
    share = medium[::4, ::4].mean()
    confluent, reference, compact, xy, scale, maps = _seeds(norm, tex, threshold, z, obj, medium, False, params)
    few = len(xy) < FEW_SEEDS * np.count_nonzero(obj) / _cell_area(params)
    crowded = 1 - share >= FEW_SEEDS_COVER and few
    if crowded:
        confluent, reference, compact, xy, scale, maps = _seeds(norm, tex, threshold, z, obj, medium, crowded, params)
        # a body that no seed reached is a cell of its own (a flat grey interior shows no dark
        # blob): in a confluent field what is darker than the level between interior and medium,
        # else what is darker than the medium by CROWDED_BODY_LEVEL
        body_z, level = (z, -CROWDED_BODY_LEVEL) if confluent is None else confluent
        extra = seedless_body_seeds(body_z, level, obj, xy, params)
        xy, scale = np.concatenate([xy, extra]), np.concatenate([scale, np.ones(len(extra), int)])
    # (the rules after seeding, joining pieces and judging sizes by the field's typical cell,
    # hold where the medium covers over half the field, so that cells have medium between them,
    # or where it is not crowded)
    uncrowded = share >= rules.join_min_medium_share or not crowded
    cell_obj, group_params = obj, params
    if compact.any() or crowded:  # where compact cells are, or crowded: rounded bright ones are cells too
        bodies = bright_bodies(z, obj, params)
        bright = bright_seeds(z, obj, params, bodies)
        xy, scale = np.concatenate([xy, bright]), np.concatenate([scale, np.zeros(len(bright), int)])
    if crowded:
        # each bright body an object of its own; and between cells pressed together only a
        # faint seam shows, not the full halo of a free cell's edge: halo_level marks a border
        cell_obj = with_bright_bodies(obj, bodies)
        group_params = replace(params, merge_halo=params.halo_level)
    if params.declump:
        group_z = z
        if confluent is not None:
            # the medium found, seeds are grouped across nothing brighter than the level between
            # cell interior and medium: a path crossing it leaves the cell, whose bodies may show
            # as little as a noise unit darker than the medium
            group_z, level = confluent
            group_params = replace(group_params, merge_halo=level)
        reach = CROWDED_SEED_REACH if crowded else SEED_REACH
        group = group_seeds(xy, scale, maps, group_z, cell_obj, depth, compact, group_params, reach)
    else:  # one cell per object
        group = np.unique(cell_obj[xy[:, 1].astype(int), xy[:, 0].astype(int)], return_inverse=True)[1]
    # (in a confluent field, objects are shared along the same bodies: the pixels darker than the
    # level between cell interior and medium)
    labels, area = filtered_by_area(assign_cells(cell_obj, xy, group, z, params, confluent), params)
    fine = xy[scale == 0].astype(int)
    at_fine = labels[fine[:, 1], fine[:, 0]]  # the label under each fine seed: compact cells
    is_compact = np.zeros(len(area), bool)  # (len(area) is labels.max() + 1)
    is_compact[at_fine] = True
    is_compact[0] = False
    before = labels
    depth_before = inner_depth(before)
    radius_before = inscribed_radius(before, depth_before)
    thin = np.flatnonzero(radius_before < rules.min_thickness_scale * d)
    mapping, merged = fragment_map(before, d, rules, np.flatnonzero(is_compact), thin[thin > 0], area)
    # pieces of one cell joined by dark cytoplasm (no bright seam between them); compact cells,
    # found again by position after the renumbering, never; in a crowded field (cells over more
    # of it than the medium) cells press on each other with no medium, hence no halo, between
    # them, and a dark path between two candidates tells nothing
    joined = np.zeros(int(mapping.max(initial=0)) + 1, np.int64)
    if uncrowded:
        step = join_step(d, rules)
        compact_after = np.unique(mapping[at_fine][is_compact[at_fine]])
        sampled = mapping[before[::step, ::step]]
        joined_map, joined = dark_joined_map(
            sampled, z[::step, ::step], len(mapping), d, step, rules, compact_after[compact_after > 0]
        )
        mapping = joined_map[mapping]
        # then pieces parted by no seam clear of the noise that together are no bigger than two typical cells
        seam_map, seamed = faint_seam_map(
            joined_map[sampled], z[::step, ::step], len(joined), d, step, rules, np.unique(joined_map[compact_after])
        )
        joined = seamed + np.bincount(seam_map, weights=joined, minlength=len(seamed)).astype(np.int64)
        mapping = seam_map[mapping]
    # the maps composed, the image relabelled once; only merged labels are measured again
    labels = np.take(mapping, before) if merged or joined.any() else before  # (take: twice as fast as mapping[before])
    boxes = ndi.find_objects(labels)
    # the quality rules read the whole object's area and centroid; the reported AreaShape
    # measures are of the cell's outline: the object without the halo rim that texture adds
    # around it (both from one pass over the objects)
    rim = halo_rim_width(depth, z, obj > 0, HALO_RIM_SCALE * d, params.halo_level)
    cells, outline = measure_objects(labels, boxes, depth >= rim if rim > 0 else None)
    # depth inside each candidate (`depth` above: inside the foreground)
    cell_depth, radius = merged_depth(depth_before, radius_before, mapping, labels, boxes)
    # judged at the centroid, the outline's shape (in a confluent field at the body, below)
    inside = centres_inside(labels, cells, rules, cell_depth, radius) if confluent is None else None
    pixels = labelled_pixels(labels, z, rules)  # read by body_centres and quality_measures
    # x, y: the centre of the cell's body (in a confluent field, its pixels dark against the medium
    # found, not against the mix of medium and cell interior outside the objects)
    body_z, body_pixels = z, pixels
    if confluent is not None:
        body_z = confluent[0]
        body_pixels = (pixels[0], pixels[1], body_z.ravel()[pixels[0]] < -rules.dark_level)  # (labelled_pixels')
    cells = body_centres(labels, cells, rules, cell_depth, body_z, body_pixels)
    field = field_quality(image, obj, d, as_float)
    rows = np.clip(np.rint(cells["y"].to_numpy()).astype(int), 0, image.shape[0] - 1)
    cols = np.clip(np.rint(cells["x"].to_numpy()).astype(int), 0, image.shape[1] - 1)
    measures = quality_measures(labels, z, tex, threshold, cells, d, rules, radius, pixels)
    measures["qc_joined"] = joined[cells["cell_id"].to_numpy()]
    # compact cells after the merges: the labels their fine seeds' labels became
    compact_now = np.zeros(int(labels.max(initial=0)) + 1, bool)
    compact_now[mapping[at_fine]] = is_compact[at_fine]
    compact_now[0] = False
    typical = typical_cell_area(cells["area"].to_numpy(), d, rules) if uncrowded else None
    judge = rules
    if confluent is not None:
        # a confluent field's cells are the flat grey interiors that made its flat pixels two
        # modes: texture under the foreground threshold does not make one debris; and a cell
        # there is a share of a merged object, medium and neighbours' processes included, whose
        # centroid says little of its shape: its centre is judged where it is reported, at its body
        judge = replace(rules, min_texture_contrast=0.0)
        inside = centres_inside(labels, cells, rules, cell_depth, radius)
    verdict = label_quality(
        measures,
        field.usable[rows, cols],
        d,
        judge,
        compact_now[cells["cell_id"].to_numpy()],
        inside,
        typical,
        None
        if typical is None
        else within_border_frame(labels, cells, rules.min_cut_reach_scale * np.sqrt(typical / np.pi)),
        outline,
    )
    if typical is not None:
        # of two touching cells whose bodies a path along the straight line between them (within
        # a corridor around it) joins without crossing a halo, the smaller (no bigger than a
        # typical cell) is a piece of the larger
        is_cell = (verdict["qc"] == "cell").to_numpy()
        # far paler, fainter and thinner than the image's own cells (or moderately so, all three, and
        # ringed like a cell): flat debris or a gap among cells' halos, not a cell body
        pale = pale_outliers(measures, is_cell, rules)
        alone = measures["qc_nearest_cell_px"].to_numpy() > rules.isolation_scale * d
        verdict.loc[pale, "qc"] = np.where(alone[pale], "debris", "fragment")
        verdict.loc[pale, "qc_reason"] = (
            "paler, fainter and thinner than this image's cells (dark fraction, texture and thickness robust "
            f"z-scores against them, each down to -{rules.pale_clip:g}, summing under {rules.pale_level:g}; or "
            f"under {rules.ringed_level:g}, each under {rules.ringed_each:g}, ringed at least as brightly as "
            f"they are and not far smaller, area z at least {rules.ringed_min_area:g})"
        )
        is_cell = is_cell & ~pale
        piece = np.zeros(len(cells), bool)
        compact_cells = compact_now[cells["cell_id"].to_numpy()][is_cell]
        # judged against the typical spread cell among the cells, where that is larger (a field of
        # large cells found as pieces: pieces, specks and nuclei pull all the candidates' median down)
        line_typical = spread_typical_area(typical, cells["area"].to_numpy()[is_cell], compact_cells, d, rules)
        piece[is_cell] = dark_line_pieces(labels, cells[is_cell], z, d, line_typical, rules, compact_cells)
        verdict.loc[piece, "qc"] = "fragment"
        verdict.loc[piece, "qc_reason"] = (
            "a piece of a larger touching cell: the straight line between their bodies, or a path beside it "
            f"within {rules.line_corridor_scale:g} diameters, crosses no halo (never above {rules.line_level:g} noise units)"
        )
    # the outline's AreaShape measures reported (the quality rules above judged the whole object)
    if len(cells):
        cells[list(MEASUREMENT_COLUMNS)] = outline[list(MEASUREMENT_COLUMNS)].to_numpy()
    candidates = pd.concat([cells, verdict, measures], axis=1)
    return candidates, labels, {**field.measures, "ImageQuality_FragmentsMerged": float(merged + joined.sum())}, boxes


def find_cells(image: np.ndarray, params: SegmentationParams = SegmentationParams()) -> tuple[pd.DataFrame, np.ndarray]:
    """Find the cells of one phase-contrast image: the candidates whose qc label is "cell".

    Returns (cells, labels): a table with one row per cell (find_candidates' columns; cell_id,
    1..n, is the cell's value in labels) and an int32 (H, W) instance mask of those cells
    alone, 0 for background. Raises ValueError when the image is not 2-D.
    """
    return find_cells_boxed(image, params)[:2]


def find_cells_boxed(
    image: np.ndarray, params: SegmentationParams = SegmentationParams()
) -> tuple[pd.DataFrame, np.ndarray, list]:
    """find_cells' (cells, labels) and boxes, scipy.ndimage.find_objects(labels): the (slice,
    slice) bounding box of each cell (cell_id k at boxes[k - 1]), the boxes cell finding found
    for its candidates, for the neighbour measurements (neighbors.with_neighbors' boxes).
    Raises ValueError when the image is not 2-D.
    """
    candidates, labels, _, boxes = find_candidates_boxed(image, params)
    keep = (candidates["qc"] == "cell").to_numpy()
    cells = candidates[keep].reset_index(drop=True)
    lut = np.zeros(len(boxes) + 1, np.int32)  # (len(boxes) is labels.max())
    renumbered = np.arange(1, len(cells) + 1, dtype=np.int32)
    ids = cells["cell_id"].to_numpy()
    lut[ids] = renumbered
    kept_boxes = [boxes[i - 1] for i in ids.tolist()]  # a cell's pixels are its candidate's
    return cells.assign(cell_id=renumbered), np.take(lut, labels), kept_boxes  # (lut[labels], twice as fast)
