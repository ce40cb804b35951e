"""Quality of each cell candidate: interpretable measures, a `qc` label and its reason.

Cell finding proposes candidates; not all are cells. On real fields the false ones are of
three kinds (measured on the hand-annotated Usiigaci fields): pieces of one cell (a
protrusion, a piece of halo, one end of a long cell) lying against the rest of it; small
specks of debris or floating particles on their own in the medium; and anything on the
well's edge or other non-culture areas (see field_quality). The rules are relative to the
typical cell's size (cell areas, pi d^2 / 4 of the segmentation's cell_diameter_px) and to
the image's own noise, never absolute:

- fragment, merged: a candidate smaller than fragment_area_scale cell areas, or thinner than a
  cell body (its largest inscribed disc under min_thickness_scale diameters in radius: a thin
  process, a sliver of halo, whatever its area), that shares a border with a neighbour is
  merged into the neighbour it shares most border with;
- joined, merged: two touching candidates whose darkest parts are joined by a path that never
  rises more than the noise (join_level, 1 noise unit) above the medium: no bright seam between
  them. In phase contrast two touching cells meet along a bright seam, the halos of their
  membranes, while a nucleus and a patch of dark granular cytoplasm of one spread cell are
  joined through cytoplasm darker than the medium. They are one cell when the smaller is no
  bigger than a typical cell of the image (typical_cell_area: from the candidates' own median
  size, as cell_size estimates a plate's), except in a crowded field (medium under half of it:
  cells pressed on each other show no halo between them); qc_joined counts the pieces merged
  into each candidate (dark_joined_pairs, merge_dark_joined). On the 24 Usiigaci fields it took
  away about 120 false detections, mostly second detections in a cell, and 19 true ones;
- seam, merged (after the joined rule, not in a crowded field): two touching candidates whose
  darkest parts are joined by a path that stays below seam_level (2 noise units above the
  medium: it crosses no seam that stands clear of the noise, let alone a halo) and that together
  hold at most seam_area_scale (2) typical cells are one cell (merge_faint_seams, counted in
  qc_joined). Two whole cells are each about as big as a cell is found (1.44 typical cells with
  its halo), so together well above two typical cells; the head and tail of one long cell, or its
  nucleus and its lamella found apart, share one cell's area. Two compact cells are never
  merged, nor a candidate cut by the image's border (it shows only part of its cell). On the 24
  Usiigaci fields (find_cells at 41 px) it took away 18 false detections and 1 true one;
- edge: the candidate's centre lies outside the culture surface;
- edge (checked after every rule below but the speck and line rules): cut by the image's border, reaching less than
  min_cut_reach_scale times the radius of the image's typical cell (typical_cell_area; not in
  a crowded field) into the field (within_border_frame) and holding less than
  min_cut_area_scale of its area. As in stereological counting, a cell belongs to the field
  that holds its centre; a cell centred in the field reaches at least about its radius into it
  and shows at least about half of itself (either alone fails for a long cell lying along the
  border), so a candidate that does neither is the edge of a cell centred outside, whose
  position, size and crop cannot be read (hand annotations leave such slivers out). On the 24
  Usiigaci fields it labelled 20 candidates (not labelled by the other rules): 19 false
  detections and 1 true one;
- debris: smaller than debris_area_scale cell areas with no other candidate within
  isolation_scale diameters, or too faint to be a cell (its texture contrast, the mean local
  standard deviation inside it over the foreground threshold, below min_texture_contrast);
- debris / fragment: thinner than a cell body (as above; compact cells too, which are round
  and thicker than that), alone / near, but not touching, a cell;
- debris / fragment: its centre (centroid) lies off its own pixels or at their edge (less than
  min_centre_depth times its inscribed radius inside), alone / next to other candidates: a
  crescent of halo hugging a cell, a ring, a piece bent around a neighbour. A cell body is
  roughly convex and holds its centre well inside (no synthetic cell, round, spindle or star,
  is caught; on the 24 Usiigaci fields it took away 70 false detections and 5 true ones);
- fragment: smaller than fragment_area_scale cell areas and near, but not touching, a cell;
- debris / fragment: smaller than min_typical_area_scale of the image's typical cell
  (typical_cell_area; not in a crowded field, whose candidates are clumps), alone / next to
  other candidates: cells are often found at a scale well below their whole outline (41 px
  against 61 px on the Usiigaci fields), so half a cell area at the scale is no lower bound
  for a cell. On the 24 Usiigaci fields it labelled 41 candidates, 40 of them false
  detections (specks of debris, pieces of halo and protrusions);
- debris / fragment (speck): its outline (the object less the halo rim texture adds around it)
  under min_outline_scale (0.12) of the median outline of the image's cell-sized candidates,
  alone / next to other candidates, unless a compact cell with a round, convex outline (a cell
  rounded up): a speck of debris, a particle ringed by its halo, a dark fibre, a sliver of a
  cell's edge are mostly halo (specks). Judged after the edge rule. On the 24 Usiigaci fields
  it labelled 32 detections, 28 of them false;
- fragment (line, judged last, among the cells left, not in a crowded field): of two touching
  cells whose body centres are joined by a path inside the two, within line_corridor_scale (0.05)
  diameters of the straight line between them, that never rises above line_level (3 noise
  units, the halo level) in the lightly smoothed image, the smaller, when no bigger than a
  typical cell (spread_typical_area: the larger of typical_cell_area of all the candidates and of
  the spread cells among the cells) and the two are not both compact: the path from one cell's body to a touching
  cell's crosses both membranes and the bright seam between them, while two dark parts of one
  spread cell are joined through cytoplasm, past its bright granules and vacuoles
  (dark_line_pieces). Labelled, not merged, so the larger keeps its centre. On the 24 Usiigaci
  fields it labelled 57 detections, 54 false (the straight line alone: 30, 29 false); judged
  against the typical spread cell where larger (large spread cells found as pieces, whose pieces,
  specks and nuclei pull all the candidates' median down), 23 detections fewer, 20 of them false;
- debris / fragment (pale, judged before the line rule, among the cells left, not in a crowded
  field): far paler, fainter and thinner than the image's own cells, the robust z-scores of its
  dark fraction, texture contrast and thickness against them (each counted down to -2 at most)
  summing under pale_level (-4; pale_outliers), alone / next to other candidates: flat debris,
  out-of-focus material and dark fibres have no dark, grainy, thick body. On the 24 Usiigaci
  fields 31 false detections fewer (17 far from any cell) for 1 true. Ringed pale, its second
  tier: the sum under ringed_level (-3) with each of the three under ringed_each (-0.25), when
  the ring just outside is at least as bright as the cells' median ring and the area's robust
  z-score is at least ringed_min_area (-1.5): 20 false detections fewer for 4 true;
- cell: everything else.

Non-cells stay in the table with their label and reason, so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import DisjointSet

QC_LABELS = ("cell", "debris", "fragment", "edge")
FOUND_PER_TRUE_DIAMETER = 1.2  # candidates' median equivalent diameter / annotated mean diameter (see cell_size)
MIN_CELLS = 20  # fewer candidates than this: no size estimate from them (cell_size)
MIN_TYPICAL = 5  # fewer candidates than this: no typical cell area from them (typical_cell_area)
QUALITY_COLUMNS = (
    "qc",
    "qc_reason",
    "qc_area_ratio",
    "qc_dark_fraction",
    "qc_halo_strength",
    "qc_texture_contrast",
    "qc_nearest_cell_px",
    "qc_thickness",
    "qc_joined",
)


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the qc labels, in cell areas (pi d^2 / 4), diameters (d) or noise units."""

    fragment_area_scale: float = 0.5  # smaller pieces against a neighbour are merged into it, cell areas
    debris_area_scale: float = 0.5  # smaller candidates alone in the medium are debris, cell areas
    isolation_scale: float = 0.5  # "alone": no other candidate within this gap, d
    min_texture_contrast: float = 1.0  # mean texture inside / foreground threshold; fainter is debris
    dark_level: float = 5.0  # darker than this (noise units) counts as dark body
    min_thickness_scale: float = 0.15  # thinnest cell body (inscribed radius), d; thinner is a process or halo sliver
    min_centre_depth: float = 0.25  # a cell body holds its centre at least this x its inscribed radius inside
    body_depth: float = 0.6  # position: centroid of its dark pixels at least this x as deep as its deepest
    join_level: float = (
        1.0  # a path between dark parts below this crosses no seam, noise units (medium 0: one noise unit above it)
    )
    join_area_scale: float = 1.0  # the smaller dark-joined candidate is merged up to this x a typical cell area
    join_pixel_scale: float = 0.05  # the join test samples pixels this far apart, d (a seam is wider)
    min_typical_area_scale: float = 0.4  # smaller than this x the image's typical cell area: not a cell
    join_min_medium_share: float = 0.5  # joined only where the medium covers this share of the field
    min_cut_reach_scale: float = 1.0  # cut by the image's border, reaching less than this x a typical cell's radius in
    min_cut_area_scale: float = 0.5  # and with less than this x a typical cell's area in view: centred outside
    seam_level: float = 2.0  # a path below this crosses no seam clear of the noise (two noise units), noise units
    seam_area_scale: float = 2.0  # pieces parted by no clear seam: one cell up to this x a typical cell area, together
    line_level: float = 3.0  # a line between two bodies never brighter than this crosses no halo (segmentation's halo_level), noise units
    line_area_scale: float = (
        1.0  # the smaller of two bodies so joined is a piece of the larger up to this x a typical cell area
    )
    line_smooth_scale: float = 0.05  # the line is read on the image smoothed this wide (Gaussian sigma), d
    line_end_share: float = 0.125  # each end of the line left unread, share of its length (it lies in the body itself)
    line_corridor_scale: float = 0.05  # a path between the bodies may stray this far from the line (its smoothing), d
    min_outline_scale: float = 0.12  # an outline under this x the median outline of cell-sized candidates: not a cell
    round_eccentricity: float = 0.7  # a rounded cell's outline is at most this eccentric (minor / major axis >= 0.71)
    round_solidity: float = 0.85  # and at least this solid (area / convex hull area)
    pale_level: float = -4.0  # dark + texture + thickness robust z vs the image's cells: under this, pale
    pale_clip: float = 2.0  # each of those z-scores counts down to minus this at most (no one measure decides)
    ringed_level: float = -3.0  # ringed pale: the same sum under this, when each of the three z-scores lies under
    ringed_each: float = -0.25  # this, the ring just outside is at least as bright as the cells' median (halo z >= 0)
    ringed_min_area: float = -1.5  # and the area's robust z-score is at least this (smaller: a small cell, spared)


def _borders(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared border length (pixel pairs) of every pair of touching labels: arrays a, b
    (a < b, int64, in increasing order of the pair) and length (int64)."""
    n = np.int64(labels.max(initial=0)) + 1
    keys = []
    for p, q in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        differ = p != q  # borders are a small share of the pixels: pick them out first
        p, q = p[differ], q[differ]
        touch = (p > 0) & (q > 0)
        a, b = p[touch].astype(np.int64), q[touch].astype(np.int64)
        keys.append(np.minimum(a, b) * n + np.maximum(a, b))
    key, counts = np.unique(np.concatenate(keys), return_counts=True)
    return key // n, key % n, counts


def inner_depth(labels: np.ndarray) -> np.ndarray:
    """float32 (H, W): each labelled pixel's depth (px) inside its own label of labels (int
    (H, W), 0 = background), its distance to the nearest pixel of the background or of another
    label, counting itself (1 on a label's edge); 0 on the background."""
    labels = np.asarray(labels)
    inner = _inner(labels)
    depth = cv2.distanceTransform(inner.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    depth += labels != 0  # 0 off the inner pixels: 1 on a label's edge, 0 on the background
    return depth


def merged_depth(
    depth: np.ndarray, radius: np.ndarray, mapping: np.ndarray, labels: np.ndarray, boxes: list
) -> tuple[np.ndarray, np.ndarray]:
    """(inner_depth(labels), inscribed_radius(labels)) after merges, from those before them.

    depth, radius: inner_depth and inscribed_radius of the labels before the merges; mapping:
    int (n,) the label value each earlier value became (fragment_map, dark_joined_map);
    labels: int (H, W), the labels after (mapping applied); boxes: scipy.ndimage.find_objects
    of labels. A label's depth depends on its own pixels alone (its edge encloses its inner
    pixels), so only labels made of more than one earlier label are measured again, each on its
    bounding box grown by one pixel; every other label keeps its depth and radius. Cell finding
    merges a few pieces per image, so this costs a small share of a second full distance
    transform. depth (float32 (H, W)) is modified in place; the radius returned is float32
    (labels.max() + 1,).
    """
    present = np.flatnonzero(radius > 0)
    sources = np.bincount(mapping[present], minlength=int(mapping[present].max(initial=0)) + 1)
    out = np.zeros(len(sources), np.float32)
    single = sources[mapping[present]] == 1
    out[mapping[present][single]] = radius[present][single]
    h, w = labels.shape
    for value in np.flatnonzero(sources > 1).tolist():
        box = boxes[value - 1]
        rows = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, h))
        cols = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, w))
        part = labels[rows, cols]
        mine = part == value
        values = inner_depth(part)[mine]
        depth[rows, cols][mine] = values
        out[value] = values.max()
    out[0] = 0
    return depth, out


def inscribed_radius(labels: np.ndarray, depth: np.ndarray | None = None) -> np.ndarray:
    """float32 (n + 1,) radius (px) of the largest disc inside each label of labels (int (H, W),
    0 = background; index = label value, 0 for background and absent labels): the depth
    (inner_depth, or the one given) of its deepest pixel, so a piece is as thick as its own
    pixels make it, not as the object it was cut from."""
    labels = np.asarray(labels)
    depth = inner_depth(labels) if depth is None else depth
    where = np.flatnonzero(labels.ravel() != 0)
    radius = np.zeros(int(labels.max(initial=0)) + 1, np.float32)
    np.maximum.at(radius, labels.ravel()[where], depth.ravel()[where])
    radius[0] = 0
    return radius


def merge_fragments(
    labels: np.ndarray,
    cell_diameter_px: float,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
    thin: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Merge small or thin candidates into the touching neighbour they share most border with.

    labels: int32 (H, W) instance labels, 0 = background. compact: optional int array of the
    label values of compact (rounded) cells, found as such by their own seeds: small by
    nature, they are never merged away. thin: optional int array of label values merged like
    small ones whatever their area (pieces thinner than a cell body: processes, halo slivers;
    see inscribed_radius and min_thickness_scale). Returns (labels, n_merged): the
    merged labels renumbered 1..n in order of first appearance of their old numbers, and how
    many candidates were merged away. A chain of small pieces ends in the first piece that is
    not small (or in the largest of a group of small pieces that touch only each other).
    """
    labels = np.asarray(labels, np.int32)
    mapping, merged = fragment_map(labels, cell_diameter_px, rules, compact, thin)
    return (mapping[labels] if merged else labels), merged


def fragment_map(
    labels: np.ndarray,
    cell_diameter_px: float,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
    thin: np.ndarray | None = None,
    area: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """merge_fragments as a map: (mapping, n_merged), mapping int32 (n,) the new number of each
    old label value (0 for the background and absent values; the identity when none merged), so
    that merge_fragments(labels) is mapping[labels] and maps can be composed before relabelling
    the image once. area: int (labels.max() + 1,) pixel count of each label value when the
    caller has it (segmentation.filtered_by_area; area[0] is not read), else counted here."""
    labels = np.asarray(labels, np.int32)
    n = int(labels.max(initial=0)) + 1 if area is None else len(area)
    identity = np.arange(n, dtype=np.int32)
    if n <= 2:
        return identity, 0
    if area is None:
        flat = labels.ravel()
        area = np.bincount(flat[np.flatnonzero(flat != 0)], minlength=n)  # area[0] (background) stays 0
    else:
        area = np.asarray(area, np.int64).copy()
        area[0] = 0
    small = area < rules.fragment_area_scale * np.pi * cell_diameter_px**2 / 4
    if thin is not None and len(thin):
        small[np.asarray(thin)[(thin > 0) & (thin < n)]] = True
    small[0] = False
    if compact is not None and len(compact):
        small[np.asarray(compact)[(compact > 0) & (compact < n)]] = False
    if not small.any():
        return identity, 0
    first, second, length = _borders(labels)
    parent = np.arange(n)
    # every border from both sides, as (small piece a, neighbour b)
    a, b, length = np.r_[first, second], np.r_[second, first], np.r_[length, length]
    mine = small[a]
    a, b, length = a[mine], b[mine], length[mine]
    if len(a):
        # for each small piece: the neighbour with the longest shared border (ties: the larger
        # one, then the first listed); a stable sort by piece, length and size, first per piece
        order = np.lexsort((-area[b], -length, a))
        a, b = a[order], b[order]
        best = np.r_[True, a[1:] != a[:-1]]
        a, b = a[best], b[best]
        # a small piece never adopts a smaller one: the larger of two small pieces is the root
        adopt = ~(small[b] & (area[b] < area[a]))
        parent[a[adopt]] = b[adopt]

    def root(i: int) -> int:
        seen = 0
        while parent[i] != i and seen < n:
            i = parent[i]
            seen += 1
        return i

    roots = np.array([root(i) for i in range(n)])
    merged = int(np.count_nonzero(roots[1:] != np.arange(1, n)))
    if merged == 0:
        return identity, 0
    keep = np.unique(roots[1:][area[1:] > 0])
    renumber = np.zeros(n, np.int32)
    renumber[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return renumber[roots], merged


def _inner(labels: np.ndarray) -> np.ndarray:
    """bool (H, W): labelled pixels whose 4 neighbours in the image carry the same label."""
    if labels.size and labels.max() <= 65535 and labels.min() >= 0:
        # the minimum over the cross equals its maximum; OpenCV's erode/dilate ignore the image's
        # border as the neighbour tests below do, and run several times faster on uint16
        as16 = labels.astype(np.uint16)
        cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
        return (cv2.erode(as16, cross) == cv2.dilate(as16, cross)) & (as16 > 0)
    inner = labels > 0
    inner[:, 1:] &= labels[:, 1:] == labels[:, :-1]
    inner[:, :-1] &= labels[:, :-1] == labels[:, 1:]
    inner[1:] &= labels[1:] == labels[:-1]
    inner[:-1] &= labels[:-1] == labels[1:]
    return inner


def dark_joined_pairs(labels: np.ndarray, z: np.ndarray, level: float = 1.0) -> np.ndarray:
    """int64 (k, 2) pairs (a < b) of touching labels whose darkest parts are joined by a path
    below level: a watershed saddle below level between the two (level 1: one noise unit above
    the medium, the faintest seam that shows).

    labels: int (H, W) instance labels, 0 = background; z: float (H, W) image in background-noise
    units, 0 = the medium, dark negative. Each label's darkest part is the connected region
    (4-connected, within the label, off its edge pixels) of pixels below level that holds its
    darkest pixel. Two labels are joined when their darkest parts both reach one stretch of
    their shared border whose pixels are below level too (the path crosses the border
    once, straight: from the pixel two steps inside one label to the pixel two steps inside the
    other). In phase contrast two touching cells meet along a bright seam, the halos of their
    two membranes, so the brightest point of the best path between their bodies lies above the
    medium; two dark parts of one cell (the nucleus and granular cytoplasm, two clusters of
    granules) are joined through cytoplasm darker than the medium.
    """
    labels = np.asarray(labels)
    inner = _inner(labels)
    dark = z < level
    n_comp, comp = cv2.connectedComponents((inner & dark).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if n_comp <= 2:
        return np.zeros((0, 2), np.int64)
    where = np.flatnonzero(comp.ravel() != 0)
    cid = comp.ravel()[where]
    zmin = np.full(n_comp, np.inf, np.float32)
    np.minimum.at(zmin, cid, z.ravel()[where])
    owner = np.zeros(n_comp, np.int64)
    owner[cid] = labels.ravel()[where]
    # each label's darkest part: the component of its lowest minimum
    order = np.lexsort((zmin[1:], owner[1:])) + 1
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    deepest = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
    deepest[owner[order][first]] = order[first]
    # border pixels: each labelled pixel off its label's inner part, with its right and lower
    # neighbours (flat index + 1, + w) where those carry another label
    h, w = labels.shape
    flat, comp, dark = labels.ravel(), comp.ravel(), dark.ravel()
    edge = np.flatnonzero((labels > 0).ravel() & ~inner.ravel())
    col = edge % w
    n = np.int64(labels.max(initial=0)) + 1
    keys = []
    for step, room in ((1, (col >= 1) & (col < w - 2)), (w, (edge >= w) & (edge < (h - 2) * w))):
        p = edge[room]
        q = p + step
        lp, lq = flat[p].astype(np.int64), flat[q].astype(np.int64)
        cross = (lp != lq) & (lq > 0) & dark[p] & dark[q]
        p, q, lp, lq = p[cross], q[cross], lp[cross], lq[cross]
        ca, cb = comp[p - step], comp[q + step]
        hit = (ca > 0) & (cb > 0) & (deepest[lp] == ca) & (deepest[lq] == cb)
        keys.append(np.minimum(lp[hit], lq[hit]) * n + np.maximum(lp[hit], lq[hit]))
    key = np.unique(np.concatenate(keys))
    return np.stack([key // n, key % n], 1)


def typical_cell_area(areas: np.ndarray, cell_diameter_px: float, rules: QualityRules = QualityRules()) -> float:
    """The image's typical whole-cell area (px) from its candidates' areas (px, any order).

    As cell_size estimates a plate's cell diameter: the median equivalent diameter of the
    candidates at least fragment_area_scale cell areas big (pi d^2 / 4 of cell_diameter_px, the
    segmentation's scale) over FOUND_PER_TRUE_DIAMETER, from as few as MIN_TYPICAL of them (a
    median no one candidate decides); with fewer, one cell area at that scale. A small field of
    large cells holds few (a 696 x 520 tile about 7 cells of 128 px), and the scale, set by the
    cells' dark bodies, reads its whole cells at a third to half of their area (on U373-like tiles
    of the Usiigaci fields, 0.33-0.43x what the whole field's candidates read): their pieces
    then pass for cells. Cells are found at a scale set by their dark bodies, often well
    below the whole cell's outline (41 px against 61 px on the Usiigaci fields), so a rule on
    whole cells asks this, not the scale.
    """
    scale_area = np.pi * cell_diameter_px**2 / 4
    areas = np.asarray(areas)
    areas = areas[areas >= rules.fragment_area_scale * scale_area]
    if len(areas) < MIN_TYPICAL:
        return float(scale_area)
    return float(np.median(areas)) / FOUND_PER_TRUE_DIAMETER**2


def spread_typical_area(
    typical_area_px: float,
    areas: np.ndarray,
    compact: np.ndarray,
    cell_diameter_px: float,
    rules: QualityRules = QualityRules(),
) -> float:
    """The typical cell area (px) the line rule (dark_line_pieces) judges pieces against: the
    larger of typical_area_px (typical_cell_area of all the candidates) and typical_cell_area of
    the spread cells, areas (px) of the candidates labelled cell less those compact (bool, same
    length), when at least MIN_TYPICAL of them are as big as the fragment rule's least cell
    (fragment_area_scale cell areas at cell_diameter_px); else typical_area_px.

    Where large spread cells are found as pieces at a scale well below them, the pieces, specks
    and rounded bodies (the nuclei of spread cells, fine-seeded compact) among all the candidates
    pull their median down, and a piece of one of the field's larger cells passes for a cell of
    its own; compact cells are small by nature (a cell rounded up), so a typical whole spread
    cell leaves them out. Never smaller than typical_area_px: a field whose cells are mostly
    compact keeps its own typical cell.
    """
    areas = np.asarray(areas, np.float64)[~np.asarray(compact, bool)]
    sized = np.count_nonzero(areas >= rules.fragment_area_scale * np.pi * cell_diameter_px**2 / 4)
    if sized < MIN_TYPICAL:
        return float(typical_area_px)
    return max(float(typical_area_px), typical_cell_area(areas, cell_diameter_px, rules))


def _merged_on_samples(
    merge_map, labels: np.ndarray, z: np.ndarray, cell_diameter_px: float, rules: QualityRules, compact
) -> tuple[np.ndarray, np.ndarray]:
    """merge_dark_joined / merge_faint_seams on a whole label image: merge_map (dark_joined_map or
    faint_seam_map) run on every join_step-th pixel of labels and z, applied to labels."""
    labels = np.asarray(labels, np.int32)
    step = join_step(cell_diameter_px, rules)
    n = int(labels.max(initial=0)) + 1
    mapping, joined = merge_map(labels[::step, ::step], z[::step, ::step], n, cell_diameter_px, step, rules, compact)
    return (mapping[labels] if joined.any() else labels), joined


def _sampled_pairs(
    sampled: np.ndarray, z: np.ndarray, n: int, step: int, level: float, compact: np.ndarray | None, which
) -> tuple[np.ndarray, np.ndarray]:
    """(pairs, area): dark_joined_pairs of the sampled labels at level, less those of which
    `which` (np.any: either, np.all: both) is compact, and each label's area (px, its sampled
    pixels times step**2; int64 (n,))."""
    sampled = np.ascontiguousarray(sampled)
    pairs = dark_joined_pairs(sampled, np.ascontiguousarray(z), level)
    if compact is not None and len(compact):
        is_compact = np.zeros(n, bool)
        is_compact[np.asarray(compact)[(compact > 0) & (compact < n)]] = True
        pairs = pairs[~which(is_compact[pairs], axis=1)]
    flat = sampled.ravel()
    return pairs, np.bincount(flat[np.flatnonzero(flat != 0)], minlength=n) * step**2  # px, near enough


def _renumbered(roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mapping, joined) from roots (int (n,), each label's root label): the roots renumbered
    1..k in order of their old numbers, and how many labels were merged into each."""
    n = len(roots)
    keep_ids = np.unique(roots[1:])
    renumber = np.zeros(n, np.int32)
    renumber[keep_ids] = np.arange(1, len(keep_ids) + 1, dtype=np.int32)
    moved = roots != np.arange(n)
    return renumber[roots], np.bincount(renumber[roots[moved]], minlength=len(keep_ids) + 1)


def merge_dark_joined(
    labels: np.ndarray,
    z: np.ndarray,
    cell_diameter_px: float,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge touching candidates joined by dark cytoplasm (no bright seam) into one cell.

    labels: int32 (H, W) instance labels, 0 = background; z: float (H, W) image in
    background-noise units (0 = the medium, dark negative); compact: optional int array of the
    label values of compact (rounded) cells, which touch as solid dark discs and are never
    merged. A candidate is merged into a touching one when the two are dark_joined_pairs at
    join_level (their darkest parts joined by a path that never rises more than the noise above
    the medium: no seam between them) and it is the smaller of the two and at most join_area_scale times the image's
    typical cell area (typical_cell_area: one dark part of a large spread cell, not a second
    cell of its own); among several such neighbours, into the largest, and a chain of pieces
    ends in its largest. The test runs on every join_pixel_scale d-th pixel (a seam between two
    cells is wider; the areas compared are those of the sampled pixels). Returns (labels,
    joined): labels renumbered in order of their old numbers (1..n when the old ones were), and
    joined, int64 (n + 1,), how many candidates were merged into each label.
    """
    return _merged_on_samples(dark_joined_map, labels, z, cell_diameter_px, rules, compact)


def join_step(cell_diameter_px: float, rules: QualityRules = QualityRules()) -> int:
    """The pixel step (px) of the dark-join test: join_pixel_scale cell diameters, at least 1."""
    return max(1, int(cell_diameter_px * rules.join_pixel_scale))


def dark_joined_map(
    sampled: np.ndarray,
    z: np.ndarray,
    n: int,
    cell_diameter_px: float,
    step: int,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """merge_dark_joined as a map, from the labels and z sampled on every step-th pixel (join_step)
    and n, one more than the largest label value of the whole image: (mapping, joined), mapping
    int32 (n,) the new number of each old label value (0 for the background; the identity, with
    joined all 0, when none is merged), so that merge_dark_joined(labels) is mapping[labels]."""
    identity = np.arange(n, dtype=np.int32)
    none = np.zeros(n, np.int64)
    if n <= 2:
        return identity, none
    # on every step-th pixel: a seam between two cells is wider, and the areas only need to be
    # compared with a typical cell's
    pairs, area = _sampled_pairs(sampled, z, n, step, rules.join_level, compact, np.any)
    if len(pairs) == 0:
        return identity, none
    a, b = pairs[:, 0], pairs[:, 1]
    small, large = np.where(area[a] <= area[b], a, b), np.where(area[a] <= area[b], b, a)
    keep = area[small] <= rules.join_area_scale * typical_cell_area(area[1:], cell_diameter_px, rules)
    small, large = small[keep], large[keep]
    if len(small) == 0:
        return identity, none
    order = np.lexsort((-area[large], small))  # per small piece: its largest joined neighbour first
    small, large = small[order], large[order]
    best = np.r_[True, small[1:] != small[:-1]]
    parent = np.arange(n)
    parent[small[best]] = large[best]  # a piece always points to a larger one: no cycles
    roots = parent.copy()
    while True:
        nxt = parent[roots]
        if np.array_equal(nxt, roots):
            break
        roots = nxt
    return _renumbered(roots)


def merge_faint_seams(
    labels: np.ndarray,
    z: np.ndarray,
    cell_diameter_px: float,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge touching candidates parted by no clear seam that together are no bigger than two typical cells.

    labels: int32 (H, W) instance labels, 0 = background; z: float (H, W) image in
    background-noise units (0 = the medium, dark negative). Two touching candidates whose darkest
    parts are joined by a path that stays below seam_level (dark_joined_pairs at seam_level: 2
    noise units above the medium, so the path crosses no seam that stands clear of the noise, let
    alone a halo, 3 or more) are one cell when their areas summed are at most seam_area_scale
    times the image's typical cell area (typical_cell_area). The dark-joined rule (join_level,
    1 noise unit) merges a piece into a neighbour whatever their union; this one lets the path
    rise one noise unit more but asks the pair to be small together. Two whole touching cells are
    each about as big as a cell is found (the typical cell with its halo, FOUND_PER_TRUE_DIAMETER
    ** 2 = 1.44 typical cells), so together well above two typical cells; the head and tail of
    one long cell, or its nucleus and its spread lamella, found apart, share one cell's area.
    compact: optional int array of the label values of compact (rounded) cells; two of them are
    never merged (small rounded cells touch as dark discs with little halo between them), but one
    is merged with a piece that is not: on the Usiigaci fields a third of the candidates are
    fine-seeded compact bodies, mostly the nuclei of spread cells. A candidate cut by the image's
    border shows only part of its cell, so its area says nothing: it is never merged here (two
    T98G cells cut by the border were). Pairs are merged smallest union
    first, and a group stops growing at the limit. Like merge_dark_joined, the test runs on every
    join_step-th pixel. Returns (labels, joined): labels renumbered in order of their old numbers
    (1..n when the old ones were), and joined, int64 (n + 1,), how many candidates were merged
    into each label.
    """
    return _merged_on_samples(faint_seam_map, labels, z, cell_diameter_px, rules, compact)


def faint_seam_map(
    sampled: np.ndarray,
    z: np.ndarray,
    n: int,
    cell_diameter_px: float,
    step: int,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """merge_faint_seams as a map, from the labels and z sampled on every step-th pixel
    (join_step) and n, one more than the largest label value of the whole image: (mapping,
    joined), mapping int32 (n,) the new number of each old label value (0 for the background;
    the identity, with joined all 0, when none is merged), joined int64 (k + 1,) how many old
    labels were merged into each new one, so that merge_faint_seams(labels) is mapping[labels]."""
    identity = np.arange(n, dtype=np.int32)
    none = np.zeros(n, np.int64)
    if n <= 2:
        return identity, none
    pairs, area = _sampled_pairs(sampled, z, n, step, rules.seam_level, compact, np.all)
    # a candidate cut by the image's border shows only part of its cell: its area says nothing
    cut = np.zeros(n, bool)
    cut[np.concatenate([sampled[0], sampled[-1], sampled[:, 0], sampled[:, -1]])] = True
    cut[0] = False
    pairs = pairs[~(cut[pairs[:, 0]] | cut[pairs[:, 1]])]
    limit = rules.seam_area_scale * typical_cell_area(area[1:], cell_diameter_px, rules)
    union = area[pairs[:, 0]] + area[pairs[:, 1]]
    order = np.argsort(union, kind="stable")
    order = order[union[order] <= limit]
    if len(order) == 0:
        return identity, none
    groups = DisjointSet(range(n))
    total = area.astype(np.float64)  # each group's area, kept at its root
    for a, b in pairs[order].tolist():
        ra, rb = groups[a], groups[b]
        if ra != rb and total[ra] + total[rb] <= limit:
            groups.merge(a, b)
            total[groups[a]] = total[ra] + total[rb]
    roots = np.array([groups[i] for i in range(n)])
    return _renumbered(roots)


def dark_line_pieces(
    labels: np.ndarray,
    cells: pd.DataFrame,
    z: np.ndarray,
    cell_diameter_px: float,
    typical_area_px: float,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
) -> np.ndarray:
    """bool per row of cells: True for a candidate that is a piece of a larger touching one, the
    two bodies joined along the straight line between them by a path that crosses no halo.

    labels: int (H, W) instance labels, 0 = background; cells: cell_id, x, y (px, the centre of
    each candidate's dark body, body_centres) and area (px, the whole object), the candidates
    judged (a pair with a label not in cells is not looked at); z: float (H, W) image in
    background-noise units (0 = the medium, dark negative); cell_diameter_px: the segmentation's
    scale d; typical_area_px: the image's typical cell area (typical_cell_area, px; find_candidates
    passes spread_typical_area, the larger of that of all its candidates and that of the spread
    cells among those labelled cell); compact:
    bool per row of cells, True for compact (rounded) cells, or None (none is). For two
    touching candidates (sharing a border on the grid of every join_step-th pixel), z smoothed
    by a Gaussian of line_smooth_scale diameters is read on a corridor along the straight line
    between their centres: 1 px steps along the line, less line_end_share of it at each end (the
    ends lie in the bodies themselves, whose bright granules and vacuoles are their own), and
    1 px steps across it, up to line_corridor_scale diameters to either side (bilinear). Where a
    path inside the corridor and inside the two candidates (8-connected) runs from one end to
    the other without rising above line_level (3 noise units, segmentation's halo level; the
    straight line itself is one such path) and the smaller of the two holds at most
    line_area_scale typical cell areas, the smaller is a piece of the larger. In phase contrast
    every cell is ringed by its bright halo, so any path from the body of one cell to the body of
    a touching one crosses both membranes and the bright seam between them, a ridge that runs
    across the whole corridor; two dark parts of one spread cell (its nucleus and a granular
    patch, the head and tail of a long cell) are joined through cytoplasm, whose bright granules
    and vacuoles are spots a path passes beside. Two compact cells are never judged so: small
    rounded cells touch as dark discs with little halo between them (as in merge_faint_seams).
    The piece is labelled, not merged, so the larger keeps its centre. Raises nothing; an empty
    or one-row cells gives all False.
    """
    out = np.zeros(len(cells), bool)
    if len(cells) < 2:
        return out
    step = join_step(cell_diameter_px, rules)
    a, b, _ = _borders(np.ascontiguousarray(labels[::step, ::step]))
    ids = cells["cell_id"].to_numpy()
    n = max(int(labels.max(initial=0)), int(ids.max(initial=0))) + 1
    row = np.full(n, -1)
    row[ids] = np.arange(len(cells))
    keep = (row[a] >= 0) & (row[b] >= 0)
    ra, rb = row[a[keep]], row[b[keep]]
    area = cells["area"].to_numpy(float)
    small = np.where(area[ra] <= area[rb], ra, rb)
    large = np.where(area[ra] <= area[rb], rb, ra)
    keep = area[small] <= rules.line_area_scale * typical_area_px
    if compact is not None:
        compact = np.asarray(compact, bool)
        keep &= ~(compact[small] & compact[large])
    small, large = small[keep], large[keep]
    if len(small) == 0:
        return out
    x, y = cells["x"].to_numpy(float), cells["y"].to_numpy(float)
    h, w = z.shape
    half = int(np.ceil(rules.line_corridor_scale * cell_diameter_px))
    across = np.arange(-half, half + 1, dtype=np.float32)
    corridors = []
    for i, j in zip(small.tolist(), large.tolist(), strict=True):
        length = np.hypot(x[j] - x[i], y[j] - y[i])
        t = np.linspace(rules.line_end_share, 1 - rules.line_end_share, int(np.ceil(length)) + 1)
        # the line's pixels (as a straight line is read), and the corridor's points beside them
        # along the line's unit normal
        cols = np.clip(np.rint(x[i] + (x[j] - x[i]) * t), 0, w - 1).astype(np.float32)
        rows = np.clip(np.rint(y[i] + (y[j] - y[i]) * t), 0, h - 1).astype(np.float32)
        nx, ny = (-(y[j] - y[i]) / length, (x[j] - x[i]) / length) if length > 0 else (0.0, 0.0)
        px = np.clip(cols[:, None] + np.float32(nx) * across[None, :], 0, w - 1)
        py = np.clip(rows[:, None] + np.float32(ny) * across[None, :], 0, h - 1)
        corridors.append((i, j, py, px))
    z = z.astype(np.float32, copy=False)
    sigma = rules.line_smooth_scale * cell_diameter_px
    # OpenCV's kernel half-width for this sigma (float images), and a pixel more for the bilinear reads
    pad = (int(round(sigma * 8 + 1)) | 1) // 2 + 1
    boxes = [
        (
            max(int(py.min()) - pad, 0),
            min(int(np.ceil(py.max())) + pad + 1, h),
            max(int(px.min()) - pad, 0),
            min(int(np.ceil(px.max())) + pad + 1, w),
        )
        for _, _, py, px in corridors
    ]
    whole = None
    if sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in boxes) > h * w // 2:
        whole = cv2.GaussianBlur(z, (0, 0), sigma)
    for (i, j, py, px), (r0, r1, c0, c1) in zip(corridors, boxes, strict=True):
        # smoothed around the corridor alone (the same values as the whole image smoothed: the
        # box holds every pixel the kernel reaches from it, and every pixel a bilinear read needs)
        part = whole[r0:r1, c0:c1] if whole is not None else cv2.GaussianBlur(z[r0:r1, c0:c1], (0, 0), sigma)
        strip = cv2.remap(part, px - c0, py - r0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        below = strip <= rules.line_level
        if below[:, half].all():  # the straight line itself
            out[i] = True
            continue
        # the path stays inside the two candidates: beside a short contact the corridor reaches
        # into the medium, which lies below the halo level too
        own = labels[r0:r1, c0:c1]
        pair = ((own == ids[i]) | (own == ids[j])).astype(np.uint8)
        below &= cv2.remap(pair, px - c0, py - r0, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE) > 0
        below = below.astype(np.uint8)
        _, comp = cv2.connectedComponents(below, connectivity=8)
        first, last = comp[0][comp[0] > 0], comp[-1][comp[-1] > 0]
        if len(first) and len(last) and np.intersect1d(first, last).size:
            out[i] = True
    return out


def labelled_pixels(
    labels: np.ndarray, z: np.ndarray | None, rules: QualityRules = QualityRules()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(where, label, dark) of the labelled pixels of labels (int (H, W), 0 = background):
    their flat indices (intp), their labels (labels' dtype) and whether each is darker than
    -dark_level in z (float (H, W), noise units; all True without z). quality_measures and
    body_centres both read them."""
    where = np.flatnonzero(labels.ravel() != 0)  # on a bool array: several times faster
    dark = np.ones(len(where), bool) if z is None else z.ravel()[where] < -rules.dark_level
    return where, labels.ravel()[where], dark


def quality_measures(
    labels: np.ndarray,
    z: np.ndarray,
    tex: np.ndarray,
    texture_threshold: float,
    cells: pd.DataFrame,
    cell_diameter_px: float,
    rules: QualityRules = QualityRules(),
    radius: np.ndarray | None = None,
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Per-candidate quality measures, one row per row of cells (same order).

    labels: int32 (H, W) instance labels; z: float32 (H, W) image in background-noise units
    (dark negative); tex: float32 (H, W) local standard deviation; texture_threshold: the
    foreground's texture threshold (same units as tex); cells: cell_id, x, y, area (px).
    Columns: qc_area_ratio (area / pi d^2 / 4), qc_dark_fraction (share of pixels darker than
    -dark_level), qc_halo_strength (mean z on a ring two pixels wide just outside, noise
    units), qc_texture_contrast (mean tex inside / texture_threshold), qc_nearest_cell_px
    (gap to the nearest other candidate's pixels, px; inf when alone in the image) and
    qc_thickness (inscribed_radius, d). radius: inscribed_radius(labels) when already computed.
    pixels: labelled_pixels(labels, z, rules) when already computed.
    """
    where, label, is_dark = labelled_pixels(labels, z, rules) if pixels is None else pixels
    n = int(label.max(initial=0)) + 1
    count = np.maximum(np.bincount(label, minlength=n), 1)
    dark = np.bincount(label[is_dark], minlength=n) / count
    texture = np.bincount(label, weights=tex.ravel()[where], minlength=n) / count / max(float(texture_threshold), 1e-9)
    # the ring just outside each candidate: where a 5 x 5 maximum of the labels reaches the medium
    as_image = labels.astype(np.uint16 if n <= 65536 else np.float32)  # OpenCV dilates neither int32
    reach = cv2.dilate(as_image, np.ones((5, 5), np.uint8))
    ring = np.flatnonzero((reach != as_image) & (as_image == 0))  # outside every candidate, within 2 px of one
    owner = reach.ravel()[ring].astype(np.int64)
    halo = np.bincount(owner, weights=z.ravel()[ring], minlength=n) / np.maximum(np.bincount(owner, minlength=n), 1)
    gap = _nearest_gap(labels, cells, n)
    cell_ids = cells["cell_id"].to_numpy()
    return pd.DataFrame(
        {
            "qc_area_ratio": cells["area"].to_numpy(float) / (np.pi * cell_diameter_px**2 / 4),
            "qc_dark_fraction": dark[cell_ids],
            "qc_halo_strength": halo[cell_ids],
            "qc_texture_contrast": texture[cell_ids],
            "qc_nearest_cell_px": gap,
            "qc_thickness": (inscribed_radius(labels) if radius is None else radius)[cell_ids] / cell_diameter_px,
        },
        index=cells.index,
    )


def _nearest_gap(labels: np.ndarray, cells: pd.DataFrame, n: int | None = None) -> np.ndarray:
    """Per candidate (cells order): the gap in px to the nearest pixel of another candidate.

    Every pixel gets its nearest candidate and the distance to it (a Voronoi split of the
    field, at a quarter of the resolution: the gap feeds a rule on the scale of half a cell
    diameter, where 4 px do not matter); where the regions of two candidates meet, their gap is
    the two distances summed.
    inf for a candidate alone in the image. n: labels.max() + 1 when the caller knows it.
    """
    out = np.full(len(cells), np.inf)
    n = int(labels.max(initial=0)) + 1 if n is None else n
    if len(cells) < 2:
        return out
    from gbm_assets.imaging.segmentation import voronoi  # here: segmentation imports this module

    owner, dist = voronoi(np.ascontiguousarray(labels[::4, ::4]))
    gap = np.full(n, np.inf)
    for a, b, da, db in (
        (owner[:, :-1], owner[:, 1:], dist[:, :-1], dist[:, 1:]),
        (owner[:-1], owner[1:], dist[:-1], dist[1:]),
    ):
        meet = (a != b) & (a > 0) & (b > 0)
        total = 4.0 * (da[meet] + db[meet]).astype(np.float64)
        np.minimum.at(gap, a[meet], total)
        np.minimum.at(gap, b[meet], total)
    return gap[cells["cell_id"].to_numpy()]


def specks(
    outline: pd.DataFrame, area_ratio: np.ndarray, compact: np.ndarray, rules: QualityRules = QualityRules()
) -> np.ndarray:
    """bool per row: candidates whose outline is too small for a cell of this image.

    outline: per candidate (same rows as area_ratio) the AreaShape measures of its outline, the
    object less the halo rim that texture adds around it (measurements.measure_objects): area
    (px), eccentricity, solidity; area_ratio: float, the whole object's area in cell areas of
    the scale (qc_area_ratio); compact: bool, compact (rounded) cells. A candidate whose outline
    holds under min_outline_scale times the median outline of the image's cell-sized candidates
    (whole object at least fragment_area_scale cell areas, as typical_cell_area counts them;
    at least MIN_TYPICAL of them, else none is a speck) is mostly halo: a speck of debris, a
    floating particle ringed by its halo, a thin fibre or a sliver of a cell's edge; unless it is
    a compact cell whose outline is round (eccentricity at most round_eccentricity) and convex
    (solidity at least round_solidity), as a cell rounded up to divide or to detach is. The
    tiny rule (min_typical_area_scale) judges the whole object, halo included, and spares every
    compact cell: a dark rod or a ringed particle has a large halo and a compact fine seed.
    """
    oa = outline["area"].to_numpy(float)
    counted = np.asarray(area_ratio) >= rules.fragment_area_scale
    if counted.sum() < MIN_TYPICAL:
        return np.zeros(len(oa), bool)
    small = oa < rules.min_outline_scale * float(np.median(oa[counted]))
    rounded = (outline["eccentricity"].to_numpy(float) <= rules.round_eccentricity) & (
        outline["solidity"].to_numpy(float) >= rules.round_solidity
    )
    return small & ~(np.asarray(compact, bool) & rounded)


PALE_MEASURES = ("qc_dark_fraction", "qc_texture_contrast", "qc_thickness")
RINGED_MEASURES = ("qc_halo_strength", "qc_area_ratio")


def pale_outliers(measures: pd.DataFrame, is_cell: np.ndarray, rules: QualityRules = QualityRules()) -> np.ndarray:
    """bool per row: cells far paler, fainter and thinner than the image's own cells.

    measures: quality_measures' table; is_cell: bool per row, the candidates labelled cell so
    far, the image's own population (only they can be flagged). Each of PALE_MEASURES
    (dark-body fraction, texture contrast, thickness) becomes a robust z-score against that
    population (its median and 1.4826 x its median absolute deviation; a measure whose deviation
    is 0 counts 0), counted down to -pale_clip (2) at most, and a cell whose three summed lie
    below pale_level (-4) is flagged: all three low together (two at the clip and the third at
    the cells' median, or each 1.33 deviations below it). In phase contrast a living cell's thick
    body is dark and grainy; flat pale debris lying on the surface, out-of-focus material, dark
    fibres and pieces of halo are little darker than the medium, smooth and thin. One measure
    alone does not carry the verdict: a rounded, phase-bright cell has no dark body at all, and
    a minority cell type (the synthetic plates' small round cells and clumps) lies far out on one
    or two measures (unclipped, a sum under -3.5 cut synthetic c4000 recall 0.904 -> 0.893).
    None is flagged with fewer than MIN_CELLS cells (no population to judge against). On the 24
    Usiigaci fields (production path) detections 1,631 -> 1,599: 31 false fewer (17 far from any
    annotated cell, 8 second detections in one, 6 near one) and 1 true.

    A second tier, ringed pale, flags the moderately pale too: the same (clipped) sum under
    ringed_level (-3), each of the three z-scores under ringed_each (-0.25: all three below the
    cells' level, none carried by the other two), when the ring just outside (qc_halo_strength)
    is at least as bright as the cells' median ring (robust z >= 0) and the area's robust z-score
    is at least ringed_min_area (-1.5). A pale, smooth, thin patch ringed like a cell is a gap
    enclosed by cells' halos or a pale piece of one; a small cell rounded up or pressed in a clump
    (the synthetic plates' minority, pale for want of a dark body) has a weaker ring than the
    image's spread cells or a far smaller area, and is spared. On the 24 Usiigaci fields
    (production path) detections 1,599 -> 1,575: 20 false fewer (second 119 -> 112, near 57 -> 55,
    far 79 -> 68), 4 true.
    """
    is_cell = np.asarray(is_cell, bool)
    if is_cell.sum() < MIN_CELLS:
        return np.zeros(len(measures), bool)
    z = {column: _robust_z(measures[column].to_numpy(float), is_cell) for column in (*PALE_MEASURES, *RINGED_MEASURES)}
    low = np.stack([np.maximum(z[column], -rules.pale_clip) for column in PALE_MEASURES])
    total = low.sum(axis=0)
    ringed = (
        (total < rules.ringed_level)
        & (low.max(axis=0) < rules.ringed_each)
        & (z["qc_halo_strength"] >= 0)
        & (z["qc_area_ratio"] >= rules.ringed_min_area)
    )
    return is_cell & ((total < rules.pale_level) | ringed)


def _robust_z(x: np.ndarray, population: np.ndarray) -> np.ndarray:
    """Robust z-scores of x against x[population]: (x - median) / (1.4826 x median absolute
    deviation); all 0 where that deviation is 0 (no spread to judge against)."""
    centre = float(np.median(x[population]))
    spread = 1.4826 * float(np.median(np.abs(x[population] - centre)))
    return (x - centre) / spread if spread > 0 else np.zeros(len(x))


def label_quality(
    measures: pd.DataFrame,
    centres_usable: np.ndarray,
    cell_diameter_px: float,
    rules: QualityRules = QualityRules(),
    compact: np.ndarray | None = None,
    centres_inside: np.ndarray | None = None,
    typical_area_px: float | None = None,
    border_cut: np.ndarray | None = None,
    outline: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """qc label and qc_reason per candidate from its measures (see module docstring).

    measures: quality_measures' table; centres_usable: bool per row, True when the centre lies
    on culture surface; compact: bool per row, True for compact (rounded) cells, which are
    small by nature and never called fragments; centres_inside: bool per row, False when the
    candidate's centre (centroid) lies off its own pixels or at their edge (see
    centres_inside; None: all inside); typical_area_px: the image's typical cell area
    (typical_cell_area, px; None: no rule on it); border_cut: bool per row, True when the
    candidate is cut by the image's border and reaches less than min_cut_reach_scale times a
    typical cell's radius into the field (within_border_frame; None: none is), which is labelled
    edge when it also holds less than min_cut_area_scale of a typical cell (typical_area_px
    given); outline: per row, the AreaShape measures (area, eccentricity, solidity) of the
    candidate's outline, the object less its halo rim (None: no rule on it), for specks (with
    typical_area_px given, not in a crowded field). Returns a DataFrame with columns qc (one of
    QC_LABELS) and qc_reason.
    """
    compact = np.zeros(len(measures), bool) if compact is None else np.asarray(compact, bool)
    area = measures["qc_area_ratio"].to_numpy()
    gap = measures["qc_nearest_cell_px"].to_numpy()
    texture = measures["qc_texture_contrast"].to_numpy()
    thickness = measures["qc_thickness"].to_numpy() if "qc_thickness" in measures else np.full(len(measures), np.inf)
    thin = thickness < rules.min_thickness_scale
    hollow = np.zeros(len(measures), bool) if centres_inside is None else ~np.asarray(centres_inside, bool)
    alone = gap > rules.isolation_scale * cell_diameter_px
    scale_area = np.pi * cell_diameter_px**2 / 4
    tiny = np.zeros(len(measures), bool)
    if typical_area_px is not None:
        tiny = (area * scale_area < rules.min_typical_area_scale * typical_area_px) & ~compact
    speck = np.zeros(len(measures), bool)
    if typical_area_px is not None and outline is not None:
        speck = specks(outline, area, compact, rules)
    cut = np.zeros(len(measures), bool)
    if typical_area_px is not None and border_cut is not None:
        cut = np.asarray(border_cut, bool) & (area * scale_area < rules.min_cut_area_scale * typical_area_px)
    qc = np.full(len(measures), "cell", dtype=object)
    reason = np.full(len(measures), "", dtype=object)
    rules_in_order = (
        (~centres_usable, "edge", "centre outside the culture surface (well edge, wall or glare)"),
        (
            (area < rules.debris_area_scale) & alone,
            "debris",
            f"smaller than {rules.debris_area_scale:g} cell areas with no neighbour within {rules.isolation_scale:g} diameters",
        ),
        (texture < rules.min_texture_contrast, "debris", "too faint: texture below the foreground threshold"),
        (
            thin & alone,
            "debris",
            f"thinner than a cell body (inscribed radius under {rules.min_thickness_scale:g} diameters), alone",
        ),
        (
            thin,
            "fragment",
            f"thinner than a cell body (inscribed radius under {rules.min_thickness_scale:g} diameters): a process or a sliver of halo",
        ),
        (
            hollow & alone,
            "debris",
            "its centre lies off or at the edge of its own pixels (a crescent or ring, not a cell body), alone",
        ),
        (
            hollow,
            "fragment",
            "its centre lies off or at the edge of its own pixels: a crescent of halo or a ring around a neighbour",
        ),
        (
            (area < rules.fragment_area_scale) & ~compact,
            "fragment",
            f"smaller than {rules.fragment_area_scale:g} cell areas, next to other candidates",
        ),
        (
            tiny & alone,
            "debris",
            f"smaller than {rules.min_typical_area_scale:g} of a typical cell of this image, alone",
        ),
        (
            tiny,
            "fragment",
            f"smaller than {rules.min_typical_area_scale:g} of a typical cell of this image, next to other candidates",
        ),
        (
            cut,
            "edge",
            f"cut by the image's border, reaching less than {rules.min_cut_reach_scale:g} typical cell radius into the field "
            f"with less than {rules.min_cut_area_scale:g} of a typical cell in view: its centre lies outside it",
        ),
        (
            speck & alone,
            "debris",
            f"its outline (less the halo) under {rules.min_outline_scale:g} of this image's cells' and not a round compact cell, alone",
        ),
        (
            speck,
            "fragment",
            f"its outline (less the halo) under {rules.min_outline_scale:g} of this image's cells' and not a round compact cell, next to other candidates",
        ),
    )
    decided = np.zeros(len(measures), bool)
    for hit, label, why in rules_in_order:
        now = hit & ~decided
        qc[now], reason[now] = label, why
        decided |= now
    return pd.DataFrame({"qc": qc, "qc_reason": reason}, index=measures.index)


def within_border_frame(labels: np.ndarray, cells: pd.DataFrame, width_px: float) -> np.ndarray:
    """bool per row of cells (cell_id, area in px): True when that label of labels (int (H, W),
    0 = background) touches the image's border and all its pixels lie within width_px of it
    (on the frame of that width around the image): it reaches less than width_px into the field.

    Counts each label's pixels on the frame alone (a small share of the image) and compares the
    count with its area."""
    labels = np.asarray(labels)
    h, w = labels.shape
    ids = cells["cell_id"].to_numpy()
    k = int(np.ceil(width_px))
    n = max(int(labels.max(initial=0)), int(ids.max(initial=0))) + 1
    rim = np.zeros(n, bool)
    rim[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    rim[0] = False
    if 2 * k >= min(h, w):  # the frame covers the image
        return rim[ids]
    frame = np.concatenate(
        [labels[:k].ravel(), labels[h - k :].ravel(), labels[k : h - k, :k].ravel(), labels[k : h - k, w - k :].ravel()]
    )
    on_frame = np.bincount(frame, minlength=n)
    return rim[ids] & (on_frame[ids] >= cells["area"].to_numpy())


def body_centres(
    labels: np.ndarray,
    cells: pd.DataFrame,
    rules: QualityRules = QualityRules(),
    depth: np.ndarray | None = None,
    z: np.ndarray | None = None,
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """cells (cell_id, x, y in px) with x, y moved to the centre of each candidate's body.

    The body is the candidate's dark part where it is thickest: its pixels of labels (int
    (H, W)) darker than -dark_level in z (float (H, W), noise units, dark negative; phase
    contrast shows a cell's body darker than the medium, its halo and lamellipodia brighter)
    that lie at least body_depth times as deep (inner_depth, or the depth given) as its deepest
    such pixel. Without z, or for a candidate with no dark pixel, all its pixels count. Thin
    processes, lamellipodia and the halo ring pull a spread cell's centroid off its body, often
    into the medium; its body's centre stays on it. For a compact, convex cell the two are the
    same point to a pixel or two. pixels: labelled_pixels(labels, z, rules) when already
    computed."""
    depth = inner_depth(labels) if depth is None else depth
    where, label, dark = labelled_pixels(labels, z, rules) if pixels is None else pixels
    ids = cells["cell_id"].to_numpy()
    # (labels' largest value from its labelled pixels: a pass over them, not over the image)
    n = max(int(label.max(initial=0)), int(ids.max(initial=0)), 0) + 1
    deep = depth.ravel()[where]
    has_dark = np.bincount(label[dark], minlength=n) > 0
    body = dark | ~has_dark[label]  # its dark pixels, or all of them when it has none
    radius = np.zeros(n, np.float32)
    np.maximum.at(radius, label[body], deep[body])
    core = body & (deep >= rules.body_depth * radius[label])
    rows, cols = np.divmod(where[core], labels.shape[1])
    in_core = label[core]
    count = np.bincount(in_core, minlength=n)[ids]
    found = count > 0  # a label absent from labels keeps its x, y
    x = np.where(found, np.bincount(in_core, cols, n)[ids] / np.maximum(count, 1), cells["x"].to_numpy(float))
    y = np.where(found, np.bincount(in_core, rows, n)[ids] / np.maximum(count, 1), cells["y"].to_numpy(float))
    return cells.assign(x=x, y=y)


def centres_inside(
    labels: np.ndarray,
    cells: pd.DataFrame,
    rules: QualityRules = QualityRules(),
    depth: np.ndarray | None = None,
    radius: np.ndarray | None = None,
) -> np.ndarray:
    """bool per row of cells (cell_id, x, y in px): True when the candidate's centre lies on its
    own pixels of labels (int (H, W)) at least min_centre_depth times its inscribed radius deep.
    A cell body is roughly convex and holds its centre well inside; the centre of a crescent of
    halo hugging a cell, of a ring or of a piece bent around a neighbour lies at or off its edge.
    depth, radius: inner_depth(labels), inscribed_radius(labels) when already computed."""
    ids = cells["cell_id"].to_numpy()
    h, w = labels.shape
    rows = np.clip(np.rint(cells["y"].to_numpy()).astype(int), 0, h - 1)
    cols = np.clip(np.rint(cells["x"].to_numpy()).astype(int), 0, w - 1)
    depth = inner_depth(labels) if depth is None else depth
    radius = inscribed_radius(labels, depth) if radius is None else radius
    return (labels[rows, cols] == ids) & (depth[rows, cols] >= rules.min_centre_depth * radius[ids])


def kept_candidates(coordinates: pd.DataFrame, keep_qc: Iterable[str] = ("cell",)) -> pd.DataFrame:
    """The rows of a coordinates table whose qc label is in keep_qc (the rows cell_crops crops).

    A table written before quality labels existed (no qc column) counts as all cells.
    """
    if "qc" not in coordinates:
        return coordinates.assign(qc="cell")
    return coordinates[coordinates["qc"].isin(list(keep_qc))]
