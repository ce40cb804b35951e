"""Synthetic phase-contrast plates: the embedded demo data set and ground truth for cell finding.

The lab data cannot ship with the project and has no per-cell truth. These images imitate phase
contrast (mid-grey background with uneven illumination and noise, cells darker than it with
bright halos, textured bodies, a few artefacts) while every cell, its morphotype and every
culture's morphotype mixture are known, so cell finding and clustering can be scored.

Optics in one line: each cell adds optical thickness to a phase map; the image is the
illumination times (1 - high-pass(phase)), which darkens cell bodies and edges and leaves a bright
halo outside them, as a phase-contrast microscope does. Pure NumPy/OpenCV/tifffile, and every
image is a function of its seed.

Two difficulties. "easy" (generator version 1's drawing): every plate shares one exposure and
focus, each morphotype has its own brightness and texture, and cells are scattered at random.
"hard" adds the nuisances real plates have: each plate draws its own exposure, illumination
field, vignetting, focus (defocus blur, halo width) and noise (PlateConditions), so a feature
that recognises a plate's look can tell plates apart without any morphology; cells vary in size
(x0.8-1.25) within a morphotype; half the single cells settle beside a single cell already
placed, so neighbours enter a 128-px crop (a clump already is a group of neighbours); and all morphotypes share one optical thickness and texture
(no refractile rim), so they differ in shape (outline, size, dome or flat profile, clumping)
rather than in brightness.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile

from gbm_assets.imaging.plates import MANIFEST_COLUMNS, MANIFEST_NAME, check_plate_id

MORPHOTYPES = ("small_round", "large_flat", "fusiform", "multipolar", "clump")
CULTURES = tuple(f"GBM{i:02d}" for i in range(1, 11))
# Each culture is dominated by one or two morphotypes; any two differ by >= 0.4 in L1 distance.
_MIXTURE_ROWS = (
    (0.10, 0.50, 0.15, 0.15, 0.10),
    (0.10, 0.15, 0.50, 0.15, 0.10),
    (0.10, 0.15, 0.15, 0.50, 0.10),
    (0.30, 0.10, 0.10, 0.10, 0.40),
    (0.45, 0.20, 0.15, 0.10, 0.10),
    (0.05, 0.40, 0.35, 0.15, 0.05),
    (0.05, 0.10, 0.15, 0.40, 0.30),
    (0.15, 0.05, 0.40, 0.35, 0.05),
    (0.20, 0.30, 0.05, 0.05, 0.40),
    (0.20, 0.20, 0.20, 0.20, 0.20),
)
CULTURE_MIXTURES = {
    c: dict(zip(MORPHOTYPES, row, strict=False)) for c, row in zip(CULTURES, _MIXTURE_ROWS, strict=False)
}
CONCENTRATIONS = ("250", "500", "1000", "2000", "4000")
# Mean cells per 1024x1024 field, log-spaced like the plating dilutions; scaled by area.
CELLS_PER_FIELD = dict(zip(CONCENTRATIONS, (10, 18, 33, 60, 110), strict=False))
FIELD_SIZE = 1024

EMPTY_FIELD_RATE = 0.04  # images with no cells at all (artefacts only)
SCRATCH_RATE = 0.15
RIPPLE_RATE = 0.15
GHOSTS_PER_FIELD = 0.8  # out-of-focus cells, Poisson mean per 1024x1024 field
DEBRIS_PER_FIELD = 30  # tiny dark specks on the dish

GROUND_TRUTH_NAME = "ground_truth.csv"
GROUND_TRUTH_COLUMNS = (
    "image",
    "x",
    "y",
    "morphotype",
    "culture",
    "mask_id",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
)
PARAMS_NAME = "synthetic.json"
GENERATOR_VERSION = 3  # bump when the drawing changes, so plates written before are regenerated
DIFFICULTIES = ("easy", "hard")
# hard: share of objects placed beside one already placed (a neighbour entering its crop), and
# the gap between their windows, as a fraction of the two windows' half-sides.
NEIGHBOUR_RATE = 0.5
_NEIGHBOUR_GAP = (1.05, 1.5)
_SIZE_JITTER = (0.8, 1.25)  # hard: per-cell scale of the outline within a morphotype

_MAX_OVERLAP = 0.05  # fraction of a new cell's area that may cover cells already placed
_PLACE_TRIES = 40
_PAD = 3  # window margin around a cell, so its edge never touches the window border
_HALO_SIGMA = 3.0  # px; sets the halo width and the shade-off inside large cells
_ABSORPTION = 0.08  # darkening proportional to thickness, so flat cells stay darker than background
_READ_NOISE = 350.0
_SHOT_GAIN = 3.0  # variance per grey level: shot-like noise, ~300 at the background


def check_difficulty(difficulty: str) -> str:
    """difficulty itself if it is one of DIFFICULTIES.

    Raises
    ------
    ValueError
        If difficulty is not one of DIFFICULTIES (the message names them).
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown synthetic difficulty {difficulty!r}; use one of {DIFFICULTIES}")
    return difficulty


def culture_mixture(culture: str) -> dict[str, float]:
    """The known morphotype proportions of a synthetic culture (sum to 1).

    Raises
    ------
    ValueError
        If culture is not one of CULTURES.
    """
    if culture not in CULTURE_MIXTURES:
        raise ValueError(f"unknown synthetic culture {culture!r}; use one of {CULTURES}")
    return dict(CULTURE_MIXTURES[culture])


def synthetic_plate_id(culture: str, concentration: str, replicate: int) -> str:
    """Folder (and partition) name of a synthetic plate, e.g. 'synth-GBM01-c1000-r1'."""
    return check_plate_id(f"synth-{culture}-c{concentration}-r{replicate}")


@dataclass(frozen=True)
class _Look:
    """How a morphotype renders: optical thickness, body profile, texture and refractile rim."""

    phase: float  # peak optical thickness: contrast and halo strength
    dome: bool  # rounded (thickest at the centre) rather than flat with a plateau
    nucleus: float  # extra thickness of the central core
    granules: float  # strength of the dark/bright granular texture
    rim: float  # direct brightness of a refractile inner rim (dead, rounded cells)


_LOOKS = {
    "small_round": _Look(phase=1.2, dome=True, nucleus=0.0, granules=0.1, rim=1.2),
    "large_flat": _Look(phase=0.8, dome=False, nucleus=0.2, granules=0.5, rim=0.0),
    "fusiform": _Look(phase=1.4, dome=False, nucleus=0.3, granules=0.6, rim=0.0),
    "multipolar": _Look(phase=1.3, dome=False, nucleus=0.3, granules=0.6, rim=0.0),
    "clump": _Look(phase=1.2, dome=True, nucleus=0.2, granules=0.3, rim=0.0),
}
# hard: one thickness, nucleus and texture for every morphotype; only the profile (a rounded
# cell is a dome, a spread one flat) follows the shape.
_HARD_LOOKS = {m: _Look(phase=1.2, dome=look.dome, nucleus=0.2, granules=0.3, rim=0.0) for m, look in _LOOKS.items()}


@dataclass(frozen=True)
class PlateConditions:
    """What every image of one hard plate shares: exposure, illumination, focus and noise.

    level: background grey level in 16-bit counts (lamp x exposure); field: (6, 6) float32
    coarse illumination pattern, relative, upsampled to the image; gradient: (gy, gx) relative
    change across the image; vignette: relative darkening at the corners; focus_sigma: px,
    Gaussian defocus of the optical thickness (0 = in focus); halo_sigma: px, halo width;
    noise_scale: multiplier of the camera noise.
    """

    level: float
    field: np.ndarray
    gradient: tuple[float, float]
    vignette: float
    focus_sigma: float
    halo_sigma: float
    noise_scale: float


def draw_plate_conditions(rng: np.random.Generator) -> PlateConditions:
    """A random plate's exposure, illumination, focus and noise (the hard generator's nuisances)."""
    return PlateConditions(
        level=float(rng.uniform(20000, 44000)),
        field=rng.normal(0.0, 0.025, (6, 6)).astype(np.float32),
        gradient=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
        vignette=float(rng.uniform(0.0, 0.12)),
        focus_sigma=float(rng.uniform(0.0, 1.3)),
        halo_sigma=float(rng.uniform(2.5, 3.8)),
        noise_scale=float(rng.uniform(0.7, 1.5)),
    )


@dataclass(frozen=True)
class _Sprite:
    """One cell drawn in its own square window, centred on the window's middle pixel."""

    morphotype: str
    mask: np.ndarray  # bool, the cell's ground-truth footprint
    phase: np.ndarray  # float32 optical thickness
    rim: np.ndarray | None  # float32 direct brightness, or None

    @property
    def half(self) -> int:
        return self.mask.shape[0] // 2


@dataclass
class SyntheticImage:
    """One synthetic field: the 16-bit image, its instance labels and the true cells."""

    image: np.ndarray  # uint16 (H, W)
    labels: np.ndarray  # uint16 (H, W); 0 background, 1..n = cells.mask_id
    cells: pd.DataFrame  # x, y (mask centroid), morphotype, mask_id, bbox_x0/y0/x1/y1 (x1, y1 exclusive)


# ---- cell shapes ------------------------------------------------------------------------------


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _wobble(rng: np.random.Generator, theta: np.ndarray, amount: float) -> np.ndarray:
    """Smooth random radial modulation, so no two cells share an outline."""
    k = np.arange(2, 6)[:, None]
    amp = rng.normal(0.0, amount, 4)[:, None] / k
    offset = rng.uniform(0, 2 * np.pi, 4)[:, None]
    return 1.0 + (amp * np.cos(k * theta + offset)).sum(axis=0)


def _round_outline(
    rng: np.random.Generator, r_min: float, r_max: float, wobble: float, max_elongation: float
) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    r = rng.uniform(r_min, r_max) * _wobble(rng, theta, wobble)
    e = np.sqrt(rng.uniform(1.0, max_elongation))
    pts = np.stack([r * np.cos(theta) * e, r * np.sin(theta) / e], axis=1)
    return _rotate(pts, rng.uniform(0, np.pi))


def _spindle_outline(rng: np.random.Generator) -> np.ndarray:
    """Bipolar, pointed at both ends, slightly bent: the fusiform shape."""
    half_len, half_width = rng.uniform(30, 60), rng.uniform(6, 10)
    x = np.linspace(-half_len, half_len, 81)
    u = x / half_len
    width = half_width * (1 - u**2) ** 1.3 + 0.6
    centre = rng.uniform(-0.15, 0.15) * half_len * u**2
    pts = np.concatenate([np.stack([x, centre + width], 1), np.stack([x, centre - width], 1)[::-1]])
    return _rotate(pts, rng.uniform(0, np.pi))


def _star_outline(rng: np.random.Generator) -> np.ndarray:
    """A body with 3-6 thin tapering protrusions: the multipolar shape."""
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    r0 = rng.uniform(13, 19)
    n = int(rng.integers(3, 7))
    angles = (np.arange(n) * 2 * np.pi / n + rng.normal(0, 0.3, n) + rng.uniform(0, 2 * np.pi))[:, None]
    lengths = r0 * rng.uniform(0.8, 2.0, n)[:, None]
    widths = rng.uniform(0.15, 0.3, n)[:, None]
    gap = np.abs((theta - angles + np.pi) % (2 * np.pi) - np.pi)
    r = r0 * _wobble(rng, theta, 0.08) + (lengths * np.exp(-((gap / widths) ** 1.5))).sum(axis=0)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def _outline(rng: np.random.Generator, morphotype: str, hard: bool = False) -> np.ndarray:
    """Polygon (N, 2) of x, y in pixels around (0, 0) for one cell of the morphotype.

    hard: the outline is scaled by a random factor in _SIZE_JITTER (size varies within a type).
    """
    points = _base_outline(rng, morphotype)
    return points * rng.uniform(*_SIZE_JITTER) if hard else points


def _base_outline(rng: np.random.Generator, morphotype: str) -> np.ndarray:
    if morphotype == "small_round":
        return _round_outline(rng, 8, 12, 0.05, 1.1)
    if morphotype == "large_flat":
        return _round_outline(rng, 24, 36, 0.15, 1.4)
    if morphotype == "fusiform":
        return _spindle_outline(rng)
    if morphotype == "multipolar":
        return _star_outline(rng)
    if morphotype == "clump":
        return _round_outline(rng, 7, 11, 0.08, 1.25)
    raise ValueError(f"unknown morphotype {morphotype!r}; use one of {MORPHOTYPES}")


def _fill(points: np.ndarray, half: int) -> np.ndarray:
    """Rasterise a polygon into a (2*half+1)^2 uint8 window with sub-pixel vertex precision."""
    mask = np.zeros((2 * half + 1, 2 * half + 1), np.uint8)
    cv2.fillPoly(mask, [np.round((points + half) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask


# ---- cell appearance --------------------------------------------------------------------------


def _granules(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Sparse dark (and fewer bright) spots of 2-4 px: vesicles and granules in the cytoplasm."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 1.0)
    noise /= noise.std() + 1e-6
    return np.clip(noise - 1.3, 0, None) - 0.7 * np.clip(-noise - 1.8, 0, None)


def _nucleoli(rng: np.random.Generator, core: np.ndarray) -> np.ndarray:
    """1-3 small dense dots inside the nucleus."""
    spots = np.zeros(core.shape, np.float32)
    ys, xs = np.nonzero(core > 0.5)
    if len(ys) == 0:
        return spots
    for i in rng.choice(len(ys), size=int(rng.integers(1, 4))):
        radius = int(round(rng.uniform(1.5, 2.5) * 16))
        cv2.circle(spots, (int(xs[i]) * 16, int(ys[i]) * 16), radius, 1.0, -1, cv2.LINE_AA, shift=4)
    return spots


def _sprite(rng: np.random.Generator, morphotype: str, hard: bool = False) -> _Sprite:
    """Draw one cell: its footprint, optical thickness (body, nucleus, granules) and rim."""
    points = _outline(rng, morphotype, hard)
    half = int(np.ceil(np.abs(points).max())) + _PAD
    mask = _fill(points, half)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    depth = max(float(dist.max()), 1.0)
    look = (_HARD_LOOKS if hard else _LOOKS)[morphotype]
    body = np.sqrt(dist / depth) if look.dome else 1.0 - np.exp(-dist / 3.0)
    core = np.clip((dist / depth - rng.uniform(0.45, 0.6)) * 8, 0, 1)
    phase = look.phase * rng.uniform(0.8, 1.2) * body
    phase += look.nucleus * (core + 2.0 * _nucleoli(rng, core))
    phase += look.granules * _granules(rng, mask.shape) * (dist > 2)
    phase = cv2.GaussianBlur(phase.astype(np.float32), (0, 0), 0.7)
    rim = None
    if look.rim:
        rim = (look.rim * np.exp(-(((dist / depth - 0.45) / 0.25) ** 2)) * mask).astype(np.float32)
    return _Sprite(morphotype, mask.astype(bool), phase, rim)


# ---- placing cells ----------------------------------------------------------------------------

_Member = tuple[_Sprite, int, int]  # sprite and its centre's offset (dy, dx) from the object origin


def _clump(rng: np.random.Generator, k: int, hard: bool = False) -> list[_Member]:
    """k small cells packed so neighbours touch but each stays a separate, findable cell.

    A member that finds no room around the others after 30 tries is left out.
    """
    members: list[_Member] = []
    discs: list[tuple[np.ndarray, float]] = []  # centre (y, x) and radius of the members placed
    for sprite in (_sprite(rng, "clump", hard) for _ in range(k)):
        radius = float(np.sqrt(sprite.mask.sum() / np.pi))
        centre = _touching_spot(rng, discs, radius) if discs else np.zeros(2)
        if centre is not None:
            discs.append((centre, radius))
            members.append((sprite, int(round(centre[0])), int(round(centre[1]))))
    return members


def _touching_spot(rng: np.random.Generator, discs: list[tuple[np.ndarray, float]], radius: float) -> np.ndarray | None:
    """A centre where a cell of this radius touches a random member without covering any much."""
    for _ in range(30):
        anchor, anchor_radius = discs[int(rng.integers(len(discs)))]
        angle = rng.uniform(0, 2 * np.pi)
        step = (radius + anchor_radius) * rng.uniform(0.92, 1.05)
        centre = anchor + step * np.array([np.sin(angle), np.cos(angle)])
        if all(np.hypot(*(centre - c)) >= 0.9 * (radius + r) for c, r in discs):
            return centre
    return None


def _object_plan(rng: np.random.Generator, p: np.ndarray, n_cells: int) -> list[tuple[str, int]]:
    """(morphotype, cell count) per object, adding up to n_cells.

    A clump holds 3-6 cells, so clumps are drawn 1/4.5 as often as their cell share; per cell
    the mixture then holds. Only the last clump of a field may be cut short to keep the count.
    """
    clump = np.array(MORPHOTYPES) == "clump"
    weights = np.where(clump, p / 4.5, p)
    kinds = rng.choice(len(MORPHOTYPES), size=n_cells, p=weights / weights.sum())
    sizes = np.where(clump[kinds], rng.integers(3, 7, n_cells), 1)
    starts = np.cumsum(sizes) - sizes
    keep = starts < n_cells
    sizes = np.minimum(sizes[keep], n_cells - starts[keep])
    return [(MORPHOTYPES[k], int(n)) for k, n in zip(kinds[keep], sizes, strict=False)]


def _objects(rng: np.random.Generator, plan: list[tuple[str, int]], hard: bool = False) -> list[list[_Member]]:
    """Single cells and clumps, largest first so big cells still find room in dense fields."""
    objects = [_clump(rng, n, hard) if m == "clump" else [(_sprite(rng, m, hard), 0, 0)] for m, n in plan]
    return sorted(objects, key=lambda obj: -sum(int(s.mask.sum()) for s, _, _ in obj))


def _window(member: _Member, cy: int, cx: int) -> tuple[slice, slice]:
    sprite, dy, dx = member
    y0, x0 = cy + dy - sprite.half, cx + dx - sprite.half
    return slice(y0, y0 + sprite.mask.shape[0]), slice(x0, x0 + sprite.mask.shape[1])


def _reach(obj: list[_Member]) -> int:
    """Half-side of the square around the object origin that holds all its members' windows."""
    return max(s.half + max(abs(dy), abs(dx)) for s, dy, dx in obj)


def _place(
    rng: np.random.Generator, labels: np.ndarray, obj: list[_Member], anchors: list[tuple[int, int, int]] | None = None
) -> tuple[int, int] | None:
    """A random origin where the whole object lies inside the (square) image and barely covers
    cells already placed, or None after _PLACE_TRIES misses.

    anchors (hard generator): (cy, cx, reach) of the single cells placed so far; with probability
    NEIGHBOUR_RATE a single cell is first tried beside a random one of them, its centre
    _NEIGHBOUR_GAP x (both reaches) away, so a crop of either shows the other.
    """
    size = labels.shape[0]
    lo = max(s.half - d for s, dy, dx in obj for d in (dy, dx))
    hi = size - max(s.half + d + 1 for s, dy, dx in obj for d in (dy, dx))
    if hi < lo:
        return None
    beside = bool(anchors) and len(obj) == 1 and rng.random() < NEIGHBOUR_RATE
    for _ in range(_PLACE_TRIES):
        if beside:
            ay, ax, reach = anchors[int(rng.integers(len(anchors)))]
            angle, gap = rng.uniform(0, 2 * np.pi), rng.uniform(*_NEIGHBOUR_GAP) * (reach + _reach(obj))
            cy = int(np.clip(round(ay + gap * np.sin(angle)), lo, hi))
            cx = int(np.clip(round(ax + gap * np.cos(angle)), lo, hi))
        else:
            cy, cx = (int(v) for v in rng.integers(lo, hi + 1, 2))
        if all(np.count_nonzero(labels[_window(m, cy, cx)][m[0].mask]) <= _MAX_OVERLAP * m[0].mask.sum() for m in obj):
            return cy, cx
    return None


# ---- background, artefacts and optics ---------------------------------------------------------


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mid-grey level with a smooth uneven field and a gentle gradient across the image."""
    level = rng.uniform(31000, 33000)
    coarse = rng.normal(0.0, 0.025, (6, 6)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gy, gx = rng.uniform(-0.03, 0.03, 2)
    return level * (1 + field + gy * ramp[:, None] + gx * ramp[None, :])


def _ripple(rng: np.random.Generator, size: int) -> np.ndarray:
    """Interference fringes, straight or concentric, fading out from a random centre."""
    yy, xx = np.ogrid[:size, :size]
    cy, cx = rng.uniform(0, size, 2)
    wavelength, amp = rng.uniform(12, 40), rng.uniform(0.015, 0.04)
    radius = rng.uniform(0.15, 0.4) * size
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2).astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        carrier = np.sin(2 * np.pi * ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / wavelength)
    else:
        carrier = np.sin(2 * np.pi * np.sqrt(r2) / wavelength)
    return (amp * carrier * np.exp(-r2 / (2 * radius**2))).astype(np.float32)


def _dish(rng: np.random.Generator, size: int) -> np.ndarray:
    """Optical thickness of things on the dish that are not cells: debris specks and scratches."""
    dish = np.zeros((size, size), np.float32)
    area = (size / FIELD_SIZE) ** 2
    for _ in range(int(rng.poisson(DEBRIS_PER_FIELD * area))):
        x, y = (int(v) for v in rng.integers(0, size * 16, 2))
        cv2.circle(dish, (x, y), int(rng.uniform(1.0, 2.0) * 16), rng.uniform(0.3, 0.8), -1, cv2.LINE_AA, 4)
    if rng.random() < SCRATCH_RATE:
        start = rng.uniform(0, size, 2)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.5) * size
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        p0, p1 = (tuple(int(v) for v in np.round(p * 16)) for p in (start, end))
        cv2.line(dish, p0, p1, rng.uniform(0.2, 0.5), int(rng.integers(1, 3)), cv2.LINE_AA, 4)
    return dish


def _add_clipped(canvas: np.ndarray, patch: np.ndarray, y0: int, x0: int) -> None:
    """canvas[y0:, x0:] += patch, cropping whatever falls outside the canvas."""
    h, w = canvas.shape
    py0, px0 = max(0, -y0), max(0, -x0)
    py1, px1 = min(patch.shape[0], h - y0), min(patch.shape[1], w - x0)
    if py1 > py0 and px1 > px0:
        canvas[y0 + py0 : y0 + py1, x0 + px0 : x0 + px1] += patch[py0:py1, px0:px1]


def _add_ghosts(rng: np.random.Generator, glow: np.ndarray) -> None:
    """Out-of-focus cells: soft, low-contrast blobs with a ring, not ground-truth cells."""
    size = glow.shape[0]
    for _ in range(int(rng.poisson(GHOSTS_PER_FIELD * (size / FIELD_SIZE) ** 2))):
        sigma = rng.uniform(4, 8)
        points = _outline(rng, str(rng.choice(MORPHOTYPES[:4])))
        half = int(np.ceil(np.abs(points).max() + 6 * sigma))
        shape = _fill(points, half).astype(np.float32)
        blob = cv2.GaussianBlur(shape, (0, 0), sigma) - cv2.GaussianBlur(shape, (0, 0), 2.5 * sigma)
        amp = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.3)
        y, x = (int(v) for v in rng.integers(0, size, 2))
        _add_clipped(glow, amp * blob, y - half, x - half)


def _plate_illumination(rng: np.random.Generator, size: int, plate: PlateConditions) -> np.ndarray:
    """The plate's level, field, gradient and vignetting, with a little per-image jitter."""
    level = plate.level * (1 + rng.normal(0.0, 0.02))
    coarse = plate.field + rng.normal(0.0, 0.01, (6, 6)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gy, gx = plate.gradient
    r2 = (ramp[:, None] ** 2 + ramp[None, :] ** 2) / 2
    return level * (1 + field + gy * ramp[:, None] + gx * ramp[None, :] - plate.vignette * r2)


def _render(
    rng: np.random.Generator, phase: np.ndarray, glow: np.ndarray, plate: PlateConditions | None = None
) -> np.ndarray:
    """Phase-contrast optics and camera: high-passed thickness darkens cells and lights halos.

    plate (hard generator): the plate's exposure, illumination, focus and noise; None: the easy
    generator's fixed optics.
    """
    size = phase.shape[0]
    light = _illumination(rng, size) if plate is None else _plate_illumination(rng, size, plate)
    if rng.random() < RIPPLE_RATE:
        light *= 1 + _ripple(rng, size)
    halo_sigma, noise_scale = _HALO_SIGMA, 1.0
    if plate is not None:
        halo_sigma, noise_scale = plate.halo_sigma, plate.noise_scale
        if plate.focus_sigma > 0.1:
            phase = cv2.GaussianBlur(phase, (0, 0), plate.focus_sigma)
    contrast = phase - cv2.GaussianBlur(phase, (0, 0), halo_sigma)
    signal = light * (1 - contrast - _ABSORPTION * phase + glow)
    noise_sd = noise_scale * np.sqrt(_READ_NOISE**2 + _SHOT_GAIN * np.clip(signal, 0, None))
    signal += noise_sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.round(signal), 0, 65535).astype(np.uint16)


# ---- one image ------------------------------------------------------------------------------


def _check_mixture(mixture: dict[str, float]) -> np.ndarray:
    unknown = set(mixture) - set(MORPHOTYPES)
    if unknown:
        raise ValueError(f"unknown morphotype(s) {sorted(unknown)}; use {MORPHOTYPES}")
    p = np.array([float(mixture.get(m, 0.0)) for m in MORPHOTYPES])
    if (p < 0).any() or not np.isclose(p.sum(), 1.0, atol=1e-6):
        raise ValueError(f"morphotype proportions must be >= 0 and sum to 1, got {mixture}")
    return p / p.sum()


def _cell_table(labels: np.ndarray, placed: list[tuple[int, str, tuple[slice, slice]]]) -> pd.DataFrame:
    """Centroid and bounding box of each cell's final label pixels (what a segmenter can see)."""
    rows = []
    for mask_id, morphotype, (ys, xs) in placed:
        yy, xx = np.nonzero(labels[ys, xs] == mask_id)
        yy, xx = yy + ys.start, xx + xs.start
        rows.append(
            (
                float(xx.mean()),
                float(yy.mean()),
                morphotype,
                mask_id,
                int(xx.min()),
                int(yy.min()),
                int(xx.max()) + 1,
                int(yy.max()) + 1,
            )
        )
    columns = ["x", "y", "morphotype", "mask_id", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]
    return pd.DataFrame(rows, columns=columns)


def synthesize_image(
    rng: np.random.Generator,
    mixture: dict[str, float],
    n_cells: int,
    size: int = FIELD_SIZE,
    difficulty: str = "easy",
    plate: PlateConditions | None = None,
) -> SyntheticImage:
    """One size x size field with about n_cells cells drawn from the morphotype mixture.

    A cell that finds no free room after several tries is left out, so dense fields may hold a
    few cells fewer than asked; `cells` lists exactly the cells drawn.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness: the same generator state gives the same field.
    mixture : dict of str to float
        Proportions of MORPHOTYPES (missing ones are 0), each >= 0, summing to 1.
    n_cells : int
        Cells to place (>= 0).
    size : int
        Side of the square field, in pixels.
    difficulty : {"easy", "hard"}
        "easy": generator version 1's drawing; "hard": size jitter, neighbours beside cells, one
        look for all morphotypes and the plate's optics (see the module docstring).
    plate : PlateConditions, optional
        hard only: the plate's exposure, illumination, focus and noise; None draws the field's own.

    Returns
    -------
    SyntheticImage
        image: (size, size) uint16 phase-contrast-like intensities; labels: (size, size) uint16
        instance labels (0 background, k = the cell of mask_id k); cells: one row per drawn cell
        (x, y mask centroid in pixels, morphotype, mask_id, bbox_x0/y0/x1/y1 with x1, y1 exclusive).

    Raises
    ------
    ValueError
        If mixture names an unknown morphotype, or its proportions are negative or do not sum to
        1, or difficulty is not one of DIFFICULTIES.
    """
    hard = check_difficulty(difficulty) == "hard"
    if hard and plate is None:
        plate = draw_plate_conditions(rng)
    plan = _object_plan(rng, _check_mixture(mixture), int(n_cells))
    labels = np.zeros((size, size), np.uint16)
    phase = _dish(rng, size)
    glow = np.zeros((size, size), np.float32)
    placed = []
    anchors: list[tuple[int, int, int]] | None = [] if hard else None
    for obj in _objects(rng, plan, hard):
        origin = _place(rng, labels, obj, anchors)
        if origin is None:
            continue
        if anchors is not None and len(obj) == 1:  # a clump already is a group of neighbours
            anchors.append((*origin, _reach(obj)))
        for member in obj:
            sprite = member[0]
            window = _window(member, *origin)
            mask_id = len(placed) + 1
            labels[window][sprite.mask & (labels[window] == 0)] = mask_id
            phase[window] += sprite.phase
            if sprite.rim is not None:
                glow[window] += sprite.rim
            placed.append((mask_id, sprite.morphotype, window))
    _add_ghosts(rng, glow)
    image = _render(rng, phase, glow, plate if hard else None)
    return SyntheticImage(image=image, labels=labels, cells=_cell_table(labels, placed))


# ---- plates on disk ---------------------------------------------------------------------------


def _write_plate(
    plate_dir: Path,
    culture: str,
    concentration: str,
    replicate: int,
    images: int,
    size: int,
    entropy: list[int],
    timepoint_h: float,
    difficulty: str = "easy",
) -> None:
    """Write one plate: images, masks, ground truth, parameters, and the manifest last.

    A plate already written with the same parameters is kept (it would come out byte-identical);
    anything else in its folder is replaced.
    """
    params = {
        "version": GENERATOR_VERSION,
        "entropy": entropy,
        "images": images,
        "size": size,
        "timepoint_h": timepoint_h,
        "difficulty": difficulty,
    }
    params_path = plate_dir / PARAMS_NAME
    if (plate_dir / MANIFEST_NAME).is_file() and params_path.is_file():
        if json.loads(params_path.read_text()) == params:
            return
    if plate_dir.exists():
        shutil.rmtree(plate_dir)
    (plate_dir / "masks").mkdir(parents=True)
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    plate = draw_plate_conditions(rng) if difficulty == "hard" else None
    mean_cells = CELLS_PER_FIELD[concentration] * (size / FIELD_SIZE) ** 2
    names, tables = [], []
    for j in range(images):
        n_cells = 0 if rng.random() < EMPTY_FIELD_RATE else int(rng.poisson(mean_cells))
        field = synthesize_image(rng, CULTURE_MIXTURES[culture], n_cells, size, difficulty, plate)
        name = f"img{j:03d}.tif"
        tifffile.imwrite(plate_dir / name, field.image, photometric="minisblack", metadata=None)
        cv2.imwrite(str(plate_dir / "masks" / f"img{j:03d}.png"), field.labels)
        tables.append(field.cells.assign(image=name, culture=culture))
        names.append(name)
    truth = pd.concat(tables, ignore_index=True)[list(GROUND_TRUTH_COLUMNS)]
    truth.to_csv(plate_dir / GROUND_TRUTH_NAME, index=False, float_format="%.3f")
    params_path.write_text(json.dumps(params, sort_keys=True) + "\n")
    manifest = pd.DataFrame(
        {
            "image": names,
            "culture": culture,
            "concentration": concentration,
            "replicate": replicate,
            "timepoint_h": float(timepoint_h),
        },
        columns=list(MANIFEST_COLUMNS),
    )
    tmp = plate_dir / f".{MANIFEST_NAME}.tmp"
    manifest.to_csv(tmp, index=False)
    os.replace(tmp, plate_dir / MANIFEST_NAME)


def write_plates(
    out_dir: str | Path,
    n_cultures: int = 10,
    n_concentrations: int = 5,
    n_replicates: int = 1,
    images_per_plate: int = 2,
    size: int = FIELD_SIZE,
    seed: int = 0,
    timepoint_h: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    difficulty: str = "easy",
) -> list[Path]:
    """Write synthetic plates (the first n_cultures x n_concentrations, r1..rN) under out_dir.

    Each plate folder 'synth-<culture>-c<concentration>-r<replicate>' holds imgNNN.tif (uint16),
    masks/imgNNN.png (uint16 instance labels), ground_truth.csv (one row per cell; x, y = mask
    centroid; bbox_x1/y1 exclusive), synthetic.json and, written last and atomically,
    manifest.csv. Images are size x size pixels. A plate's pixels depend only on (seed, culture,
    concentration, replicate, timepoint_h, size, images_per_plate, difficulty), not on how many
    plates are asked for. difficulty "easy" is generator version 1's drawing; "hard" (what the
    demo and the benchmarks use) gives each plate its own exposure, illumination, focus and
    noise, varies cell size, puts neighbours beside cells and makes morphotypes differ in shape
    rather than brightness (module docstring). Returns the plate folders in order;
    progress(done, total) is called after each plate.

    Raises
    ------
    ValueError
        If n_cultures is not in 1..len(CULTURES), n_concentrations not in 1..len(CONCENTRATIONS),
        or n_replicates < 1, images_per_plate < 1, size < 128, seed < 0 or timepoint_h < 0, or
        difficulty is not one of DIFFICULTIES.
    """
    check_difficulty(difficulty)
    if not 1 <= n_cultures <= len(CULTURES):
        raise ValueError(f"n_cultures must be 1..{len(CULTURES)}, got {n_cultures}")
    if not 1 <= n_concentrations <= len(CONCENTRATIONS):
        raise ValueError(f"n_concentrations must be 1..{len(CONCENTRATIONS)}, got {n_concentrations}")
    if n_replicates < 1 or images_per_plate < 1 or size < 128 or seed < 0 or timepoint_h < 0:
        raise ValueError("need n_replicates >= 1, images_per_plate >= 1, size >= 128, seed >= 0 and timepoint_h >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = [
        (ci, ki, r) for ci in range(n_cultures) for ki in range(n_concentrations) for r in range(1, n_replicates + 1)
    ]
    plates = []
    for done, (ci, ki, r) in enumerate(plans, start=1):
        culture, concentration = CULTURES[ci], CONCENTRATIONS[ki]
        plate_dir = out_dir / synthetic_plate_id(culture, concentration, r)
        entropy = [int(seed), ci, ki, r, int(round(timepoint_h * 3600))]
        _write_plate(plate_dir, culture, concentration, r, images_per_plate, size, entropy, timepoint_h, difficulty)
        plates.append(plate_dir)
        if progress is not None:
            progress(done, len(plans))
    return plates


def stale_plates(raw_dir: str | Path) -> list[Path]:
    """Synthetic plate folders under raw_dir written by another GENERATOR_VERSION, sorted.

    A folder counts when it holds PARAMS_NAME (written by write_plates) whose "version" differs
    from GENERATOR_VERSION; folders without it (a lab's plates) and unreadable parameter files
    are left out. A missing raw_dir gives [].
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return []
    stale = []
    for params_path in sorted(raw_dir.glob(f"*/{PARAMS_NAME}")):
        try:
            version = json.loads(params_path.read_text()).get("version")
        except (OSError, ValueError, AttributeError):
            continue
        if version != GENERATOR_VERSION:
            stale.append(params_path.parent)
    return stale


def regenerate_plates(plate_dirs: list[Path], difficulty: str = "hard") -> list[Path]:
    """Rewrite synthetic plates in place with this GENERATOR_VERSION, keeping each one's seed,
    culture, concentration, replicate, image count, size and time point (from its PARAMS_NAME).

    Returns the folders rewritten, in order.

    Raises
    ------
    ValueError
        If a folder's parameters are missing or unreadable, do not name a known culture and
        concentration, or do not match the folder's name; or difficulty is not one of DIFFICULTIES.
    """
    check_difficulty(difficulty)
    done = []
    for plate_dir in map(Path, plate_dirs):
        try:
            params = json.loads((plate_dir / PARAMS_NAME).read_text())
            entropy = [int(v) for v in params["entropy"]]
            ci, ki, replicate = entropy[1:4]
            culture, concentration = CULTURES[ci], CONCENTRATIONS[ki]
            images, size, timepoint_h = int(params["images"]), int(params["size"]), float(params["timepoint_h"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{plate_dir / PARAMS_NAME}: not a synthetic plate's parameters ({exc})") from exc
        if plate_dir.name != synthetic_plate_id(culture, concentration, replicate):
            raise ValueError(
                f"{plate_dir}: its {PARAMS_NAME} describes plate "
                f"{synthetic_plate_id(culture, concentration, replicate)}, not {plate_dir.name}"
            )
        _write_plate(plate_dir, culture, concentration, replicate, images, size, entropy, timepoint_h, difficulty)
        done.append(plate_dir)
    return done
