"""Cells you can trust: field quality, per-candidate qc labels, fragment merging, the plate's cell
size found by itself, dense fields, and the labels' way through cell_coordinates and cell_crops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from gbm_assets.imaging.cell_quality import (
    QC_LABELS,
    QualityRules,
    body_centres,
    centres_inside,
    dark_joined_pairs,
    dark_line_pieces,
    inscribed_radius,
    label_quality,
    merge_dark_joined,
    merge_faint_seams,
    merge_fragments,
    pale_outliers,
    specks,
    spread_typical_area,
    typical_cell_area,
    within_border_frame,
)
from gbm_assets.imaging.cell_size import (
    CellSizeEstimate,
    cell_diameters,
    edge_corrected,
    estimate_cell_diameter,
    estimate_from_diameters,
    sample_images,
    weighted_median,
    whole_cell_weights,
)
from gbm_assets.imaging.field_quality import IMAGE_QUALITY_COLUMNS, field_quality, focus_score
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.measurements import measure_cells
from gbm_assets.imaging.scoring import score_point_in_mask
from gbm_assets.imaging.segmentation import (
    SegmentationParams,
    confluent_medium,
    confluent_split,
    find_candidates,
    find_cells,
    normalise,
    seedless_body_seeds,
    texture,
    texture_threshold,
)
from gbm_assets.imaging.synthetic import CULTURE_MIXTURES, synthesize_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
USIIGACI, T98G = SHARED / "usiigaci", SHARED / "t98g"
needs_usiigaci = pytest.mark.skipif(
    not (USIIGACI / "images").is_dir(), reason=f"Usiigaci fields not found at {USIIGACI}"
)
needs_t98g = pytest.mark.skipif(not (T98G / "images").is_dir(), reason=f"T98G frames not found at {T98G}")


def _phase_contrast(bodies: np.ndarray, noise: float = 400, seed: int = 0) -> np.ndarray:
    """uint16 phase-contrast-like image of a binary mask of cell bodies: dark bodies ringed by
    bright halos, on a flat background with noise (as in test_segmentation)."""
    body = bodies.astype(np.uint8)
    dist = cv2.distanceTransform(body, cv2.DIST_L2, 3)
    phase = np.sqrt(dist / max(float(dist.max()), 1.0)).astype(np.float32) * 1.2
    contrast = phase - cv2.GaussianBlur(phase, (0, 0), 3.0)
    image = 32000 * (1 - contrast - 0.08 * phase)
    image += np.random.default_rng(seed).normal(0, noise, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16)


def _annotated_diameter(labels: np.ndarray) -> float:
    _, areas = np.unique(labels[labels > 0], return_counts=True)
    return float(np.mean(2 * np.sqrt(areas / np.pi)))


# ---- field quality ------------------------------------------------------------------------


def test_a_well_edge_band_is_not_culture_surface_and_cells_beside_it_are():
    bodies = np.zeros((512, 512), np.uint8)
    for cx, cy in ((100, 120), (260, 140), (400, 110), (160, 260)):
        cv2.circle(bodies, (cx, cy), 18, 1, -1)
    image = _phase_contrast(bodies).astype(np.float32)
    # the well's edge along the bottom: a band of dark and bright debris, then the bright wall
    grain = cv2.GaussianBlur(np.random.default_rng(1).normal(0, 1, (112, 512)).astype(np.float32), (0, 0), 2.0)
    image[400:] = 30000 + 60000 * grain
    image[450:] += 25000
    image = np.clip(image, 0, 65535).astype(np.uint16)
    objects = np.zeros(image.shape, np.int32)
    objects[bodies > 0] = 1
    quality = field_quality(image, objects, cell_diameter_px=40)
    assert not quality.usable[460:].any()  # the wall
    assert quality.usable[:350].all()  # the cells and the medium around them
    assert set(quality.measures) == set(IMAGE_QUALITY_COLUMNS)
    assert 0.75 < quality.measures["ImageQuality_UsableFraction"] < 0.9
    # with cell finding's own objects, the band of debris joined to the wall goes with it
    candidates, _, _ = find_candidates(image)
    in_band = candidates[candidates["y"] > 400]
    assert len(in_band) and set(in_band["qc"]) == {"edge"}
    assert (candidates.loc[candidates["y"] < 350, "qc"] == "cell").sum() == 4


def test_focus_score_is_higher_for_the_sharp_image():
    bodies = np.zeros((256, 256), np.uint8)
    cv2.circle(bodies, (128, 128), 30, 1, -1)
    sharp = _phase_contrast(bodies, noise=50)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 4.0)
    assert focus_score(sharp) > 1.5 * focus_score(blurred)


def test_field_quality_refuses_a_mismatched_mask():
    with pytest.raises(ValueError, match="do not match"):
        field_quality(np.zeros((10, 10), np.uint16), np.zeros((5, 5), np.int32), 40)


@needs_usiigaci
def test_usiigaci_well_edge_field_has_no_cells_on_the_edge():
    """set23: the well's edge fills the bottom of the field (rows 860 on; no annotated cell below 850)."""
    image = read_image(USIIGACI / "images" / "set23.tif")
    truth = cv2.imread(str(USIIGACI / "masks" / "set23.png"), cv2.IMREAD_UNCHANGED)
    assert np.nonzero(truth)[0].max() < 860
    candidates, _, measures = find_candidates(image)
    on_edge = candidates[candidates["y"] > 880]
    assert len(on_edge) >= 10  # the band is full of candidates ...
    assert (on_edge["qc"] == "cell").sum() == 0  # ... and none of them is called a cell
    assert set(on_edge["qc"]) == {"edge"}
    assert measures["ImageQuality_UsableFraction"] < 0.9
    cells = candidates[candidates["qc"] == "cell"]
    assert score_point_in_mask(cells[["x", "y"]].to_numpy(), truth)["recall"] >= 0.8


def test_a_striped_band_whose_level_averages_out_is_not_culture_and_aligned_cells_are():
    """Stripes along the field (a well's edge, a scratch) bright and dark in turn: no window's
    mean departs from the medium, but the texture is strong and one way over many cell areas.
    A row of cells all pointing one way is oriented too, over a few cell areas only."""
    bodies = np.zeros((512, 768), np.uint8)
    for cx in range(60, 700, 90):  # spindles all along x, one cell area or so each
        cv2.ellipse(bodies, (cx, 150), (40, 9), 0, 0, 360, 1, -1)
    image = _phase_contrast(bodies).astype(np.float32)
    rows = np.arange(400, 512, dtype=np.float32)[:, None]
    image[400:] = 32000 + 30000 * np.sin(rows / 3.0) * np.ones((1, 768), np.float32)  # mean: the medium
    image = np.clip(image, 0, 65535).astype(np.uint16)
    objects = np.zeros(image.shape, np.int32)
    objects[bodies > 0] = 1
    objects[400:] = 2
    quality = field_quality(image, objects, cell_diameter_px=40)
    assert not quality.usable[420:].any()
    assert quality.usable[:330].all()


@needs_usiigaci
def test_usiigaci_debris_band_at_the_well_edge_has_no_cells():
    """set4: the well's edge is a band of debris across the bottom (rows 940 on) whose bright and
    dark stripes average out to the medium's level; an annotated cell touches it (row 954)."""
    image = read_image(USIIGACI / "images" / "set4.tif")
    truth = cv2.imread(str(USIIGACI / "masks" / "set4.png"), cv2.IMREAD_UNCHANGED)
    candidates, _, measures = find_candidates(image)
    in_band = candidates[candidates["y"] > 960]
    assert len(in_band) >= 8  # the band is cut into many candidates ...
    assert (in_band["qc"] == "cell").sum() == 0  # ... and none of them is called a cell
    assert 0.85 < measures["ImageQuality_UsableFraction"] < 0.97
    cells = candidates[candidates["qc"] == "cell"]
    assert score_point_in_mask(cells[["x", "y"]].to_numpy(), truth)["recall"] >= 0.8


@needs_usiigaci
@pytest.mark.parametrize("name", [f"set{i}" for i in range(2, 26) if i not in (4, 23)])
def test_usiigaci_fields_without_an_edge_are_all_culture(name):
    _, _, measures = find_candidates(read_image(USIIGACI / "images" / f"{name}.tif"))
    assert measures["ImageQuality_UsableFraction"] == 1.0, name


# ---- objects: fragments, debris -------------------------------------------------------------


def test_a_small_piece_against_a_cell_is_merged_into_it_and_a_speck_alone_is_debris():
    labels = np.zeros((200, 200), np.int32)
    cv2.circle(labels, (60, 60), 22, 1, -1)  # a cell (1.2 cell areas at d = 40)
    cv2.rectangle(labels, (83, 52), (96, 66), 2, -1)  # a protrusion piece against it (0.15)
    cv2.circle(labels, (150, 150), 6, 3, -1)  # a speck alone in the medium
    merged, n = merge_fragments(labels, cell_diameter_px=40)
    assert n == 1
    assert np.unique(merged[labels == 2]).tolist() == np.unique(merged[labels == 1]).tolist()
    assert len(np.unique(merged)) == 3  # background, the cell with its piece, the speck
    measures = pd.DataFrame(
        {
            "qc_area_ratio": [1.3, 0.09, 0.3],
            "qc_nearest_cell_px": [0.0, 80.0, 0.0],
            "qc_texture_contrast": [3.0, 3.0, 3.0],
        }
    )
    verdict = label_quality(measures, np.array([True, True, True]), cell_diameter_px=40)
    assert verdict["qc"].tolist() == ["cell", "debris", "fragment"]
    assert verdict["qc_reason"].iloc[0] == "" and "no neighbour" in verdict["qc_reason"].iloc[1]
    compact = label_quality(measures, np.ones(3, bool), 40, QualityRules(), compact=np.array([False, False, True]))
    assert compact["qc"].iloc[2] == "cell"  # a small rounded cell is not a fragment


def test_a_thin_piece_against_a_cell_is_merged_into_it_whatever_its_area():
    labels = np.zeros((200, 260), np.int32)
    cv2.circle(labels, (60, 100), 22, 1, -1)  # a cell (1.2 cell areas at d = 40)
    cv2.rectangle(labels, (83, 97), (210, 104), 2, -1)  # a process 8 px wide, 0.8 cell areas
    radius = inscribed_radius(labels)
    assert radius[1] >= 20 and radius[2] <= 5  # px: the process is thin, the cell is not
    # too big for the area rule alone: kept apart without the thickness rule
    assert merge_fragments(labels, cell_diameter_px=40)[1] == 0
    merged, n = merge_fragments(labels, cell_diameter_px=40, thin=np.flatnonzero(radius < 0.15 * 40))
    assert n == 1 and len(np.unique(merged)) == 2  # background and the cell with its process


def _cell_and_piece(piece_width: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """labels: a spread cell's large part (1) and a dark piece of it (2) cut off by a straight
    line; z (noise units, 0 = medium): both darker than the medium, each with its darkest spot."""
    labels = np.zeros((160, 220), np.int32)
    cv2.circle(labels, (70, 80), 34, 1, -1)  # 2.9 cell areas at d = 40
    labels[60:100, 104 : 104 + piece_width] = 2  # against it on its right
    z = np.full(labels.shape, 1.0, np.float32)  # the medium, a little above 0 (its noise)
    z[labels > 0] = -3.0  # cytoplasm: darker than the medium
    cv2.circle(z, (70, 80), 8, -12.0, -1)  # the nucleus
    cv2.circle(z, (104 + piece_width // 2, 80), 5, -10.0, -1)  # a cluster of granules
    return labels, z


def test_a_dark_piece_joined_to_its_cell_by_dark_cytoplasm_is_merged_into_it():
    labels, z = _cell_and_piece()
    assert dark_joined_pairs(labels, z).tolist() == [[1, 2]]
    merged, joined = merge_dark_joined(labels, z, cell_diameter_px=40)
    assert len(np.unique(merged)) == 2  # background and one cell
    assert joined.tolist() == [0, 1]  # one candidate merged into label 1
    # a bright seam (the halos of two touching cells) along their contact keeps them apart
    seam = z.copy()
    seam[:, 101:106] = 8.0
    assert len(dark_joined_pairs(labels, seam)) == 0
    assert merge_dark_joined(labels, seam, cell_diameter_px=40)[1].sum() == 0
    # cytoplasm paler than the medium by more than its noise (a bright gap between two cells)
    # joins nothing either
    assert len(dark_joined_pairs(labels, np.where(labels > 0, 1.5, 0.0).astype(np.float32))) == 0
    # compact (rounded) cells touch as solid dark discs: never merged
    assert merge_dark_joined(labels, z, 40, compact=np.array([2]))[1].sum() == 0


def test_a_dark_joined_neighbour_as_big_as_a_typical_cell_is_a_cell_of_its_own():
    labels, z = _cell_and_piece(piece_width=40)  # 1,600 px: more than a cell area (1,257 px) at d = 40
    assert dark_joined_pairs(labels, z).tolist() == [[1, 2]]
    assert merge_dark_joined(labels, z, cell_diameter_px=40)[1].sum() == 0
    # the typical cell is the image's own: the median candidate's (its equivalent diameter / 1.2),
    # from as few as 5 candidates (a small field of large cells), one cell area at the
    # segmentation's scale with fewer
    assert typical_cell_area(np.full(5, 5000), 40) == pytest.approx(5000 / 1.2**2)
    assert typical_cell_area(np.full(4, 5000), 40) == pytest.approx(np.pi * 40**2 / 4)
    assert typical_cell_area(np.r_[np.full(30, 2880), np.full(10, 100)], 40) == pytest.approx(2000)


def _two_pieces(side: int, seam: float) -> tuple[np.ndarray, np.ndarray]:
    """labels: two touching square pieces (1, 2) side px wide; z (noise units, 0 = medium): both
    dark, each with a darkest spot, with a seam of level `seam` along their contact."""
    labels = np.zeros((120, 40 + 2 * side), np.int32)
    labels[30 : 30 + side, 20 : 20 + side] = 1
    labels[30 : 30 + side, 20 + side : 20 + 2 * side] = 2
    z = np.full(labels.shape, 1.0, np.float32)
    z[labels > 0] = -4.0
    for centre in (20 + side // 2, 20 + side + side // 2):
        cv2.circle(z, (centre, 30 + side // 2), 4, -12.0, -1)
    z[:, 20 + side - 2 : 20 + side + 2] = np.where(labels[:, 20 + side - 2 : 20 + side + 2] > 0, seam, 1.0)
    return labels, z


def test_pieces_parted_by_no_clear_seam_and_together_under_two_typical_cells_are_one_cell():
    """A seam hardly above the noise (1.5 noise units: above the dark-join level, below
    seam_level) between two pieces of 900 px, together 1,800 px, under two typical cells (2 x
    1,257 px at d = 40): one cell. The dark-join rule alone keeps them apart; a seam of 3 noise
    units or a halo between them, pieces that together hold more than two typical cells (2 x
    1,600 px), or pieces cut by the image's border stay two."""
    labels, z = _two_pieces(30, seam=1.5)
    assert merge_dark_joined(labels, z, cell_diameter_px=40)[1].sum() == 0
    merged, joined = merge_faint_seams(labels, z, cell_diameter_px=40)
    assert len(np.unique(merged)) == 2 and joined.tolist() == [0, 1]
    assert merge_faint_seams(*_two_pieces(30, seam=3.0), cell_diameter_px=40)[1].sum() == 0
    assert merge_faint_seams(*_two_pieces(30, seam=8.0), cell_diameter_px=40)[1].sum() == 0
    assert merge_faint_seams(*_two_pieces(40, seam=1.5), cell_diameter_px=40)[1].sum() == 0
    # pieces cut by the image's border show only part of their cells: their areas say nothing
    assert merge_faint_seams(labels[30:], z[30:], cell_diameter_px=40)[1].sum() == 0
    # two compact (rounded) cells touch with little halo between them: never merged; a compact
    # body (a nucleus) and a piece that is not (its lamella) are
    assert merge_faint_seams(labels, z, 40, compact=np.array([1, 2]))[1].sum() == 0
    assert merge_faint_seams(labels, z, 40, compact=np.array([2]))[1].sum() == 1


@needs_usiigaci
def test_usiigaci_second_detections_parted_by_no_clear_seam_are_merged():
    """On set6, set8, set12 and set16 (long and spread cells found as head and tail, or nucleus
    and lamella) 62 annotated cells held a second detection, 212 were found and 111 detections
    were false; merging pieces parted by no seam that stands clear of the noise and that together
    are no bigger than two typical cells leaves 53 second detections and 100 false ones and loses
    no true one. The speck and line rules after it take them to 47 and 85, and one true one
    (211); the line's corridor (a path beside the straight line) to 37 and 74, and no true one
    (211). The pale rule's ringed tier to 25 and 53, and one true one (210)."""
    second, true, false = 0, 0, 0
    for name in ("set6", "set8", "set12", "set16"):
        image = read_image(USIIGACI / "images" / f"{name}.tif")
        truth = cv2.imread(str(USIIGACI / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        cells = find_cells(image, SegmentationParams())[0]
        hit = truth[
            np.rint(cells["y"]).astype(int).clip(0, truth.shape[0] - 1),
            np.rint(cells["x"]).astype(int).clip(0, truth.shape[1] - 1),
        ]
        second += int(len(hit[hit > 0]) - len(np.unique(hit[hit > 0])))
        score = score_point_in_mask(cells[["x", "y"]].to_numpy(float), truth)
        true, false = true + score["tp"], false + score["fp"]
    assert second <= 25 and false <= 53 and true >= 210


@needs_usiigaci
def test_usiigaci_second_detections_in_one_cell_are_joined():
    """On set2, set11 and set25 (spread cells, each with a nucleus and dark granular cytoplasm)
    many annotated cells were found as two or three candidates: their dark parts joined through
    cytoplasm darker than the medium are one cell now, and no true detection is lost (41 second
    detections in a cell and 161 true ones before). The line's corridor, judged last, labels two
    more second detections and one true one (11 and 160); the pale rule's ringed tier two more
    second detections and one true one (9 and 159)."""
    second, true, _, joined = _usiigaci_detection_counts(("set2", "set11", "set25"))
    assert all(joined) and second <= 25 and true >= 159


@needs_usiigaci
def test_usiigaci_pieces_of_large_cells_are_judged_against_the_typical_spread_cell():
    """On set5, set7, set8, set9 and set24 (large spread cells, 62-69 px across, found at 41 px)
    the line rule's typical cell came from all the candidates, pieces, specks and fine-seeded
    nuclei included (set8: 51 px across): pieces of the largest cells a little bigger than that
    passed for cells, 47 second detections in an annotated cell and 73 false detections with 238
    true ones. Judged against the typical spread (not compact) cell among the cells where that is
    larger, 40 second detections and 64 false ones, 237 true."""
    second, true, false, _ = _usiigaci_detection_counts(("set5", "set7", "set8", "set9", "set24"))
    assert second <= 40 and false <= 64 and true >= 237


def _usiigaci_detection_counts(names) -> tuple[int, int, int, list[bool]]:
    """Over the named Usiigaci fields (find_candidates at the default scale, its cells): second
    detections in an annotated cell, true and false detections, and per field whether any
    candidate was joined."""
    second, true, false, joined = 0, 0, 0, []
    for name in names:
        image = read_image(USIIGACI / "images" / f"{name}.tif")
        truth = cv2.imread(str(USIIGACI / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        candidates = find_candidates(image, SegmentationParams())[0]
        cells = candidates[candidates["qc"] == "cell"]
        hit = truth[
            np.rint(cells["y"]).astype(int).clip(0, truth.shape[0] - 1),
            np.rint(cells["x"]).astype(int).clip(0, truth.shape[1] - 1),
        ]
        second += int(len(hit[hit > 0]) - len(np.unique(hit[hit > 0])))
        score = score_point_in_mask(cells[["x", "y"]].to_numpy(float), truth)
        true, false = true + score["tp"], false + score["fp"]
        joined.append(bool((candidates["qc_joined"] > 0).any()))
    return second, true, false, joined


def test_the_line_rule_judges_pieces_against_the_typical_spread_cell():
    """Five spread cells of 3,000 px among small compact bodies of 700 px and pieces of 900 px
    (all the candidates: a typical cell of 900 / 1.44 = 625 px): the line rule judges pieces
    against the spread cells' typical cell, 3,000 / 1.44 px. Never below the candidates' own; with
    fewer than 5 spread cells as big as the fragment rule's least cell (half a cell area, 660 px
    at 41 px), the candidates' own."""
    areas = np.array([3000.0] * 5 + [700.0] * 8 + [900.0] * 6)
    compact = np.array([False] * 5 + [True] * 8 + [False] * 6)
    typical = typical_cell_area(areas, 41)
    assert typical == pytest.approx(900 / 1.44)
    assert spread_typical_area(typical, areas, compact, 41) == pytest.approx(900 / 1.44)  # the pieces are spread too
    spread = ~compact & (areas > 1000)
    assert spread_typical_area(typical, areas[spread | compact], compact[spread | compact], 41) == pytest.approx(
        3000 / 1.44
    )
    assert spread_typical_area(5000.0, areas[spread | compact], compact[spread | compact], 41) == 5000.0
    few = np.r_[np.flatnonzero(compact), np.flatnonzero(spread)[:4]]
    assert spread_typical_area(typical, areas[few], compact[few], 41) == typical


def _labelled_away(names: tuple[str, ...], reason: str) -> tuple[int, int, int]:
    """Over the named Usiigaci fields: how many candidates a rule labels away (qc_reason holding
    reason), and how many of those would have been false and true detections as cells."""
    found, false, true = 0, 0, 0
    for name in names:
        image = read_image(USIIGACI / "images" / f"{name}.tif")
        truth = cv2.imread(str(USIIGACI / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        candidates = find_candidates(image, SegmentationParams())[0]
        cells = candidates[candidates["qc"] == "cell"]
        away = candidates[candidates["qc_reason"].str.contains(reason)]
        kept = score_point_in_mask(cells[["x", "y"]].to_numpy(float), truth)
        with_away = score_point_in_mask(pd.concat([cells, away])[["x", "y"]].to_numpy(float), truth)
        found += len(away)
        false += with_away["fp"] - kept["fp"]
        true += with_away["tp"] - kept["tp"]
    return found, false, true


def test_a_candidate_small_against_the_images_typical_cell_is_not_a_cell():
    """Half a cell area at the segmentation's scale passes the fragment rule, but where the
    image's cells are larger than that scale (typical cell of 3,000 px against 1,257 px at d =
    40) it is under 0.4 of a typical cell: a fragment beside others, debris alone. A rounded
    (compact) cell is small by nature and stays a cell; without a typical size nothing changes."""
    measures = pd.DataFrame(
        {
            "qc_area_ratio": [0.8, 0.8, 0.8, 2.0],
            "qc_nearest_cell_px": [0.0, 80.0, 0.0, 0.0],
            "qc_texture_contrast": [3.0, 3.0, 3.0, 3.0],
        }
    )
    usable, compact = np.ones(4, bool), np.array([False, False, True, False])
    verdict = label_quality(measures, usable, 40, QualityRules(), compact, typical_area_px=3000.0)
    assert verdict["qc"].tolist() == ["fragment", "debris", "cell", "cell"]
    assert "typical cell of this image" in verdict["qc_reason"].iloc[0]
    assert (label_quality(measures, usable, 40, QualityRules(), compact)["qc"] == "cell").all()


@needs_usiigaci
def test_usiigaci_candidates_small_against_a_typical_cell_are_false_detections():
    """On set12, set17, set18, set22 and set24 the candidates under 0.4 of the field's typical
    cell (specks of debris, pieces of halo and protrusions) are labelled fragment or debris, and
    all but at most one of them were false detections (16 of 16 when measured)."""
    found, false, true = _labelled_away(("set12", "set17", "set18", "set22", "set24"), "typical cell of this image")
    assert found >= 12 and true <= 1 and false >= found - 1


def test_a_thin_candidate_is_not_a_cell_even_when_compact():
    measures = pd.DataFrame(
        {
            "qc_area_ratio": [1.3, 0.8, 0.8, 0.3],
            "qc_nearest_cell_px": [0.0, 80.0, 0.0, 0.0],
            "qc_texture_contrast": [3.0, 3.0, 3.0, 3.0],
            "qc_thickness": [0.4, 0.1, 0.1, 0.12],
        }
    )
    compact = np.array([False, False, False, True])
    verdict = label_quality(measures, np.ones(4, bool), 40, QualityRules(), compact=compact)
    assert verdict["qc"].tolist() == ["cell", "debris", "fragment", "fragment"]
    assert all("thinner than a cell body" in why for why in verdict["qc_reason"].iloc[1:])
    off = label_quality(measures, np.ones(4, bool), 40, QualityRules(min_thickness_scale=0), compact=compact)
    assert off["qc"].tolist() == ["cell", "cell", "cell", "cell"]


@needs_usiigaci
def test_usiigaci_thin_pieces_are_not_cells():
    """On set9 (spread cells with long processes) the thickness rule takes away false detections
    (thin processes, halo slivers) and no annotated cell's detection."""
    image = read_image(USIIGACI / "images" / "set9.tif")
    truth = cv2.imread(str(USIIGACI / "masks" / "set9.png"), cv2.IMREAD_UNCHANGED)
    scores = {}
    # the speck, pale and line rules, judged after it, would label most of the same pieces: left out
    alone = {"min_outline_scale": 0.0, "line_level": -np.inf, "pale_level": -np.inf, "ringed_level": -np.inf}
    for name, rules in (("on", QualityRules(**alone)), ("off", QualityRules(min_thickness_scale=0, **alone))):
        candidates = find_candidates(image, SegmentationParams(), rules)[0]
        cells = candidates[candidates["qc"] == "cell"]
        scores[name] = score_point_in_mask(cells[["x", "y"]].to_numpy(float), truth)
        if name == "on":
            assert (cells["qc_thickness"] >= 0.15).all()
    assert scores["on"]["tp"] == scores["off"]["tp"]
    assert scores["on"]["fp"] <= scores["off"]["fp"] - 3


def test_a_candidate_whose_centre_lies_off_its_own_pixels_is_not_a_cell():
    measures = pd.DataFrame(
        {"qc_area_ratio": [1.5, 1.5, 1.5], "qc_nearest_cell_px": [0.0, 0.0, 80.0], "qc_texture_contrast": [3.0] * 3}
    )
    inside = np.array([True, False, False])
    verdict = label_quality(measures, np.ones(3, bool), 40, centres_inside=inside)
    assert verdict["qc"].tolist() == ["cell", "fragment", "debris"]
    assert "of its own pixels" in verdict["qc_reason"].iloc[1]
    assert label_quality(measures, np.ones(3, bool), 40)["qc"].tolist() == ["cell"] * 3


def test_a_centre_off_or_at_the_edge_of_its_own_pixels_is_not_inside():
    labels = np.zeros((200, 340), np.int32)
    cv2.circle(labels, (50, 100), 30, 1, -1)  # a cell body: its centre deep inside
    cv2.ellipse(labels, (170, 100), (40, 40), 0, 200, 340, 2, 12)  # a crescent: its centre off it
    cv2.rectangle(labels, (230, 40), (325, 50), 3, -1)  # an L: its centre 1 px inside its edge
    cv2.rectangle(labels, (230, 40), (252, 160), 3, -1)
    cells = measure_cells(labels)
    assert centres_inside(labels, cells).tolist() == [True, False, False]
    assert centres_inside(labels, cells, QualityRules(min_centre_depth=0)).tolist() == [True, False, True]


def test_a_cells_position_is_its_bodys_centre_not_pulled_by_a_process():
    labels = np.zeros((200, 300), np.int32)
    cv2.circle(labels, (70, 100), 30, 1, -1)  # a cell body
    cv2.rectangle(labels, (95, 96), (280, 104), 1, -1)  # and its long thin process
    cells = measure_cells(labels)
    assert cells["x"].iloc[0] > 90  # the centroid: pulled off the body's centre toward the process
    moved = body_centres(labels, cells)
    assert abs(moved["x"].iloc[0] - 70) <= 2 and abs(moved["y"].iloc[0] - 100) <= 1
    assert moved["area"].equals(cells["area"])  # only the position moves


def test_a_cells_position_is_on_its_dark_body_not_its_bright_lamellipodium():
    labels = np.zeros((200, 300), np.int32)
    cv2.rectangle(labels, (40, 60), (240, 140), 1, -1)  # one candidate, as thick all along
    z = np.full(labels.shape, 4.0, np.float32)  # bright: a lamellipodium, halo
    cv2.circle(z, (80, 100), 30, -20.0, -1)  # its dark body at one end
    cells = measure_cells(labels)
    assert abs(cells["x"].iloc[0] - 140) <= 1  # the centroid: the middle of the outline
    assert abs(body_centres(labels, cells)["x"].iloc[0] - 140) <= 1  # without z: the geometric body
    moved = body_centres(labels, cells, z=z)
    assert abs(moved["x"].iloc[0] - 80) <= 10 and abs(moved["y"].iloc[0] - 100) <= 2  # inside the dark disc
    no_dark = body_centres(labels, cells, z=np.zeros_like(z))  # no dark pixel: the geometric body
    assert abs(no_dark["x"].iloc[0] - 140) <= 1


@needs_usiigaci
def test_usiigaci_body_centres_land_in_more_cells_than_centroids():
    """On set13 (spread cells with processes) the centroids of several found cells fall in the
    medium beside them; their bodies' centres are inside: more true and fewer false detections
    than the same candidates' centroids."""
    image = read_image(USIIGACI / "images" / "set13.tif")
    truth = cv2.imread(str(USIIGACI / "masks" / "set13.png"), cv2.IMREAD_UNCHANGED)
    candidates, labels, _ = find_candidates(image, SegmentationParams())
    cells = candidates[candidates["qc"] == "cell"]
    centroids = measure_cells(labels).set_index("cell_id").loc[cells["cell_id"]]
    body = score_point_in_mask(cells[["x", "y"]].to_numpy(float), truth)
    centroid = score_point_in_mask(centroids[["x", "y"]].to_numpy(float), truth)
    assert body["tp"] >= centroid["tp"] + 5 and body["fp"] <= centroid["fp"] - 5


@needs_usiigaci
def test_usiigaci_crescents_of_halo_are_not_cells():
    """On set8 and set9 (spread cells, sparse) some candidates are crescents of halo hugging a
    cell or pieces bent around a neighbour, their centre off or at the edge of their own pixels:
    labelled fragment, and all but at most two of them were false detections (one was before the
    line rule judged pieces against the typical spread cell: now set9's annotated cell 18 has no
    other detection, its own, 2,677 px, being taken as a piece of a touching neighbour)."""
    found, false, true = _labelled_away(("set8", "set9"), "of its own pixels")
    assert found >= 10 and true <= 2 and false >= found - 2


def test_a_candidate_within_a_frame_along_the_border_is_cut_by_it():
    """A label touching the image's border and lying wholly within the frame of the given width
    is cut by it; one reaching further in, or one off the border, is not."""
    labels = np.zeros((200, 200), np.int32)
    labels[50:90, 0:15] = 1  # on the left border, 15 px in
    labels[120:160, 0:40] = 2  # on the left border, 40 px in
    labels[90:130, 90:100] = 3  # inside, 10 px wide
    labels[185:200, 185:200] = 4  # in the corner, 15 px from both borders
    cells = measure_cells(labels)
    assert within_border_frame(labels, cells, 20).tolist() == [True, False, False, True]
    assert within_border_frame(labels, cells, 10).tolist() == [False] * 4


def test_a_sliver_cut_by_the_border_with_under_half_a_typical_cell_in_view_is_edge():
    """Cut by the image's border, reaching less than a typical cell's radius into the field and
    holding less than half a typical cell, a candidate's centre lies outside the field: labelled
    edge, with its reason. One as big as a typical cell (a long cell lying along the border),
    one not cut, or any without a typical size, stays a cell."""
    measures = pd.DataFrame(
        {"qc_area_ratio": [0.7, 2.0, 0.7], "qc_nearest_cell_px": [0.0, 0.0, 0.0], "qc_texture_contrast": [3.0] * 3}
    )
    cut = np.array([True, True, False])
    verdict = label_quality(measures, np.ones(3, bool), 40, typical_area_px=2000.0, border_cut=cut)
    assert verdict["qc"].tolist() == ["edge", "cell", "cell"]
    assert "image's border" in verdict["qc_reason"].iloc[0]
    assert (label_quality(measures, np.ones(3, bool), 40, border_cut=cut)["qc"] == "cell").all()


@needs_usiigaci
def test_usiigaci_pieces_of_cells_outside_the_field_are_not_cells():
    """On set6, set8, set13, set15 and set16, candidates cut by the image's border that reach less
    than a typical cell's radius into the field with under half a typical cell in view (cells
    whose centre lies outside it, unannotated) are labelled edge, and all but at most one were
    false detections (14 of 14 when measured; over the 24 fields 19 false and 1 true)."""
    found, false, true = _labelled_away(("set6", "set8", "set13", "set15", "set16"), "cut by the image's border")
    assert found >= 11 and true <= 1 and false >= found - 1


def test_a_faint_candidate_is_debris_and_an_off_culture_one_is_edge():
    measures = pd.DataFrame(
        {"qc_area_ratio": [2.0, 2.0], "qc_nearest_cell_px": [0.0, 0.0], "qc_texture_contrast": [0.5, 3.0]}
    )
    verdict = label_quality(measures, np.array([True, False]), cell_diameter_px=40)
    assert verdict["qc"].tolist() == ["debris", "edge"]
    assert set(verdict["qc"]) <= set(QC_LABELS)


def _long_cell(length: int = 110, width: int = 11, blobs: tuple[int, ...] = (-70, 70)) -> tuple[np.ndarray, np.ndarray]:
    """A spindle 2 x length long and 2 x width wide at 15 degrees, its nucleus and the far end of
    its body drawn as two dark blobs (thicker) with grey cytoplasm between; (image, body mask)."""
    shape, centre, angle = (256, 360), (180, 128), np.deg2rad(15)
    body = np.zeros(shape, np.uint8)
    cv2.ellipse(body, centre, (length, width), 15, 0, 360, 1, -1)
    dist = cv2.distanceTransform(body, cv2.DIST_L2, 3)
    phase = np.sqrt(dist / dist.max()).astype(np.float32)
    for offset in blobs:
        blob = np.zeros(shape, np.float32)
        cv2.circle(
            blob,
            (int(centre[0] + offset * np.cos(angle)), int(centre[1] + offset * np.sin(angle))),
            int(width * 0.8),
            1.0,
            -1,
        )
        phase += 0.8 * cv2.GaussianBlur(blob, (0, 0), 3)
    contrast = phase - cv2.GaussianBlur(phase, (0, 0), 3.0)
    image = 32000 * (1 - contrast - 0.08 * phase) + np.random.default_rng(0).normal(0, 400, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), body


def test_a_long_cell_gives_one_detection():
    """Its two dark blobs are 3.5 diameters apart: they used to give three detections (head, middle, tail)."""
    image, body = _long_cell()
    cells, _ = find_cells(image)
    assert len(cells) == 1, cells[["x", "y", "area"]]
    assert cells["area"].iloc[0] >= 0.8 * body.sum()


# ---- cell size ----------------------------------------------------------------------------


@needs_t98g
def test_size_estimate_on_t98g_lands_within_25_percent_of_the_annotated_diameter():
    paths = sorted((T98G / "images").glob("*.tif"))
    estimate = estimate_cell_diameter(read_image(p) for p in paths)
    truth = np.mean(
        [_annotated_diameter(cv2.imread(str(T98G / "masks" / f"{p.stem}.png"), cv2.IMREAD_UNCHANGED)) for p in paths]
    )
    assert estimate.n_images == 6 and estimate.n_cells >= 100
    assert abs(estimate.diameter_px / truth - 1) <= 0.25, (estimate, truth)


def _cells_in_a_small_field(d: float = 40.0) -> tuple[pd.DataFrame, np.ndarray]:
    """Candidates and labels of a 260 x 400 field at scale d: 4 whole discs of radius 30 px, 6
    of them cut by the border (half or less in view), and one whole disc labelled debris."""
    labels = np.zeros((260, 400), np.int32)
    centres = [(100, 90), (200, 80), (300, 170), (120, 180), (0, 60), (399, 120), (150, 0), (250, 259), (0, 259)]
    centres += [(399, 0), (330, 60)]
    for k, (x, y) in enumerate(centres, 1):
        cv2.circle(labels, (x, y), 30 if k < 11 else 12, k, -1)
    ids = np.arange(1, len(centres) + 1)
    area = np.bincount(labels.ravel(), minlength=len(ids) + 1)[1:]
    qc = np.where(ids == 11, "debris", "cell")
    return pd.DataFrame({"cell_id": ids, "qc": qc, "qc_area_ratio": area / (np.pi * d**2 / 4)}), labels


def test_cells_cut_by_the_field_edge_do_not_pull_the_size_estimate_down():
    """A small field of large cells shows most of them cut by its edge (about 2 in 3 on the
    U373-like tiles): their pieces were read as small cells. Only the cells seen whole count,
    each weighted by the inverse of the chance that a cell of its bounding box lies inside the
    field (Miles-Lantuejoul); the cut ones and the debris get weight 0. Before: the median of
    all, halves included (here 0.71x the whole discs' diameter)."""
    candidates, labels = _cells_in_a_small_field()
    diameters, weights = cell_diameters(candidates, 40.0), whole_cell_weights(candidates, labels)
    assert len(diameters) == len(weights) == 10
    np.testing.assert_array_equal(weights[4:], 0)  # cut by the border
    box = 61  # a disc of radius 30 spans 61 px
    np.testing.assert_allclose(weights[:4], 260 * 400 / ((260 - box - 1) * (400 - box - 1)))
    whole = float(np.median(diameters[:4]))
    plate = estimate_from_diameters([diameters, diameters], [weights, weights])
    assert plate.diameter_px == round(whole / 1.24, 1) and plate.n_cells == 20  # WHOLE_FOUND_PER_TRUE_DIAMETER
    assert plate.n_whole == 8 and "edge-corrected: the 8 seen whole" in plate.note()
    assert estimate_from_diameters([diameters, diameters]).diameter_px < 0.85 * plate.diameter_px  # unweighted
    # fewer than 5 cells seen whole: the median of all
    few = estimate_from_diameters([diameters, diameters], [weights * (np.arange(10) < 2)] * 2)
    assert few.diameter_px == estimate_from_diameters([diameters, diameters]).diameter_px
    # only above the magnification band: at the reference set-up (and below) the median of all,
    # cut cells included, is what the calibration (1.2) was measured on
    assert [edge_corrected(m) for m in (None, 0.5, 1.0, 1.5, 1.6, 2.0)] == [False] * 4 + [True] * 2


def test_pieces_seen_whole_in_small_fields_do_not_pass_for_the_plates_cells():
    """Small fields judge their candidates against a typical cell read from a few, mostly cut,
    so pieces (and debris) seen whole pass there as cells. Those under 0.4 of the plate's typical
    cell area (the median of all its first-pass cells over 1.2, as an image's quality rules do)
    are left out before the edge-corrected median: here 8 pieces of 17 px outweigh the 5 whole
    cells of 60 px, which the estimate keeps (60 / 1.24 px, not 17 / 1.24)."""
    diameters = np.array([60.0] * 5 + [43.0] * 6 + [30.0] * 2 + [17.0] * 8)
    weights = np.array([1.5] * 5 + [0.0] * 8 + [1.1] * 8)
    assert estimate_from_diameters([diameters], [weights]).diameter_px == round(60.0 / 1.24, 1)
    assert estimate_from_diameters([diameters]).diameter_px == round(43.0 / 1.2, 1)  # without weights: the median


def _scaled_field(seed: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    field = synthesize_image(np.random.default_rng(seed), CULTURE_MIXTURES["GBM02"], 40)
    image = cv2.resize(field.image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    labels = cv2.resize(field.labels, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    return image, labels


def test_size_estimate_follows_a_synthetic_plate_drawn_at_another_scale():
    fields = [_scaled_field(seed, 1.8) for seed in range(3)]
    estimate = estimate_cell_diameter(image for image, _ in fields)
    truth = np.mean([_annotated_diameter(labels) for _, labels in fields])
    assert truth > 65  # 1.8x the generator's cells
    assert abs(estimate.diameter_px / truth - 1) <= 0.25, (estimate, truth)
    params = estimate.params(SegmentationParams())
    assert params.cell_diameter_px > 40  # cells are found at a scale moved towards them
    found = [
        score_point_in_mask(find_cells(image, params)[0][["x", "y"]].to_numpy(), labels) for image, labels in fields
    ]
    default = [score_point_in_mask(find_cells(image)[0][["x", "y"]].to_numpy(), labels) for image, labels in fields]
    # the default scale cuts these cells in pieces; merging dark-joined pieces mends most of
    # that (precision 0.97 against 0.96 at the estimated scale), not all (recall 0.94 against 0.975)
    assert np.mean([s["f1"] for s in found]) > np.mean([s["f1"] for s in default])
    assert min(s["recall"] for s in found) >= 0.85


def test_no_estimate_without_enough_cells_and_the_default_scale_stays():
    empty = np.full((256, 256), 30000, np.uint16)
    estimate = estimate_cell_diameter([empty])
    assert estimate.diameter_px is None and "cells" in estimate.reason
    assert estimate.params(SegmentationParams()) == SegmentationParams()
    assert (
        CellSizeEstimate(50.0, 100, 2).params(SegmentationParams()).cell_diameter_px == 41.0
    )  # 41 is within 0.6-1.4 x 50
    assert CellSizeEstimate(120.0, 100, 2).params(SegmentationParams()).cell_diameter_px == 72.0  # 0.6 x 120
    assert CellSizeEstimate(20.0, 100, 2).params(SegmentationParams()).cell_diameter_px == 28.0  # 1.4 x 20


def test_sample_images_spreads_over_the_plate():
    names = [f"img{i:03d}.tif" for i in range(100)]
    picked = sample_images(names, 8)
    assert len(picked) == 8 and picked[0] == names[0] and picked[-1] == names[-1]
    assert sample_images(names[:3], 8) == names[:3]


# ---- dense fields -------------------------------------------------------------------------


def test_a_dense_field_gives_many_cells_not_a_few():
    """A 704 x 520 tile packed with cells: cell finding used to find 2 or 3 (no seed was darker
    than the whole image, whose level and spread were the cells' own)."""
    field = synthesize_image(np.random.default_rng(1), CULTURE_MIXTURES["GBM03"], 300, size=704)
    image, labels = field.image[:520], field.labels[:520]
    n_true = len(np.unique(labels)) - 1
    assert n_true >= 100
    cells, _ = find_cells(image)
    score = score_point_in_mask(cells[["x", "y"]].to_numpy(), labels)
    assert len(cells) >= 0.4 * n_true, (len(cells), n_true)
    assert score["precision"] >= 0.85


@pytest.mark.parametrize(("culture", "n_cells"), [("GBM01", 500), ("GBM04", 300)])
def test_a_crowded_field_gives_most_of_its_cells(culture, n_cells):
    """Crowded 704 x 520 tiles (cells over most of the field, merged into a few objects): seeds of
    neighbours pressed together must not be grouped into one cell, and rounded bright cells
    must be found on their disc. Recall was 0.34 and 0.20 (precision 0.95 and 0.86)."""
    field = synthesize_image(np.random.default_rng(1), CULTURE_MIXTURES[culture], n_cells, size=704)
    image, labels = field.image[:520], field.labels[:520]
    cells, _ = find_cells(image)
    score = score_point_in_mask(cells[["x", "y"]].to_numpy(), labels)
    assert score["recall"] >= 0.55, score
    assert score["precision"] >= 0.9, score


def test_rounded_bright_cells_of_a_crowded_field_are_found_on_their_disc():
    """A crowded tile with 114 rounded cells, which phase contrast shows as bright discs: a
    detection's centre must fall on each (it used to be placed on a dark neighbour, if at all)."""
    field = synthesize_image(np.random.default_rng(1), CULTURE_MIXTURES["GBM04"], 500, size=704)
    image, labels = field.image[:520], field.labels[:520]
    rounded = field.cells.loc[field.cells["morphotype"] == "small_round", "mask_id"].to_numpy()
    rounded = rounded[np.isin(rounded, labels)]
    assert len(rounded) >= 100
    cells, _ = find_cells(image)
    rows = np.clip(np.rint(cells["y"].to_numpy()).astype(int), 0, image.shape[0] - 1)
    cols = np.clip(np.rint(cells["x"].to_numpy()).astype(int), 0, image.shape[1] - 1)
    found = np.isin(rounded, labels[rows, cols]).mean()
    assert found >= 0.85, found


def _crowded_tile_found(mixture: str, n_cells: int, morphotype: str) -> tuple[int, float, float]:
    """On a 704 x 520 tile of the culture mixture (seed 1, n_cells asked for at 704 px): how many
    cells of the morphotype it holds, the share of them a found cell's centre falls on, and
    find_cells' precision."""
    field = synthesize_image(np.random.default_rng(1), CULTURE_MIXTURES[mixture], n_cells, size=704)
    image, labels = field.image[:520], field.labels[:520]
    wanted = field.cells.loc[field.cells["morphotype"] == morphotype, "mask_id"].to_numpy()
    wanted = wanted[np.isin(wanted, labels)]
    cells, _ = find_cells(image)
    rows = np.clip(np.rint(cells["y"].to_numpy()).astype(int), 0, image.shape[0] - 1)
    cols = np.clip(np.rint(cells["x"].to_numpy()).astype(int), 0, image.shape[1] - 1)
    found = float(np.isin(wanted, labels[rows, cols]).mean())
    return len(wanted), found, score_point_in_mask(cells[["x", "y"]].to_numpy(), labels)["precision"]


def test_clumped_round_cells_of_a_crowded_field_are_found():
    """A crowded tile with 72 cells in clumps of small round cells, whose bodies join through
    the merged object and show no solidly dark disc: a detection's centre must fall on most of
    them (13 of 72 were found; 32 with halo-ringed bodies seeded however dark; 56 since the discs
    darker than the medium by CROWDED_BODY_LEVEL are bodies too), at no cost in precision."""
    n, found, precision = _crowded_tile_found("GBM04", 300, "clump")
    assert n >= 60 and found >= 0.7 and precision >= 0.95


def test_large_flat_cells_pressed_together_in_a_crowded_field_are_told_apart():
    """A crowded tile of large flat cells pressed on each other with no seam that stands above the
    noise between them: their seeds, about 1.5 diameters apart, were grouped into one cell (52 of
    the 64 cells found, precision 0.97). In a crowded field seeds more than a cell diameter apart
    are two cells' (measured: 63 of 64, precision 0.98)."""
    n, found, precision = _crowded_tile_found("GBM01", 150, "large_flat")
    assert n >= 60 and found >= 0.9 and precision >= 0.95


def _neuroblastoma_like_tile(seed: int, n_cells: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """A confluent 704 x 520 8-bit tile drawn like a dense SH-SY5Y culture (uint8 image, int
    labels): the hard drawing's small round, clumped, fusiform and multipolar cells, n_cells asked
    for, with one to three 1 px dark neurites from each cell."""
    rng = np.random.default_rng(seed)
    mixture = {"small_round": 0.2, "fusiform": 0.3, "multipolar": 0.2, "clump": 0.3}
    field = synthesize_image(rng, mixture, n_cells, size=704, difficulty="hard")
    image, labels = field.image[:520].astype(np.float32), field.labels[:520]
    neurites = np.zeros_like(image)
    for x0, y0 in field.cells.loc[field.cells["y"] < 519, ["x", "y"]].to_numpy():
        for _ in range(rng.integers(1, 4)):  # 30-90 px long, gently curved
            angle, x, y, points = rng.uniform(0, 2 * np.pi), x0, y0, []
            for _ in range(int(rng.uniform(30, 90) / 3)):
                angle += rng.normal(0, 0.15)
                x, y = x + 3 * np.cos(angle), y + 3 * np.sin(angle)
                points.append((x, y))
            cv2.polylines(neurites, [np.array(points, np.int32)], False, 1.0, 1, cv2.LINE_AA)
    lo, hi = np.percentile(image, [0.5, 99.5])
    image -= neurites * 0.25 * (np.median(image) - lo)  # thin, dark, fainter than the bodies
    return np.clip((image - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8), labels


@pytest.mark.parametrize("seed", [2, 3])
def test_a_confluent_field_with_flat_grey_cells_gives_its_cells(seed):
    """Confluent neuroblastoma-like tiles whose flat grey cell interiors pass for medium (the
    flat pixels outside the objects are mostly cell interior, the cells barely darker than
    them): cell finding found no cell at all on these two. The medium is the brighter mode of
    the flat pixels, and seeds are not grouped across it."""
    image, labels = _neuroblastoma_like_tile(seed)
    n_true = len(np.unique(labels)) - 1
    assert n_true >= 150
    cells, _ = find_cells(image)
    score = score_point_in_mask(cells[["x", "y"]].to_numpy(), labels)
    assert score["recall"] >= 0.35, score
    assert score["precision"] >= 0.85, score


@pytest.mark.parametrize("seed", [1, 2])
def test_the_round_cells_of_a_confluent_field_are_found_on_their_own_bodies(seed):
    """Confluent neuroblastoma-like tiles: the medium between the cells lies inside the merged
    objects and is no brighter than halo_level, so it joined every cell's body into one and the
    small round cells got no seed of their own (recall 0.53 and 0.45, precision 0.96). Their
    bodies are what is darker than the level between cell interior and medium, and a body that
    covers at most two of its inscribed discs is a round cell's (at four, each arm of a
    star-shaped cell was seeded too: precision 0.95 and 0.89)."""
    image, labels = _neuroblastoma_like_tile(seed)
    cells, _ = find_cells(image)
    score = score_point_in_mask(cells[["x", "y"]].to_numpy(), labels)
    assert score["recall"] >= 0.65, score
    assert score["precision"] >= 0.9, score


def test_cells_of_a_confluent_field_are_placed_on_their_bodies():
    """A confluent neuroblastoma-like tile: a cell's centre is its pixels darker than the medium
    by the solid-body level, and these were measured against the flat pixels outside the objects,
    half of them cell interior, so that centres of round cells fell beside them (precision 0.91;
    0.92 originally). Measured against the medium found (the brighter mode), 0.96 (0.95 since
    flat grey candidates there are no longer called faint debris, recall 0.78 -> 0.85)."""
    image, labels = _neuroblastoma_like_tile(3)
    cells, _ = find_cells(image)
    score = score_point_in_mask(cells[["x", "y"]].to_numpy(), labels)
    assert score["precision"] >= 0.94, score
    assert score["recall"] >= 0.8, score


def test_flat_grey_cells_of_a_confluent_field_are_not_called_debris():
    """A confluent neuroblastoma-like tile: its cells are the flat grey interiors that made its
    flat pixels two modes, so texture under the foreground threshold says nothing there, and a
    cell is a share of a merged object whose centroid falls off its body. 12 candidates centred on
    annotated cells that no cell claimed were labelled debris (too faint) or fragments (centroid at
    their edge); judged at their body centre, without the texture rule, none (precision 0.97 and
    0.97, recall 0.78 -> 0.83)."""
    image, labels = _neuroblastoma_like_tile(2)
    candidates, _, _ = find_candidates(image)
    rows = np.clip(np.rint(candidates["y"].to_numpy()).astype(int), 0, image.shape[0] - 1)
    cols = np.clip(np.rint(candidates["x"].to_numpy()).astype(int), 0, image.shape[1] - 1)
    under = labels[rows, cols]
    is_cell = (candidates["qc"] == "cell").to_numpy()
    lost = np.setdiff1d(under[~is_cell & (under > 0)], under[is_cell])
    assert len(lost) <= 2, lost
    score = score_point_in_mask(candidates.loc[is_cell, ["x", "y"]].to_numpy(), labels)
    assert score["precision"] >= 0.95, score


@pytest.mark.parametrize("seed", [0, 5])
def test_clumped_round_cells_of_a_crowded_field_with_one_medium_mode_are_found(seed):
    """Crowded neuroblastoma-like tiles of 350 cells, whose flat pixels show one mode (no
    confluent split): the medium inside the merged objects is below halo_level and joined the
    bodies of clumped round cells into one, so they got no seed (recall 0.49 and 0.57, precision
    0.96 and 0.97). A body there is what is darker than the medium by CROWDED_BODY_LEVEL, a round
    cell's when it is a disc (measured: recall 0.78 and 0.80, precision 0.97 and 0.97)."""
    image, labels = _neuroblastoma_like_tile(seed, 350)
    params = SegmentationParams()
    norm = normalise(image, params)
    tex = texture(norm, params)
    assert confluent_split(norm, tex, texture_threshold(tex, params)) is None
    cells, _ = find_cells(image)
    score = score_point_in_mask(cells[["x", "y"]].to_numpy(), labels)
    assert score["recall"] >= 0.7, score
    assert score["precision"] >= 0.95, score


def test_a_seedless_body_of_a_confluent_field_gets_a_seed_at_its_deepest_pixel():
    """Three bodies darker than the level between interior and medium in one merged object: one
    holds a seed, one is too small to be a cell (under min_object_area_scale cell areas): the
    third, a flat grey cell that showed no dark blob, gets a seed at its centre."""
    params = SegmentationParams()
    z = np.full((200, 300), 2.0, np.float32)  # medium, in noise units of the confluent medium
    cv2.circle(z, (60, 100), 18, -3.0, -1)  # seeded
    cv2.circle(z, (150, 100), 18, -3.0, -1)  # no seed
    cv2.circle(z, (240, 100), 5, -3.0, -1)  # a speck
    obj = np.ones(z.shape, np.int32)
    seeds = seedless_body_seeds(z, -1.0, obj, np.array([[60.0, 100.0]]), params)
    assert seeds.shape == (1, 2)
    assert np.abs(seeds[0] - (150, 100)).max() <= 1


def test_confluent_split_lies_between_interior_and_medium():
    """The flat pixels of a confluent field in two modes (cell interior at -1, medium at +1,
    noise 0.25): the split falls between them; one mode alone gives no split."""
    rng = np.random.default_rng(0)
    interior = np.zeros((200, 200), bool)
    interior[:, :110] = True
    norm = (np.where(interior, -1.0, 1.0) + rng.normal(0, 0.25, interior.shape)).astype(np.float32)
    flat = np.zeros_like(norm)  # every pixel flat: below any texture threshold
    split = confluent_split(norm, flat, 1.0)
    assert split is not None and -0.6 < split < 0.6, split
    medium = confluent_medium(norm, flat, 1.0, split)
    assert medium[:, 120:].mean() > 0.99 and medium[:, :100].mean() < 0.01
    one_mode = rng.normal(0, 0.5, (200, 200)).astype(np.float32)
    assert confluent_split(one_mode, flat, 1.0) is None


# ---- through the assets -------------------------------------------------------------------


def _plate_with_debris(raw: Path, plate_id: str = "specks") -> Path:
    """A plate of two 512 x 512 images, each with 4 cells and 3 specks of debris in the medium."""
    import tifffile

    plate = raw / plate_id
    plate.mkdir(parents=True)
    for i in range(2):
        bodies = np.zeros((512, 512), np.uint8)
        for cx, cy in ((100, 100), (300, 120), (150, 330), (380, 380)):
            cv2.circle(bodies, (cx + 10 * i, cy), 20, 1, -1)
        for cx, cy in ((250, 250), (450, 200), (60, 450)):
            cv2.circle(bodies, (cx, cy + 5 * i), 7, 1, -1)
        tifffile.imwrite(plate / f"img{i}.tif", _phase_contrast(bodies, seed=i))
    pd.DataFrame(
        {
            "image": ["img0.tif", "img1.tif"],
            "culture": "GBM01",
            "concentration": "1000",
            "replicate": 1,
            "timepoint_h": 0.0,
        }
    ).to_csv(plate / "manifest.csv", index=False)
    return plate


def test_debris_stays_in_cell_coordinates_with_its_label_and_out_of_cell_crops(tmp_path):
    import dagster as dg
    import pyarrow.parquet as pq

    from gbm_assets.assets.cells import cell_coordinates, cell_crops
    from gbm_assets.assets.partitions import plates
    from gbm_assets.assets.raw_plates import raw_plates
    from gbm_assets.assets.resources import DataDirs
    from gbm_assets.paths import plate_file

    _plate_with_debris(tmp_path / "raw")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, ["specks"])

    def ingest(keep_qc: list[str]):
        config = {
            "ops": {
                "cell_crops": {"config": {"crop_size": 32, "workers": 1, "keep_qc": keep_qc}},
                "cell_coordinates": {"config": {"workers": 1, "cell_diameter_px": 40.0}},
            }
        }
        return dg.materialize(
            [raw_plates, cell_coordinates, cell_crops],
            partition_key="specks",
            instance=instance,
            resources={"data": DataDirs(root=str(tmp_path))},
            run_config=config,
        )

    result = ingest(["cell"])
    assert result.success
    coords = pd.read_parquet(plate_file(tmp_path / "cell_coordinates.parquet", "specks"))
    assert coords.groupby("qc").size().to_dict() == {"cell": 8, "debris": 6}
    assert (coords.loc[coords["qc"] == "debris", "qc_reason"].str.contains("no neighbour")).all()
    for column in ("ImageQuality_FocusScore", "ImageQuality_UsableFraction", "cell_diameter_px", "qc_area_ratio"):
        assert coords[column].notna().all(), column
    assert (coords["cell_diameter_px"] == 40.0).all()
    meta = result.asset_materializations_for_node("cell_coordinates")[0].metadata
    assert meta["qc_counts"].value == {"cell": 8, "debris": 6, "fragment": 0, "edge": 0}
    assert meta["n_cells"].value == 8 and meta["n_candidates"].value == 14
    crops = pq.read_table(plate_file(tmp_path / "cell_crops.parquet", "specks")).to_pandas()
    assert len(crops) == 8 and set(crops["qc"]) == {"cell"}
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["count_matches_coordinates"]

    assert ingest(["cell", "debris"]).success  # keep_qc: the debris is cropped too, with its label
    crops = pq.read_table(plate_file(tmp_path / "cell_crops.parquet", "specks")).to_pandas()
    assert crops.groupby("qc").size().to_dict() == {"cell": 8, "debris": 6}


def test_cell_coordinates_estimates_the_cell_size_when_none_is_given(tmp_path):
    import dagster as dg

    from gbm_assets.assets.cells import cell_coordinates
    from gbm_assets.assets.partitions import plates
    from gbm_assets.assets.raw_plates import raw_plates
    from gbm_assets.assets.resources import DataDirs
    from gbm_assets.imaging.synthetic import write_plates
    from gbm_assets.paths import plate_file

    plate_dir = write_plates(tmp_path / "raw", n_cultures=1, n_concentrations=5, images_per_plate=1, size=768)[-1]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_dir.name])
    result = dg.materialize(
        [raw_plates, cell_coordinates],
        partition_key=plate_dir.name,
        instance=instance,
        resources={"data": DataDirs(root=str(tmp_path))},
        run_config={"ops": {"cell_coordinates": {"config": {"workers": 1}}}},
    )
    assert result.success
    meta = result.asset_materializations_for_node("cell_coordinates")[0].metadata
    assert meta["cell_size"].value.startswith("estimated cell diameter"), meta["cell_size"].value
    coords = pd.read_parquet(plate_file(tmp_path / "cell_coordinates.parquet", plate_dir.name))
    assert coords["cell_diameter_px"].nunique() == 1
    truth = _annotated_diameter(cv2.imread(str(plate_dir / "masks" / "img000.png"), cv2.IMREAD_UNCHANGED))
    assert abs(coords["cell_diameter_px"].iloc[0] / truth - 1) <= 0.25
    assert meta["cell_diameter_px"].value == coords["cell_diameter_px"].iloc[0]


def test_report_shows_the_quality_labels_per_plate_and_per_image(tmp_path):
    import dagster as dg

    from gbm_assets.analysis.report import write_report
    from gbm_assets.assets.cells import cell_coordinates
    from gbm_assets.assets.partitions import plates
    from gbm_assets.assets.raw_plates import raw_plates
    from gbm_assets.assets.resources import DataDirs
    from gbm_assets.imaging.plate_coordinates import cell_finding_quality
    from gbm_assets_tests.test_report import comparison_table

    _plate_with_debris(tmp_path / "raw")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, ["specks"])
    data = DataDirs(root=str(tmp_path))
    assert dg.materialize(
        [raw_plates, cell_coordinates],
        partition_key="specks",
        instance=instance,
        resources={"data": data},
        run_config={"ops": {"cell_coordinates": {"config": {"workers": 1, "cell_diameter_px": 40.0}}}},
    ).success
    quality = cell_finding_quality(data.coordinates, data.masks)
    assert quality[["image", "cell", "debris", "fragment", "edge"]].to_dict("records") == [
        {"image": "img0.tif", "cell": 4, "debris": 3, "fragment": 0, "edge": 0},
        {"image": "img1.tif", "cell": 4, "debris": 3, "fragment": 0, "edge": 0},
    ]
    assert (quality["ImageQuality_UsableFraction"] == 1.0).all() and (quality["cell_diameter_px"] == 40.0).all()
    page = write_report(tmp_path / "report", comparison_table(), cell_finding=quality).read_text()
    assert "<h2>Cell finding</h2>" in page and "cell_finding.csv" in page
    assert page.count("img0.tif") == 1 and page.count("img1.tif") == 1  # the per-image table
    written = pd.read_csv(tmp_path / "report" / "cell_finding.csv")
    assert written["debris"].sum() == 6 and written["cell"].sum() == 8


@needs_t98g
def test_segment_command_estimates_the_cell_size_and_writes_the_labels(tmp_path, capsys):
    from gbm_assets.cli import main

    out = tmp_path / "cells.csv"
    assert main(["segment", str(T98G / "images"), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "estimated cell diameter" in printed and "cells in 6 images" in printed
    table = pd.read_csv(out)
    assert {"qc", "qc_reason", "cell_diameter_px", "ImageQuality_UsableFraction"} <= set(table.columns)
    assert table["cell_diameter_px"].nunique() == 1 and 45 < table["cell_diameter_px"].iloc[0] < 75
    assert main(["segment", str(T98G / "images"), "--out", str(out), "--workers", "1", "--cell-diameter", "40"]) == 0
    assert "estimated" not in capsys.readouterr().out
    assert (pd.read_csv(out)["cell_diameter_px"] == 40).all()


def test_the_size_estimates_first_pass_is_not_redone_at_the_same_scale(tmp_path, monkeypatch):
    """Most 10x plates are found at the default scale: the first pass's images are then reused,
    so estimating the size costs nothing there, and the table is the same as without it."""
    from gbm_assets.imaging import cell_size, plate_cells
    from gbm_assets.imaging.plate_coordinates import plate_coordinates

    plate = _plate_with_debris(tmp_path / "raw")
    calls = []
    for module, name in ((plate_cells, "find_candidates_boxed"), (cell_size, "find_candidates")):
        # every way cell finding is reached
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda image, params, real=real: calls.append(params) or real(image, params))
    estimated = plate_coordinates("specks", plate, ["img0.tif", "img1.tif"], workers=1)
    assert estimated.params == SegmentationParams() and estimated.size.diameter_px is None  # 8 cells: no estimate
    assert len(calls) == 2
    given = plate_coordinates("specks", plate, ["img0.tif", "img1.tif"], estimate_size=False, workers=1)
    pd.testing.assert_frame_equal(estimated.coordinates, given.coordinates)
    assert estimated.masks.equals(given.masks)


def test_inner_depth_counts_other_labels_as_edges_not_the_image_border_and_both_paths_agree():
    from gbm_assets.imaging.cell_quality import inner_depth

    labels = np.zeros((9, 12), np.int32)
    labels[:, :6] = 1  # touches the image's top, bottom and left border
    labels[2:7, 6:11] = 2  # touches label 1 on its left
    depth = inner_depth(labels)
    assert depth.dtype == np.float32 and depth.shape == labels.shape
    assert (depth[labels == 0] == 0).all()
    assert depth[4, 5] == 1 and depth[4, 6] == 1  # the border between two labels is an edge of both
    assert depth[0, 0] > 1  # the image's border is not background
    assert depth[4, 8] == 3  # the centre of the 5 x 5 square: two pixels in from its edge, counting itself
    # labels too large for the uint16 path take the neighbour tests, with the same result
    big = np.where(labels > 0, labels + 70_000, 0)
    np.testing.assert_array_equal(inner_depth(big), depth)


def test_depth_and_radius_after_merges_equal_those_measured_again():
    """find_candidates measures depth once before the merges and again only for merged labels
    (merged_depth): the result equals inner_depth and inscribed_radius of the merged labels,
    on a field of touching cells, some cut by the image's border, with pieces merged in chains."""
    from gbm_assets.imaging.cell_quality import inner_depth, inscribed_radius, merged_depth

    rng = np.random.default_rng(5)
    field = synthesize_image(rng, CULTURE_MIXTURES["GBM03"], 120, size=256)
    labels = field.labels.astype(np.int32)
    n = int(labels.max()) + 1
    depth, radius = inner_depth(labels), inscribed_radius(labels)
    # merge each label into the next one present in 1 of 3 cases (touching or not: a label
    # made of several pieces), and renumber the rest 1..k as fragment_map does
    present = np.flatnonzero(radius > 0)
    roots = np.arange(n)
    roots[present[:-1:3]] = present[1::3][: len(present[:-1:3])]
    keep = np.unique(roots[present])
    renumber = np.zeros(n, np.int32)
    renumber[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    mapping = renumber[roots]
    merged = mapping[labels]
    import scipy.ndimage as ndi

    assert (np.bincount(mapping[present]) > 1).sum() >= 5
    got_depth, got_radius = merged_depth(depth.copy(), radius, mapping, merged, ndi.find_objects(merged))
    np.testing.assert_array_equal(got_depth, inner_depth(merged))
    np.testing.assert_array_equal(got_radius, inscribed_radius(merged))


def _body_and_piece(seam: float) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """A body of 60 x 40 px (label 1) and a piece of 30 x 40 px (label 2) touching along a
    vertical border, both 6 noise units darker than the medium, with a stripe 4 px wide of
    `seam` noise units on their border; (labels, cells with centres and areas, z)."""
    labels = np.zeros((80, 140), np.int32)
    labels[20:60, 10:70], labels[20:60, 70:100] = 1, 2
    z = np.zeros(labels.shape, np.float32)
    z[labels > 0] = -6.0
    z[20:60, 68:72] = seam
    cells = pd.DataFrame({"cell_id": [1, 2], "x": [39.5, 84.5], "y": [39.5, 39.5], "area": [2400.0, 1200.0]})
    return labels, cells, z


def test_the_smaller_of_two_cells_joined_by_a_line_that_crosses_no_halo_is_a_piece():
    """Two touching candidates whose bodies a straight line joins through cytoplasm (the line
    never rises above 3 noise units): the smaller, no bigger than a typical cell, is a piece of
    the larger. A halo (8 noise units) between them, a smaller one bigger than a typical cell,
    or two compact cells: two cells."""
    labels, cells, z = _body_and_piece(seam=-2.0)
    assert dark_line_pieces(labels, cells, z, 40, typical_area_px=1500).tolist() == [False, True]
    assert dark_line_pieces(labels, cells, z, 40, typical_area_px=1000).tolist() == [False, False]
    assert dark_line_pieces(labels, cells, z, 40, 1500, compact=np.array([True, True])).tolist() == [False, False]
    assert dark_line_pieces(labels, cells, z, 40, 1500, compact=np.array([False, True])).tolist() == [False, True]
    labels, cells, z = _body_and_piece(seam=8.0)
    assert dark_line_pieces(labels, cells, z, 40, typical_area_px=1500).tolist() == [False, False]
    # cells that do not touch are never pieces of each other
    labels, cells, z = _body_and_piece(seam=-2.0)
    labels[:, 68:72] = 0
    assert dark_line_pieces(labels, cells, z, 40, typical_area_px=1500).tolist() == [False, False]


def test_a_piece_joined_to_its_cell_past_a_bright_granule_on_the_line_is_a_piece():
    """A bright granule (a 3 x 3 px spot, 30 noise units) on the straight line between the two
    bodies of one cell lifts the line over the halo level, but a path beside it, within the
    corridor around the line (0.05 diameters, 2 px to either side at 40 px), runs through dark
    cytoplasm: the smaller is a piece. A seam across the whole contact (8 noise units) blocks
    every such path; a corridor of 0 px is the straight line alone."""
    labels, cells, z = _body_and_piece(seam=-2.0)
    z[39:42, 53:56] = 30.0  # on the line (row 40), between the two centres
    assert dark_line_pieces(labels, cells, z, 40, typical_area_px=1500).tolist() == [False, True]
    straight = QualityRules(line_corridor_scale=0.0)
    assert dark_line_pieces(labels, cells, z, 40, 1500, straight).tolist() == [False, False]
    labels, cells, z = _body_and_piece(seam=8.0)
    z[39:42, 53:56] = 30.0
    assert dark_line_pieces(labels, cells, z, 40, typical_area_px=1500).tolist() == [False, False]


def test_a_path_round_a_short_seam_through_the_medium_does_not_join_two_cells():
    """Two candidates touching along 3 px only, with a bright seam (8 noise units) over the whole
    contact: beside it the corridor (2 px to either side of the line at 40 px) reaches into the
    medium (0 noise units, under the halo level), which is no path through cytoplasm, so neither
    is a piece of the other."""
    labels, cells, z = _body_and_piece(seam=8.0)
    labels[20:39, 70:72], labels[42:60, 70:72] = 0, 0  # the two touch at rows 39..41 alone
    z[labels == 0] = 0.0
    z[39:42, 68:74] = 8.0
    cells["area"] = [float((labels == 1).sum()), float((labels == 2).sum())]
    assert dark_line_pieces(labels, cells, z, 40, typical_area_px=1500).tolist() == [False, False]


def test_a_candidate_whose_outline_is_a_speck_against_the_images_cells_is_not_a_cell():
    """Five cells with outlines of 1,000 px; beside them, outlines of 100 px (under 0.12 of the
    median): an elongated one (a fibre) and a round one that is not compact are specks, a fragment
    next to other candidates or debris alone; a compact cell with a round, convex outline (a cell
    rounded up) stays a cell. Fewer than 5 cell-sized candidates: no speck."""
    n = 9
    measures = pd.DataFrame(
        {
            "qc_area_ratio": [1.5] * 5 + [0.8] * 4,
            "qc_nearest_cell_px": [0.0] * 8 + [200.0],
            "qc_texture_contrast": [3.0] * n,
        }
    )
    outline = pd.DataFrame(
        {
            "area": [1000.0] * 5 + [100.0] * 4,
            "eccentricity": [0.5] * 5 + [0.95, 0.3, 0.3, 0.95],
            "solidity": [0.9] * 5 + [0.9, 0.95, 0.95, 0.9],
        }
    )
    compact = np.array([False] * 5 + [True, False, True, False])
    assert specks(outline, measures["qc_area_ratio"].to_numpy(), compact).tolist() == [False] * 5 + [
        True,
        True,
        False,
        True,
    ]
    verdict = label_quality(measures, np.ones(n, bool), 40, compact=compact, typical_area_px=2000, outline=outline)
    assert verdict["qc"].tolist() == ["cell"] * 5 + ["fragment", "fragment", "cell", "debris"]
    assert "outline" in verdict["qc_reason"].iloc[5]
    few = specks(outline.iloc[3:], measures["qc_area_ratio"].to_numpy()[3:], compact[3:])
    assert not few.any()
    # without a typical cell (a crowded field) or an outline, no rule on it
    assert label_quality(measures, np.ones(n, bool), 40, compact=compact, outline=outline)["qc"].tolist()[5:7] == [
        "cell",
        "cell",
    ]


@needs_usiigaci
def test_usiigaci_specks_are_not_cells():
    """On set8, set19 and set20 (debris, floating particles ringed by their halo, dark fibres),
    the candidates whose outline is a speck against the field's cells (17 of them at 41 px when
    measured) were all false detections."""
    found, false, true = _labelled_away(("set8", "set19", "set20"), "its outline")
    assert found >= 14 and true <= 1 and false >= found - 1


@needs_usiigaci
def test_usiigaci_second_detections_joined_to_their_cell_by_a_dark_line_are_not_cells():
    """On set6, set7, set8 and set9 (large spread cells, rounded bright ones full of vacuoles,
    found in two or three pieces), the smaller of two touching cells whose bodies a path along
    the straight line between them joins without crossing a halo were all false detections:
    second detections in one cell and pieces beside it (25 of 25 when measured; 10 of 10 with
    the straight line alone, which a bright granule or vacuole on it interrupts)."""
    found, false, true = _labelled_away(("set6", "set7", "set8", "set9"), "straight line between their bodies")
    assert found >= 22 and true <= 1 and false >= found - 1


def test_pixels_compared_in_their_own_dtype_match_numpys_float_comparison():
    from gbm_assets.imaging.field_quality import _as_pixel, _percent_at

    rng = np.random.default_rng(4)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.float32, bool):
        image = rng.integers(0, 200, (37, 41)).astype(dtype)
        for value in (float(image.max()), float(image.min()), 3.0, 2.5, -1.0, 70000.0, float(2**40), np.nan):
            np.testing.assert_array_equal(image == _as_pixel(image, value), image == value)
            expected = 100.0 * float(np.count_nonzero(image == value)) / image.size
            assert _percent_at(image, value) == expected
    assert isinstance(_as_pixel(np.zeros(3, np.uint16), 65535.0), np.uint16)


@needs_usiigaci
def test_large_components_are_opencvs_components_by_area_and_one_float_copy_serves_field_quality():
    from gbm_assets.imaging.field_quality import _large_components

    rng = np.random.default_rng(8)
    for density in (0.05, 0.3, 0.6):
        mask = (rng.random((90, 110)) < density).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for min_area in (1, 3, 12.5):
            keep = stats[:, cv2.CC_STAT_AREA] >= min_area
            keep[0] = False
            np.testing.assert_array_equal(_large_components(mask, min_area), keep[labels])
    image = read_image(USIIGACI / "images" / sorted(p.name for p in (USIIGACI / "images").glob("*.tif"))[0])
    objects = (np.arange(image.size).reshape(image.shape) // 997 % 5 == 0).astype(np.int32)
    given, made = field_quality(image, objects, 40, image.astype(np.float32)), field_quality(image, objects, 40)
    np.testing.assert_array_equal(given.usable, made.usable)
    assert given.measures == made.measures


def test_weighted_median_averages_two_values_only_when_half_the_weight_is_reached_exactly():
    values = np.array([30.0, 10.0, 20.0, 40.0])
    assert weighted_median(values, np.ones(4)) == np.median(values) == 25.0
    assert weighted_median(np.array([10.0, 20.0]), np.array([1.00001, 1.0])) == 10.0  # (15 before: "close" to half)
    assert weighted_median(np.array([10.0, 20.0]), np.array([1.0, 1.00001])) == 20.0
    assert weighted_median(values, np.array([1.0, 5.0, 1.0, 1.0])) == 10.0


def test_a_cell_far_paler_fainter_and_thinner_than_the_image_s_cells_is_flagged():
    """Robust z-scores against the image's own cells: a candidate that is at once pale (little
    dark body), faint (little texture) and thin is flagged; one that is only pale is not (pale
    spread cells exist); with fewer than MIN_CELLS cells nothing is."""
    rng = np.random.default_rng(0)
    n = 40
    measures = pd.DataFrame(
        {
            "qc_dark_fraction": rng.normal(0.2, 0.05, n),
            "qc_texture_contrast": rng.normal(3.8, 1.0, n),
            "qc_thickness": rng.normal(0.65, 0.15, n),
            "qc_halo_strength": np.full(n, 2.0),
            "qc_area_ratio": np.full(n, 1.0),
        }
    )
    measures.loc[0] = (0.05, 2.3, 0.4, 2.0, 1.0)  # pale, faint and thin: flat debris
    measures.loc[1] = (0.1, 3.8, 0.65, 2.0, 1.0)  # only pale
    is_cell = np.ones(n, bool)
    flagged = pale_outliers(measures, is_cell)
    assert flagged[0] and not flagged[1]
    assert not pale_outliers(measures, np.isin(np.arange(n), range(15))).any()
    assert not pale_outliers(measures, np.arange(n) > 0)[0]  # only cells are judged


def test_a_moderately_pale_candidate_ringed_like_a_cell_and_cell_sized_is_flagged():
    """Ringed pale (pale_outliers' second tier): dark fraction, texture and thickness each some
    1.2 deviations below the image's cells (summed -3.6: not under pale_level, -4) are flagged
    when the ring just outside is at least as bright as the cells' own halo and the area is not
    far below theirs; a weaker ring (a small rounded cell, a clump member without its own halo),
    a much smaller area, or one measure at the cells' level spares it."""
    n = 201
    q = norm.ppf(np.linspace(0.005, 0.995, n))  # robust z of each value: q / (1.4826 x MAD of q), about q
    spread = 1.4826 * float(np.median(np.abs(q)))
    rng = np.random.default_rng(0)  # each measure's values in its own order (not all lowest in one cell)
    cells = {
        column: centre + scale * rng.permutation(q) / spread
        for column, centre, scale in (
            ("qc_dark_fraction", 0.2, 0.05),
            ("qc_texture_contrast", 3.8, 1.0),
            ("qc_thickness", 0.65, 0.15),
            ("qc_halo_strength", 2.0, 0.5),
            ("qc_area_ratio", 1.0, 0.3),
        )
    }
    moderately_pale = {"qc_dark_fraction": 0.14, "qc_texture_contrast": 2.6, "qc_thickness": 0.47}
    rows = [
        moderately_pale | {"qc_halo_strength": 2.25, "qc_area_ratio": 1.0},  # ringed like a cell: flagged
        moderately_pale | {"qc_halo_strength": 1.75, "qc_area_ratio": 1.0},  # weaker ring than the cells'
        moderately_pale | {"qc_halo_strength": 2.25, "qc_area_ratio": 0.4},  # area z -2: far smaller
        moderately_pale | {"qc_halo_strength": 2.25, "qc_area_ratio": 1.0, "qc_thickness": 0.64},  # thickness z ~0
    ]
    measures = pd.concat([pd.DataFrame(cells), pd.DataFrame(rows)], ignore_index=True)
    flagged = pale_outliers(measures, np.ones(len(measures), bool))
    assert flagged[n:].tolist() == [True, False, False, False]
    assert not pale_outliers(measures, np.ones(len(measures), bool), QualityRules(ringed_level=-9.0))[n]


@needs_usiigaci
def test_usiigaci_pale_debris_far_from_cells_is_not_a_cell():
    """On set14, set16, set19 and set20 (small cells, found at 41 px) 46 detections lay more than
    8 px from any annotated cell (flat pale grainy debris without a dark body, dark fibres), 100
    false and 295 true in all. Paler, fainter and thinner than each image's own cells
    (pale_outliers): 39 far ones, 87 false, 295 true; with its ringed tier too: 32 far ones, 79
    false, 293 true."""
    far, true, false = 0, 0, 0
    for name in ("set14", "set16", "set19", "set20"):
        image = read_image(USIIGACI / "images" / f"{name}.tif")
        truth = cv2.imread(str(USIIGACI / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        cells = find_candidates(image, SegmentationParams())[0]
        cells = cells[cells["qc"] == "cell"]
        rows = np.rint(cells["y"]).astype(int).clip(0, truth.shape[0] - 1)
        cols = np.rint(cells["x"]).astype(int).clip(0, truth.shape[1] - 1)
        far += int((cv2.distanceTransform((truth == 0).astype(np.uint8), cv2.DIST_L2, 5)[rows, cols] > 8).sum())
        score = score_point_in_mask(cells[["x", "y"]].to_numpy(float), truth)
        true, false = true + score["tp"], false + score["fp"]
    assert far <= 32 and false <= 79 and true >= 293
