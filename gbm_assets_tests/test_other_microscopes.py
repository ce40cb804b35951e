"""Cell finding on real annotated fields made to look like other microscopes (benchmarks/microscopes.py).

What should hold whatever the set-up: the size estimate follows the magnification, and cell
finding keeps its precision and recall at another magnification, bit depth or compression. Cases
that fail on the current cell finding are marked xfail(strict=True) with the measured figures, so
they turn into failures (to be unmarked) the day they are fixed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from gbm_assets.imaging.cell_quality import kept_candidates
from gbm_assets.imaging.cell_size import estimate_cell_diameter
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.plate_coordinates import plate_coordinates
from gbm_assets.imaging.scoring import score_point_in_mask
from gbm_assets.imaging.segmentation import SegmentationParams, find_cells

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks/ folder
    sys.path.insert(0, str(REPO))

from benchmarks.microscopes import rescale, tiles, to_8bit, write_image  # noqa: E402
from benchmarks.segmentation import annotated_diameter  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
USIIGACI, T98G = SHARED / "usiigaci", SHARED / "t98g"
needs_data = pytest.mark.skipif(
    not (USIIGACI / "images").is_dir() or not (T98G / "images").is_dir(),
    reason=f"real annotated fields not found under {SHARED}",
)
pytestmark = needs_data

# What is left once the scale follows the magnification (imaging.magnification), measured
AT_TWICE_THE_MAGNIFICATION = (
    "at twice the magnification cells are found at the magnified scale (about 80 px), but the first "
    "pass there finds pieces a little smaller than whole cells, and enlarged debris still passes as cells"
)


def _field(folder: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(folder / "images" / f"{stem}.tif")
    return image, cv2.imread(str(folder / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)


def _score_on_plate(tmp: Path, fields: list[tuple[np.ndarray, np.ndarray]], variant: str = "") -> tuple[dict, object]:
    """Precision / recall of the candidates labelled "cell" on a plate folder written with the
    fields' images (production path: plate_coordinates with the size estimate), pooled."""
    tmp.mkdir(parents=True, exist_ok=True)
    names = [write_image(tmp, f"f{i}", image, variant) for i, (image, _) in enumerate(fields)]
    plate = plate_coordinates("p", tmp, names, estimate_size=True, workers=1)
    cells = kept_candidates(plate.coordinates)
    scores = [
        score_point_in_mask(cells.loc[cells["image"] == name, ["x", "y"]].to_numpy(float), mask)
        for name, (_, mask) in zip(names, fields, strict=True)
    ]
    tp, fp, fn = (sum(s[k] for s in scores) for k in ("tp", "fp", "fn"))
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1)}, plate


@pytest.mark.parametrize("factor", [1.0, 0.5, 2.0])  # before imaging.magnification: 1.45x and 0.44x
def test_t98g_size_estimate_follows_magnification(factor, tmp_path):
    """A T98G frame seen at another magnification, as a plate of its own: the plate's size
    estimate (plate_coordinates) lands within 25% of the annotated mean diameter times the factor."""
    image, mask = _field(T98G, "20180101ef002xy01t07")
    image, mask = rescale(image, mask, factor)
    estimate = _score_on_plate(tmp_path, [(image, mask)])[1].size.diameter_px
    truth = annotated_diameter(mask)
    assert estimate is not None
    assert abs(estimate / truth - 1) <= 0.25, f"estimate {estimate} px, annotated {truth:.1f} px"


def test_t98g_size_estimate_on_696x520_tiles():
    """The six T98G frames cut into 696x520 tiles (a smaller camera, as many tiles as cover each
    frame), as one plate: fewer cells per image, the same estimate within 25%."""
    frames = [_field(T98G, path.stem) for path in sorted((T98G / "images").glob("*.tif"))]
    truth = float(np.mean([annotated_diameter(mask) for _, mask in frames]))
    estimate = estimate_cell_diameter(image[w] for image, _ in frames for _, _, w in tiles(image, 696, 520)).diameter_px
    assert estimate is not None
    assert abs(estimate / truth - 1) <= 0.25, f"estimate {estimate} px, annotated {truth:.1f} px"


def test_size_estimate_on_a_u373_like_plate(tmp_path):
    """T98G frames at twice the magnification, cut into 696x520 tiles, 8-bit (the held-out U373
    set-up): the plate's estimate lands within 25% of the annotated mean diameter x 2. The first
    pass at the magnified scale finds pieces a little smaller than whole cells; with the dark
    parts of one cell joined (cell_quality.merge_dark_joined) the estimate is 102 px for cells of
    130.3 (0.78x, magnification 1.92; 97.0 px, 0.74x, before; 54.6 px, 0.42x, before the scale
    followed the magnification); edge-corrected (cell_size.edge_corrected) 132.5 px, 1.02x."""
    estimate, truth = _u373_like_plate_size(tmp_path, T98G, "20180101ef002xy01t07")
    assert estimate is not None
    assert abs(estimate / truth - 1) <= 0.25, f"estimate {estimate} px, annotated {truth}"


def _u373_like_plate_size(tmp_path, root, name: str) -> tuple[float | None, float]:
    """(the plate's size estimate, px, and 2 x the annotated mean diameter) of one field at twice
    the magnification, cut into 696x520 8-bit tiles ingested as one plate."""
    image, mask = rescale(*_field(root, name), 2.0)
    image = to_8bit(image)
    fields = [(image[w], mask[w]) for _, _, w in tiles(image, 696, 520)]
    _, plate = _score_on_plate(tmp_path, fields)
    return plate.size.diameter_px, 2 * annotated_diameter(_field(root, name)[1])


@pytest.fixture(scope="module")
def set12_baseline(tmp_path_factory) -> dict:
    image, mask = _field(USIIGACI, "set12")
    return _score_on_plate(tmp_path_factory.mktemp("set12"), [(image, mask)])[0]


@pytest.mark.parametrize("variant", ["8bit", "jpeg85"])
def test_8bit_and_jpeg_keep_precision_and_recall(variant, set12_baseline, tmp_path):
    """A Usiigaci field converted to 8-bit (linear, 0.1 / 99.9 percentiles; PNG, or JPEG of
    quality 85): precision and recall within 0.05 of the 16-bit field's (measured: 0.71 / 0.89
    at 16-bit; within 0.02 for both)."""
    image, mask = _field(USIIGACI, "set12")
    scores, _ = _score_on_plate(tmp_path, [(to_8bit(image), mask)], variant)
    for key in ("precision", "recall"):
        assert scores[key] >= set12_baseline[key] - 0.05, (key, scores, set12_baseline)


@pytest.mark.parametrize(
    "factor",
    [
        0.5,  # before imaging.magnification: recall 0.89 -> 0.60
        pytest.param(
            2.0,
            marks=pytest.mark.xfail(
                strict=True,
                reason=AT_TWICE_THE_MAGNIFICATION
                + " (measured: precision 0.74 -> 0.61, recall 0.93 -> 0.98 with cells placed on their dark bodies, 0.71 -> 0.60 and 0.89 -> 0.96 before; "
                "0.18 / 0.93 before the scale followed the magnification)",
            ),
        ),
    ],
)
def test_usiigaci_field_at_another_magnification_keeps_precision_and_recall(factor, set12_baseline, tmp_path):
    """A Usiigaci field at half / twice the magnification: precision and recall within 0.1 of the
    unscaled field's."""
    image, mask = _field(USIIGACI, "set12")
    scores, _ = _score_on_plate(tmp_path, [rescale(image, mask, factor)])
    for key in ("precision", "recall"):
        assert scores[key] >= set12_baseline[key] - 0.1, (key, scores, set12_baseline)


def _large_cell_tile(tmp_path):
    """The top-left 696x520 tile of a T98G frame at twice the magnification, its annotated mask,
    and the candidates kept at twice the default scale (82 px)."""
    image, mask = _field(T98G, "20180101ef002xy01t07")
    image, mask = rescale(image, mask, 2.0)
    window = next(tiles(image, 696, 520))[2]
    name = write_image(tmp_path, "tile", image[window], "")
    plate = plate_coordinates("p", tmp_path, [name], SegmentationParams(cell_diameter_px=82.0), estimate_size=False)
    return kept_candidates(plate.coordinates), mask[window]


def test_a_field_whose_statistics_hide_its_cells_is_seeded_as_crowded(tmp_path):
    """_large_cell_tile: cells cover 49% of it (just under the half that makes a field crowded),
    so the whole image's level and spread are half the cells' and no dark seed shows (0 cells
    before). Next to no seed for its foreground's cell areas, it is seeded as crowded: at least
    4 of its 11 annotated cells found, at precision >= 0.8 (measured: 5 of 6 detections)."""
    cells, mask = _large_cell_tile(tmp_path)
    scores = score_point_in_mask(cells[["x", "y"]].to_numpy(float), mask)
    assert scores["tp"] >= 4 and scores["precision"] >= 0.8, scores


def test_cells_found_in_a_small_field_of_large_cells(tmp_path):
    """The top-left 696x520 tile of a T98G frame at twice the magnification, cells found at twice
    the default scale (as `--cell-diameter` or a size estimate that follows the magnification
    would set it): at least half of its annotated cells are found. It gave 5 of 11 (precision
    0.83; 0 before a field with next to no dark seed for its foreground was seeded as crowded):
    a cell's flat body showed no dark blob; crowded, a body darker than the medium by
    CROWDED_BODY_LEVEL that no seed reached is seeded (measured: 6 of 11, precision 0.86)."""
    cells, mask = _large_cell_tile(tmp_path)
    scores = score_point_in_mask(cells[["x", "y"]].to_numpy(float), mask)
    assert scores["recall"] >= 0.5, scores


def _u373_like_tile_hits(stem: str, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """The annotated cell under each of find_cells' centres at 82 px (0: off the cells) and the
    annotated mask of one 696x520 tile of a Usiigaci field at x2, 8-bit."""
    image, mask = rescale(*_field(USIIGACI, stem), 2.0)
    image = to_8bit(image)
    window = next(w for i, j, w in tiles(image, 696, 520) if (i, j) == (row, col))
    cells, _ = find_cells(image[window], SegmentationParams(cell_diameter_px=82.0))
    xy = np.rint(cells[["x", "y"]].to_numpy(float)).astype(int)
    return mask[window][xy[:, 1], xy[:, 0]], mask[window]


def test_debris_in_small_fields_that_are_mostly_medium_gives_no_seed():
    """Four U373-like tiles (Usiigaci at x2, 696x520, 8-bit) that are mostly medium strewn with
    debris: the image's spread, the unit of seed darkness, is the medium's own there (1.29-1.38
    medium noise units, 1.54-2.34 on every whole reference field), and dark specks of debris were
    seeded and kept as cells. Measured against at least MIN_SPREAD_PER_NOISE noise units, detections
    off the cells 11 -> 5, cells found 6 -> 6 (find_cells at 82 px)."""
    hits = [_u373_like_tile_hits(stem, r, c)[0] for stem, r, c in TILES_OF_MEDIUM]
    off = sum(np.count_nonzero(h == 0) for h in hits)
    found = sum(len(np.unique(h[h > 0])) for h in hits)
    assert off <= 7 and found >= 6, (off, found)


TILES_OF_MEDIUM = (("set2", 3, 0), ("set9", 0, 0), ("set9", 2, 2), ("set9", 3, 0))


def _u373_like_tile(stem: str, row: int, col: int) -> tuple[dict, int]:
    """Precision / recall and second detections (beyond the first in an annotated cell) of find_cells
    at 82 px (twice the default scale) on one 696x520 tile of a Usiigaci field at x2, 8-bit."""
    hit, mask = _u373_like_tile_hits(stem, row, col)
    found = len(np.unique(hit[hit > 0]))
    scores = {"precision": found / max(len(hit), 1), "recall": found / max(len(np.unique(mask[mask > 0])), 1)}
    return scores, np.count_nonzero(hit) - found


def test_a_small_field_that_large_cells_fill_is_not_crowded():
    """Tile (1, 0) of U373-like set6: large cells cover 58% of it (medium share 0.42, under the half
    that alone made a field crowded), but darkness against its own statistics shows their dark
    bodies (0.38 seeds per cell area of foreground, as the whole field's 0.39), so it is seeded and
    joined as its whole field is, not as a crowded one (bright seeds everywhere, seeds grouped across
    a faint seam): measured 9 second detections, precision 0.41, recall 0.79 as crowded; 1, 0.71, 0.71."""
    scores, second = _u373_like_tile("set6", 1, 0)
    assert second <= 3 and scores["precision"] >= 0.6 and scores["recall"] >= 0.6, (second, scores)


def test_a_small_field_with_next_to_no_dark_seed_stays_crowded():
    """Tile (2, 1) of U373-like set10: medium share 0.27 and no dark seed against its own statistics
    (cells fill it): crowded, it keeps its cells (measured: recall 0.76, precision 0.50)."""
    scores, _ = _u373_like_tile("set10", 2, 1)
    assert scores["recall"] >= 0.6, scores


def test_u373_like_tiles_of_two_fields_as_one_plate(tmp_path):
    """The U373-like set-up (x2, 696x520 tiles, 8-bit) on Usiigaci set10 and set22, their 24 tiles
    one plate (production path, size estimated): a tile holds about 7 cells, under the 20 that
    gave a typical cell area, so its whole cells were judged against one cell area at the
    segmentation's scale (a third of theirs) and their pieces passed for cells (measured: precision
    0.562, recall 0.797 before; 0.579 / 0.791 with the typical area from 5 candidates; 0.609 / 0.791
    since a medium share under half alone no longer makes a tile crowded)."""
    fields = []
    for stem in ("set10", "set22"):
        image, mask = rescale(*_field(USIIGACI, stem), 2.0)
        image = to_8bit(image)
        fields += [(image[w], mask[w]) for _, _, w in tiles(image, 696, 520)]
    scores, _ = _score_on_plate(tmp_path, fields)
    assert scores["precision"] >= 0.6 and scores["recall"] >= 0.78, scores


def test_size_estimate_on_u373_like_tiles_counts_the_cells_seen_whole(tmp_path):
    """U373-like set6 (x2, its 12 696x520 tiles, 8-bit) as one plate: about 2 in 3 of the cells
    the first pass finds are cut by a tile's edge (large cells in a small field), and their pieces
    were read as small cells: estimate 0.74x the annotated mean diameter x 2. Counting only the
    cells seen whole, edge-corrected (cell_size.whole_cell_weights), it lands within 25%
    (measured: 0.94x, 119.2 px for cells of 127.3)."""
    estimate, truth = _u373_like_plate_size(tmp_path, USIIGACI, "set6")
    assert estimate is not None
    assert abs(estimate / truth - 1) <= 0.25, f"estimate {estimate} px, annotated {truth}"


def test_a_usiigaci_field_at_1_5x_that_reads_inside_the_band_is_found_at_the_multiplied_scale(tmp_path):
    """set22 at 1.5x the magnification reads 1.38x (inside the band, so before the check it was
    found at the default 41 px, which cuts its cells of 108 px into pieces: precision 0.38, recall
    1.00). Checked (magnification.checked), the first pass at 41 x 1.38 px finds cells of about
    twice that scale, which confirms the magnification (cell_size.confirms_magnification):
    measured 106.5 px, cells found at 63.9 px, precision 0.83, recall 0.93."""
    image, mask = rescale(*_field(USIIGACI, "set22"), 1.5)
    scores, plate = _score_on_plate(tmp_path, [(image, mask)])
    assert plate.size.confirmed and 1.2 < plate.size.magnification <= 1.5, plate.size
    assert plate.params.cell_diameter_px >= 1.2 * SegmentationParams().cell_diameter_px, plate.params
    assert scores["precision"] >= 0.6 and scores["recall"] >= 0.85, scores
