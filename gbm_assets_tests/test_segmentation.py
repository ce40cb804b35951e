"""Cell finding and measurement: shapes of known geometry, touching cells, scoring, and quality
on real T98G phase-contrast frames and on synthetic plates."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gbm_assets.imaging.cell_quality import QUALITY_COLUMNS
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.measurements import CELL_COLUMNS, halo_rim_width, measure_cells
from gbm_assets.imaging.scoring import score_point_in_mask, score_within_distance
from gbm_assets.imaging.segmentation import (
    MIN_SPREAD_PER_NOISE,
    SegmentationParams,
    find_cells,
    seed_params,
    split_along_halos,
)
from gbm_assets.schema import MEASUREMENT_COLUMNS

T98G = Path(__file__).resolve().parents[2] / "shared" / "data" / "t98g"
USIIGACI = T98G.parent / "usiigaci"


def _ellipse(a: float, b: float, angle: float = 0.0, size: int = 200, label: int = 1) -> np.ndarray:
    """Pixels whose centres lie inside the ellipse with semi-axes a, b centred in the image."""
    y, x = np.mgrid[:size, :size] - size // 2
    t = np.deg2rad(angle)
    u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    return np.where((u / a) ** 2 + (v / b) ** 2 <= 1, label, 0).astype(np.int32)


# ---- measurements on drawn shapes ---------------------------------------------------------


def test_disc_measurements():
    cells = measure_cells(_ellipse(30, 30))
    assert list(cells.columns) == list(CELL_COLUMNS)
    disc = cells.iloc[0]
    assert disc.cell_id == 1
    assert disc.x == pytest.approx(100, abs=0.5) and disc.y == pytest.approx(100, abs=0.5)
    assert disc.area == pytest.approx(np.pi * 30**2, rel=0.02)
    assert disc.major_axis_length == pytest.approx(60, rel=0.02)
    assert disc.minor_axis_length == pytest.approx(60, rel=0.02)
    assert disc.eccentricity < 0.1
    assert disc.solidity > 0.97
    assert disc.perimeter == pytest.approx(2 * np.pi * 30, rel=0.05)
    assert disc.form_factor > 0.9


def test_ellipse_axes_eccentricity_and_form_factor():
    ellipse = measure_cells(_ellipse(60, 20, angle=30)).iloc[0]
    assert ellipse.major_axis_length == pytest.approx(120, rel=0.02)
    assert ellipse.minor_axis_length == pytest.approx(40, rel=0.03)
    assert ellipse.eccentricity == pytest.approx(np.sqrt(1 - (20 / 60) ** 2), abs=0.02)
    assert ellipse.solidity > 0.97
    disc = measure_cells(_ellipse(35, 35)).iloc[0]
    assert ellipse.form_factor < disc.form_factor - 0.15


def test_concave_shape_has_low_solidity():
    labels = np.zeros((120, 120), np.int32)
    labels[10:110, 10:30] = 1  # an L: two bars at a right angle
    labels[90:110, 10:110] = 1
    cell = measure_cells(labels).iloc[0]
    assert cell.area == 100 * 20 + 20 * 80
    assert cell.solidity < 0.75


def test_measurements_keep_label_ids_and_skip_missing_ones():
    labels = _ellipse(20, 20, size=200, label=3)
    labels[10:30, 10:40] = 7
    cells = measure_cells(labels)
    assert cells.cell_id.tolist() == [3, 7]
    assert cells.loc[cells.cell_id == 7, "area"].item() == 20 * 30
    assert measure_cells(np.zeros((50, 50), np.int32)).empty


def test_measurements_match_scikit_image_regionprops(monkeypatch):
    pytest.importorskip("skimage")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # the benchmarks/ folder
    from benchmarks.reference_segmentation import regionprops_cells

    rng = np.random.default_rng(0)
    labels = np.zeros((300, 300), np.int32)
    for i in range(1, 13):
        centre, axes = rng.integers(30, 270, 2), rng.integers(5, 25, 2)
        cv2.ellipse(
            labels,
            (int(centre[0]), int(centre[1])),
            (int(axes[0]), int(axes[1])),
            float(rng.uniform(0, 180)),
            0,
            360,
            i,
            -1,
        )
    ours = measure_cells(labels).set_index("cell_id")
    theirs = regionprops_cells(labels).set_index("cell_id").loc[ours.index]
    exact = [c for c in ("x", "y", *MEASUREMENT_COLUMNS) if c != "solidity"]
    np.testing.assert_allclose(ours[exact].to_numpy(), theirs[exact].to_numpy(), rtol=1e-6, atol=1e-6)
    # Convex hulls are rasterised slightly differently; solidity agrees to about a percent.
    np.testing.assert_allclose(ours["solidity"], theirs["solidity"], atol=0.03)


# ---- finding cells ------------------------------------------------------------------------


def _phase_contrast(centres: list[tuple[int, int]], radius: int, size: int = 256, noise: float = 400) -> np.ndarray:
    """Phase-contrast-like image: dark bodies, bright halos, noise (the optics in one line:
    the image is light x (1 - high-passed optical thickness - absorption))."""
    phase = np.zeros((size, size), np.float32)
    for cx, cy in centres:
        body = np.zeros_like(phase)
        cv2.circle(body, (cx, cy), radius, 1.0, -1)
        dist = cv2.distanceTransform(body.astype(np.uint8), cv2.DIST_L2, 3)
        phase += np.sqrt(dist / dist.max()) * 1.2
    contrast = phase - cv2.GaussianBlur(phase, (0, 0), 3.0)
    image = 32000 * (1 - contrast - 0.08 * phase)
    image += np.random.default_rng(0).normal(0, noise, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16)


def test_find_cells_contract():
    image = _phase_contrast([(80, 80), (180, 170)], radius=18)
    cells, labels = find_cells(image)
    assert labels.dtype == np.int32 and labels.shape == image.shape
    assert list(cells.columns) == [*CELL_COLUMNS, *QUALITY_COLUMNS]
    assert set(cells["qc"]) == {"cell"}
    assert sorted(cells.cell_id) == list(range(1, len(cells) + 1)) == sorted(np.unique(labels[labels > 0]))
    assert len(cells) == 2
    for cell in cells.itertuples():
        assert labels[round(cell.y), round(cell.x)] == cell.cell_id
    with pytest.raises(ValueError):
        find_cells(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("noise", [0, 400])
def test_8_bit_and_noiseless_images(noise):
    """Coarse quantisation or no camera noise leaves a flat background: cells are still found."""
    image = _phase_contrast([(80, 80), (180, 170)], radius=18, noise=noise)
    for version in (image, (image // 256).astype(np.uint8)):
        cells, _ = find_cells(version)
        assert sorted(cells[["x", "y"]].round().itertuples(index=False)) == [(80, 80), (180, 170)]


@pytest.mark.parametrize("radius", [14, 18, 24])
def test_reported_area_is_the_drawn_body_not_its_halo(radius):
    """The object holds the bright halo ring and the medium texture smears onto (about 2x the
    body); the reported AreaShape measures are of the body's outline, the label mask unchanged."""
    cells, labels = find_cells(_phase_contrast([(80, 80), (180, 170)], radius=radius))
    body = np.pi * radius**2
    assert len(cells) == 2
    np.testing.assert_allclose(cells["area"], body, rtol=0.15)
    assert (np.bincount(labels.ravel())[1:] > 1.5 * body).all()  # the mask keeps the whole object
    np.testing.assert_allclose(cells["major_axis_length"], 2 * radius, rtol=0.1)


def test_halo_rim_width_follows_the_halo_and_is_zero_without_one():
    """Across a band of foreground: medium-level pixels, the halo's crest, then the dark body."""
    depth = np.tile(np.repeat(np.arange(1, 21, dtype=np.float32), 2), (40, 1))  # two columns each
    profile = np.array([1, 2, 4, 8, 10, 8, 4, 2, -5, -8] + [-8] * 10, np.float32)
    z = np.tile(np.repeat(profile, 2), (40, 1))
    inside = np.ones(z.shape, bool)
    # the crest at distance 5; the median falls below 3 noise units at distance 8
    assert halo_rim_width(depth, z, inside, 15, 3.0) == 8
    assert halo_rim_width(depth, np.minimum(z, 2.0), inside, 15, 3.0) == 0  # no halo
    assert halo_rim_width(depth, z, np.zeros_like(inside), 15, 3.0) == 0  # no foreground


def test_measure_within_a_mask_measures_the_inner_pixels_or_the_whole_object():
    labels = _ellipse(30, 30) + _ellipse(60, 60, size=200, label=2) * (_ellipse(30, 30) == 0)
    within = _ellipse(20, 20) > 0  # inside object 1 only: object 2 has no pixel in it
    cells = measure_cells(labels, within=within).set_index("cell_id")
    assert cells.loc[1, "area"] == np.count_nonzero(within)
    assert cells.loc[2, "area"] == np.count_nonzero(labels == 2)


def test_two_touching_cells_are_split():
    centres = [(110, 128), (146, 128)]  # radius 18: the two bodies touch
    cells, _ = find_cells(_phase_contrast(centres, radius=18))
    assert len(cells) == 2
    found = sorted(cells[["x", "y"]].itertuples(index=False))
    for (x, y), (cx, cy) in zip(found, centres, strict=False):
        assert np.hypot(x - cx, y - cy) < 6


@pytest.mark.parametrize("radius, step", [(10, 19), (9, 18)])
def test_chain_of_touching_round_cells_is_split(radius, step):
    centres = [(90 + i * step, 128) for i in range(4)]  # four small dark discs in a row, touching
    cells, _ = find_cells(_phase_contrast(centres, radius=radius))
    assert len(cells) == 4
    found = sorted(cells[["x", "y"]].itertuples(index=False))
    for (x, y), (cx, cy) in zip(found, centres, strict=False):
        assert np.hypot(x - cx, y - cy) < 5


def test_touching_cells_are_shared_along_the_halo_between_them():
    """A big and a small cell: the border is the halo line, not the midpoint of their seeds."""
    inside = np.ones((40, 84), bool)
    z = np.full(inside.shape, -10.0, np.float32)  # dark cell bodies, in noise units
    z[:, 60:62] = 20.0  # the bright halo between them
    seeds = np.zeros(inside.shape, np.int32)
    seeds[20, 30], seeds[20, 73] = 1, 2  # Voronoi would cut at column 51
    labels = split_along_halos(inside, seeds, z, SegmentationParams())
    assert (labels[:, :60] == 1).all() and (labels[:, 62:] == 2).all()
    no_halo = split_along_halos(inside, seeds, np.full(inside.shape, -10.0, np.float32), SegmentationParams())
    assert (no_halo[:, 52:] == 2).all()  # without a halo, nearest seed decides


@pytest.mark.parametrize("shape", [(37, 100), (300, 211), (64, 1024)])
def test_odd_sizes_noise_and_blobs_give_a_consistent_table(shape):
    """Whatever the image (noise, 8-bit, blobs cut by the edge), no warning, no crash, and the
    table and the label mask agree."""
    rng = np.random.default_rng(sum(shape))
    blobs = np.full(shape, 30000, np.float32)
    for _ in range(30):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        cv2.circle(blobs, centre, int(rng.integers(5, 30)), float(rng.integers(10000, 60000)), -1)
    images = [
        rng.integers(0, 65535, shape).astype(np.uint16),
        (rng.random(shape) * 255).astype(np.uint8),
        (blobs + rng.normal(0, 500, shape)).clip(0, 65535).astype(np.uint16),
    ]
    for image in images:
        for params in (SegmentationParams(), SegmentationParams(cell_diameter_px=12)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                cells, labels = find_cells(image, params)
            assert labels.shape == image.shape
            assert sorted(cells.cell_id) == sorted(np.unique(labels[labels > 0]))


def test_featureless_images_have_no_cells():
    images = (np.zeros((128, 128), np.uint8), np.full((100, 140), 3000, np.uint16), np.full((300, 211), 100, np.uint8))
    for image in images:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow or empty-slice warnings either
            cells, labels = find_cells(image)
        assert cells.empty and not labels.any()


def test_without_declumping_touching_cells_stay_one():
    image = _phase_contrast([(110, 128), (146, 128)], radius=18)
    cells, _ = find_cells(image, SegmentationParams(declump=False))
    assert len(cells) == 1


# ---- scoring ------------------------------------------------------------------------------


def test_score_point_in_mask():
    truth = np.zeros((50, 50), np.int32)
    truth[5:15, 5:15] = 1
    truth[30:40, 30:40] = 2
    truth[5:15, 30:40] = 3
    detections = [(10, 10), (12, 12), (35, 35), (25, 25), (-5, 80)]  # a double, a hit, 2 misses
    score = score_point_in_mask(detections, truth)
    assert (score["tp"], score["fp"], score["fn"]) == (2, 3, 1)
    assert score["precision"] == pytest.approx(2 / 5)
    assert score["recall"] == pytest.approx(2 / 3)
    assert score["f1"] == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    assert score_point_in_mask(np.zeros((0, 2)), truth)["fn"] == 3


def test_score_within_distance_is_one_to_one_and_optimal():
    truth = [(0, 0), (8, 0)]
    # Greedy nearest-first would give the middle detection to (8, 0) and match only one cell.
    score = score_within_distance([(5, 0), (14, 0)], truth, max_dist=8.0)
    assert (score["tp"], score["fp"], score["fn"]) == (2, 0, 0)
    score = score_within_distance([(0, 1), (0, -1), (40, 40)], [(0, 0), (6, 0)], max_dist=8.0)
    assert (score["tp"], score["fp"], score["fn"]) == (2, 1, 0)
    assert score_within_distance([(100, 100)], truth)["tp"] == 0
    empty = score_within_distance([], truth)
    assert (empty["tp"], empty["fn"], empty["precision"], empty["f1"]) == (0, 2, 0.0, 0.0)


# ---- quality on real and synthetic images -------------------------------------------------


@pytest.mark.skipif(not (T98G / "images").is_dir(), reason=f"T98G frames not found at {T98G}")
def test_real_t98g_frames_f1():
    f1 = []
    for path in sorted((T98G / "images").glob("*.tif")):
        truth = cv2.imread(str(T98G / "masks" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        cells, _ = find_cells(read_image(path))
        f1.append(score_point_in_mask(cells[["x", "y"]].to_numpy(), truth)["f1"])
    assert len(f1) == 6
    assert np.mean(f1) >= 0.8, f1
    assert min(f1) >= 0.7, f1


def test_synthetic_plates_precision_recall_per_concentration(tmp_path):
    """Every plated density, the crowded ones included (touching and clumped cells), through
    the production path: the plate's cell size estimated, the candidates labelled "cell" kept."""
    from gbm_assets.imaging import synthetic
    from gbm_assets.imaging.cell_quality import kept_candidates
    from gbm_assets.imaging.plate_coordinates import plate_coordinates

    plates = synthetic.write_plates(tmp_path, n_cultures=4, n_concentrations=5, images_per_plate=1, seed=1)
    scores: dict[str, list[dict]] = {}
    for plate in plates:
        truth = pd.read_csv(plate / synthetic.GROUND_TRUTH_NAME)
        concentration = pd.read_csv(plate / "manifest.csv", dtype=str)["concentration"].iloc[0]
        images = sorted(p.name for p in plate.glob("img*.tif"))
        found = kept_candidates(plate_coordinates(plate.name, plate, images).coordinates)
        for path in (plate / name for name in images):
            cells = found[found["image"] == path.name]
            true_xy = truth.loc[truth.image == path.name, ["x", "y"]].to_numpy()
            score = score_within_distance(cells[["x", "y"]].to_numpy(), true_xy, max_dist=8.0)
            scores.setdefault(concentration, []).append(score)
    assert sorted(scores, key=float) == list(synthetic.CONCENTRATIONS)
    for concentration, found in scores.items():
        tp, fp, fn = (sum(s[k] for s in found) for k in ("tp", "fp", "fn"))
        assert tp / (tp + fp) >= 0.9 and tp / (tp + fn) >= 0.9, (concentration, tp, fp, fn)
    assert sum(s["tp"] + s["fn"] for found in scores.values() for s in found) > 500


@pytest.mark.skipif(not (USIIGACI / "masks").is_dir(), reason="needs ../shared/data/usiigaci")
def test_usiigaci_reported_areas_match_the_hand_drawn_cells():
    """Each found cell's area over that of the hand-drawn cell under its centre: a median of
    1.7-2.0 when the whole object was measured, about 1 for its outline."""
    ratios = []
    for name in ("set10", "set18", "set5"):
        cells, _ = find_cells(read_image(USIIGACI / "images" / f"{name}.tif"))
        hand = cv2.imread(str(USIIGACI / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        under = hand[np.rint(cells["y"]).astype(int), np.rint(cells["x"]).astype(int)]
        drawn = np.bincount(hand.ravel())
        first = np.unique(under, return_index=True)[1]  # one detection per drawn cell
        first = first[under[first] > 0]
        ratios += list(cells["area"].to_numpy()[first] / drawn[under[first]])
    assert len(ratios) > 100
    assert 0.8 <= np.median(ratios) <= 1.25


def test_cell_diameters_are_of_the_whole_objects(tmp_path):
    """The size estimate reads the objects' areas (the halo rim included, as it was calibrated),
    not the reported outline's."""
    from gbm_assets.imaging.cell_size import cell_diameters
    from gbm_assets.imaging.segmentation import find_candidates

    candidates, labels, _ = find_candidates(_phase_contrast([(80, 80), (180, 170)], radius=18))
    objects = np.bincount(labels.ravel())[candidates["cell_id"].to_numpy()]
    cells = (candidates["qc"] == "cell").to_numpy()
    assert (candidates["area"].to_numpy() < objects).all()
    diameters = cell_diameters(candidates, SegmentationParams().cell_diameter_px)
    np.testing.assert_array_equal(diameters, 2 * np.sqrt(objects[cells] / np.pi))


def test_whole_object_moments_are_measure_cells_area_and_centroid_to_the_bit():
    from gbm_assets.imaging.measurements import measure_objects

    labels = _ellipse(60, 20, angle=30) + _ellipse(10, 10, size=200) * 0
    labels[5:9, 5:12] = 3  # label 2 missing
    quick, full = measure_objects(labels)[0], measure_cells(labels)
    assert list(quick.columns) == list(full.columns)
    pd.testing.assert_frame_equal(quick[["cell_id", "x", "y", "area"]], full[["cell_id", "x", "y", "area"]])
    assert quick[list(MEASUREMENT_COLUMNS[1:])].isna().all().all()


def test_component_centroids_are_opencvs_to_the_bit():
    from gbm_assets.imaging.segmentation import component_centroids

    rng = np.random.default_rng(3)
    for density in (0.002, 0.05, 0.4):
        mask = rng.random((97, 131)) < density
        mask[40:44, 60:70] = True  # a plateau of several pixels: one component
        expected = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)[3][1:]
        found = component_centroids(mask)
        assert found.dtype == np.float64 and found.shape == expected.shape
        np.testing.assert_array_equal(found, expected)
    assert component_centroids(np.zeros((5, 6), bool)).shape == (0, 2)
    with pytest.raises(TypeError, match="bool"):
        component_centroids(np.ones((5, 6), np.int32))  # viewed as bytes it would be 4x as wide


@pytest.mark.parametrize("min_area_scale", [0.0, 0.25])
def test_filtered_by_area_counts_the_kept_labels_pixels_and_fragment_map_takes_them(min_area_scale):
    from dataclasses import replace

    from gbm_assets.imaging.cell_quality import fragment_map
    from gbm_assets.imaging.segmentation import filter_by_area, filtered_by_area

    rng = np.random.default_rng(5)
    labels = np.zeros((120, 150), np.int32)
    for value, (y, x, h, w) in enumerate(rng.integers(0, 100, (30, 4)) // [1, 1, 4, 4], start=3):
        labels[y : y + h + 1, x : x + w + 1] = value  # overlapping boxes: touching pieces, some hidden
    labels[(labels == 7) | (labels == labels.max())] = 0  # values without pixels, one of them the last
    params = replace(SegmentationParams(cell_diameter_px=12), min_area_scale=min_area_scale)
    out, area = filtered_by_area(labels, params)
    np.testing.assert_array_equal(out, filter_by_area(labels, params))
    assert area.dtype == np.int64 and len(area) == out.max() + 1 and area[0] == 0
    np.testing.assert_array_equal(area[1:], np.bincount(out.ravel(), minlength=len(area))[1:])
    merged = []
    for thin in (None, np.arange(1, out.max() + 1, 2)):  # thin: every other piece merged like a small one
        given, counted = fragment_map(out, 12, thin=thin, area=area), fragment_map(out, 12, thin=thin)
        np.testing.assert_array_equal(given[0], counted[0])
        assert given[1] == counted[1]
        merged.append(given[1])
    assert merged[-1] > 0


def test_sorted_histogram_is_numpys_histogram_to_the_bit():
    from gbm_assets.imaging.segmentation import sorted_histogram

    rng = np.random.default_rng(6)
    samples = [
        np.log(rng.gamma(2.0, 1.0, 20000).astype(np.float32) + 1e-3),
        rng.integers(0, 40, 3000).astype(np.float32),  # ties on the edges
        np.repeat(np.float32([1.0, 2.0, 3.0]), 500),
    ]
    for values in samples:
        ordered = np.sort(values)
        for lo, hi in [
            tuple(np.percentile(ordered, (0.5, 99.5))),
            (ordered[3], ordered[-3]),
            (ordered[0], ordered[-1]),
        ]:
            counts, edges = np.histogram(values, bins=256, range=(lo, hi))
            found = sorted_histogram(ordered, 256, lo, hi)
            np.testing.assert_array_equal(found[0], counts)
            np.testing.assert_array_equal(found[1], edges)
            assert found[0].dtype == counts.dtype and found[1].dtype == edges.dtype
    with pytest.raises(ValueError):
        sorted_histogram(np.sort(samples[0]), 256, np.nan, 1.0)


def test_seed_darkness_is_measured_against_at_least_a_share_of_the_medium_noise():
    """Where the image's spread is under MIN_SPREAD_PER_NOISE medium noise units (a field that is
    mostly medium), seed darkness is raised to that many noise units; elsewhere unchanged."""
    params = SegmentationParams()
    assert seed_params(params, 0.5) == params  # spread = 2 noise units
    assert seed_params(params, 1 / MIN_SPREAD_PER_NOISE) == params
    raised = seed_params(params, 0.8)  # spread = 1.25 noise units
    assert raised.seed_darkness == pytest.approx(params.seed_darkness * MIN_SPREAD_PER_NOISE * 0.8)
    assert replace(raised, seed_darkness=params.seed_darkness) == params
