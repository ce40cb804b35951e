"""The synthetic plates are ground truth for cell finding, so they must be reproducible, match
their own labels, follow each culture's mixture, and look like phase contrast."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.plates import check_plate_id, read_manifest, validate_plate
from gbm_assets.imaging.synthetic import (
    CELLS_PER_FIELD,
    CONCENTRATIONS,
    CULTURE_MIXTURES,
    CULTURES,
    GENERATOR_VERSION,
    GROUND_TRUTH_COLUMNS,
    MORPHOTYPES,
    PARAMS_NAME,
    culture_mixture,
    synthesize_image,
    write_plates,
)

SMALL = dict(n_cultures=2, n_concentrations=2, images_per_plate=2, size=256)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> list[Path]:
    """Two cultures at all five concentrations, four 512x512 images each (dense enough to count)."""
    out = tmp_path_factory.mktemp("synth")
    return write_plates(out, n_cultures=2, n_concentrations=5, images_per_plate=4, size=512, seed=3)


def test_same_seed_gives_byte_identical_plates(tmp_path):
    a = write_plates(tmp_path / "a", seed=7, **SMALL)
    write_plates(tmp_path / "b", seed=7, **SMALL)
    files_a = _files(tmp_path / "a")
    assert files_a == _files(tmp_path / "b")
    assert {p.name for p in a} == {
        "synth-GBM01-c250-r1",
        "synth-GBM01-c500-r1",
        "synth-GBM02-c250-r1",
        "synth-GBM02-c500-r1",
    }
    # A plate does not depend on how many other plates were asked for.
    write_plates(tmp_path / "c", seed=7, n_cultures=1, n_concentrations=1, images_per_plate=2, size=256)
    assert _files(tmp_path / "c") == {k: v for k, v in files_a.items() if k.startswith("synth-GBM01-c250-r1/")}


def test_different_seeds_and_plates_differ(tmp_path):
    one = write_plates(tmp_path / "s1", seed=1, **SMALL)
    two = write_plates(tmp_path / "s2", seed=2, **SMALL)
    images = [tifffile.imread(p / "img000.tif") for p in one + two]
    for x, y in itertools.combinations(images, 2):
        assert not np.array_equal(x, y)


def test_existing_plate_is_kept_when_unchanged_and_replaced_otherwise(tmp_path):
    calls = []
    (plate,) = write_plates(
        tmp_path,
        n_cultures=1,
        n_concentrations=1,
        images_per_plate=1,
        size=256,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 1)]
    before = (plate / "img000.tif").stat().st_mtime_ns
    write_plates(tmp_path, n_cultures=1, n_concentrations=1, images_per_plate=1, size=256)
    assert (plate / "img000.tif").stat().st_mtime_ns == before
    write_plates(tmp_path, n_cultures=1, n_concentrations=1, images_per_plate=1, size=128)
    assert tifffile.imread(plate / "img000.tif").shape == (128, 128)
    assert not list(plate.glob(".*"))  # no temporary manifest left behind


def test_written_plates_pass_validation(plates):
    assert len(plates) == 10
    for plate in plates:
        summary = validate_plate(plate)
        assert check_plate_id(plate.name) == summary.plate_id
        assert (summary.height, summary.width, summary.bits) == (512, 512, 16)
        culture, conc, rep = plate.name.split("-")[1:]
        assert summary.cultures == [culture]
        assert summary.concentrations == [conc[1:]]
        assert summary.manifest["replicate"].tolist() == [int(rep[1:])] * 4


def test_manifest_ground_truth_and_masks_agree(plates):
    for plate in plates:
        manifest = read_manifest(plate)
        truth = pd.read_csv(plate / "ground_truth.csv")
        assert tuple(truth.columns) == GROUND_TRUTH_COLUMNS
        assert set(truth["image"]) <= set(manifest["image"])
        assert set(truth["culture"]) <= set(manifest["culture"])
        assert set(truth["morphotype"]) <= set(MORPHOTYPES)
        newest = max(p.stat().st_mtime_ns for p in plate.rglob("*") if p.is_file())
        assert (plate / "manifest.csv").stat().st_mtime_ns == newest  # the manifest comes last
        for name in manifest["image"]:
            image = read_image(plate / name)
            labels = cv2.imread(str(plate / "masks" / (Path(name).stem + ".png")), cv2.IMREAD_UNCHANGED)
            assert image.shape == labels.shape == (512, 512)
            assert image.dtype == labels.dtype == np.uint16
            cells = truth[truth["image"] == name]
            assert sorted(cells["mask_id"]) == sorted(set(np.unique(labels)) - {0})
            for cell in cells.itertuples():
                ys, xs = np.nonzero(labels == cell.mask_id)
                assert (cell.bbox_x0, cell.bbox_y0, cell.bbox_x1, cell.bbox_y1) == (
                    xs.min(),
                    ys.min(),
                    xs.max() + 1,
                    ys.max() + 1,
                )
                assert cell.bbox_x0 <= cell.x < cell.bbox_x1 and cell.bbox_y0 <= cell.y < cell.bbox_y1
                assert np.hypot(xs - cell.x, ys - cell.y).min() <= 2.0  # centroid on or next to the cell


def test_cells_are_distinct_and_clump_members_touch(plates):
    clump_cells = touching = 0
    for plate in plates:
        truth = pd.read_csv(plate / "ground_truth.csv")
        for name, cells in truth.groupby("image"):
            xy = cells[["x", "y"]].to_numpy()
            if len(xy) > 1:
                d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
                assert d[np.triu_indices(len(xy), 1)].min() > 8.0  # findable within the 8 px match
            labels = cv2.imread(str(plate / "masks" / (Path(name).stem + ".png")), cv2.IMREAD_UNCHANGED)
            clump_ids = cells.loc[cells["morphotype"] == "clump", "mask_id"].tolist()
            for mask_id in clump_ids:
                ring = cv2.dilate((labels == mask_id).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
                clump_cells += 1
                touching += bool(np.isin(labels[ring], [i for i in clump_ids if i != mask_id]).any())
    assert clump_cells > 20 and touching >= 0.85 * clump_cells


def test_cell_count_grows_with_concentration(plates):
    counts = {c: 0 for c in CONCENTRATIONS}
    for plate in plates:
        counts[read_manifest(plate)["concentration"][0]] += len(pd.read_csv(plate / "ground_truth.csv"))
    series = [counts[c] for c in CONCENTRATIONS]
    assert series == sorted(series) and series[-1] > 5 * series[0]
    expected = 2 * 4 * CELLS_PER_FIELD["4000"] * (512 / 1024) ** 2  # 2 cultures x 4 images
    assert 0.7 * expected < series[-1] < 1.2 * expected


def test_mixtures_are_valid_and_distinct():
    assert len(CULTURES) == 10 and set(CULTURE_MIXTURES) == set(CULTURES)
    vectors = []
    for culture in CULTURES:
        mixture = culture_mixture(culture)
        assert set(mixture) == set(MORPHOTYPES)
        assert sum(mixture.values()) == pytest.approx(1.0)
        assert sum(p >= 0.05 for p in mixture.values()) >= 3
        vectors.append(np.array([mixture[m] for m in MORPHOTYPES]))
    assert min(np.abs(a - b).sum() for a, b in itertools.combinations(vectors, 2)) >= 0.3
    with pytest.raises(ValueError):
        culture_mixture("GBM99")
    with pytest.raises(ValueError):
        synthesize_image(np.random.default_rng(0), {"small_round": 0.5}, 5, 256)


def _observed_mixture(culture: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = pd.concat([synthesize_image(rng, culture_mixture(culture), 110).cells for _ in range(5)])
    return cells["morphotype"].value_counts(normalize=True).reindex(list(MORPHOTYPES), fill_value=0).to_numpy()


def test_morphotype_mixture_is_respected():
    seen = {c: _observed_mixture(c, seed=i) for i, c in enumerate(("GBM01", "GBM04"))}
    for culture, observed in seen.items():
        expected = np.array([CULTURE_MIXTURES[culture][m] for m in MORPHOTYPES])
        assert np.abs(observed - expected).max() < 0.06, (culture, observed, expected)
    assert np.abs(seen["GBM01"] - seen["GBM04"]).sum() > 0.5


def test_phase_contrast_look():
    field = synthesize_image(np.random.default_rng(0), culture_mixture("GBM10"), 40, 512)
    image, labels = field.image.astype(np.float64), field.labels
    cells = (labels > 0).astype(np.uint8)
    background = np.median(image[cv2.dilate(cells, np.ones((31, 31), np.uint8)) == 0])
    assert 27000 < background < 36000
    ring = (cv2.dilate(cells, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) > 0) & (cells == 0)
    assert image[ring].mean() > 1.05 * background  # bright halo just outside the cells
    for cell in field.cells.itertuples():
        inside = image[labels == cell.mask_id].mean()
        if cell.morphotype == "small_round":
            assert inside > background  # dead, rounded cells are bright, refractile
        else:
            assert inside < 0.97 * background  # living cells are darker than the background


def test_empty_field_has_background_and_no_cells():
    field = synthesize_image(np.random.default_rng(5), culture_mixture("GBM01"), 0, 256)
    assert field.cells.empty and not field.labels.any()
    assert field.image.dtype == np.uint16 and 27000 < field.image.mean() < 36000
    assert field.image.std() > 200  # noise and uneven illumination, not a flat frame


# ---- the hard generator -----------------------------------------------------------------------


def _background(image: np.ndarray, labels: np.ndarray) -> float:
    """Median grey level away from every cell (the plate's exposure and illumination)."""
    far = cv2.dilate((labels > 0).astype(np.uint8), np.ones((31, 31), np.uint8)) == 0
    return float(np.median(image[far]))


def test_hard_plates_share_their_optics_and_differ_from_each_other(tmp_path):
    plates = write_plates(
        tmp_path,
        n_cultures=1,
        n_concentrations=1,
        n_replicates=4,
        images_per_plate=3,
        size=256,
        seed=5,
        difficulty="hard",
    )
    levels = []
    for plate in plates:
        levels.append(
            [
                _background(
                    tifffile.imread(plate / f"img{j:03d}.tif"),
                    cv2.imread(str(plate / "masks" / f"img{j:03d}.png"), cv2.IMREAD_UNCHANGED),
                )
                for j in range(3)
            ]
        )
    levels = np.array(levels)
    within = levels.std(axis=1).mean()
    between = levels.mean(axis=1).std()
    assert between > 3 * within  # a plate's exposure is its own, and all its images share it
    easy = write_plates(
        tmp_path / "easy",
        n_cultures=1,
        n_concentrations=1,
        n_replicates=4,
        images_per_plate=1,
        size=256,
        seed=5,
        difficulty="easy",
    )
    easy_levels = [float(np.median(tifffile.imread(p / "img000.tif"))) for p in easy]
    assert np.std(easy_levels) < 0.5 * between


def _cell_stats(difficulty: str, seed: int = 0, n_cells: int = 60) -> pd.DataFrame:
    """Per true cell: morphotype, area, mean contrast inside its mask, and whether another cell
    shows in its 128-px crop."""
    rows = []
    for k in range(3):
        field = synthesize_image(np.random.default_rng(seed + k), culture_mixture("GBM10"), n_cells, 768, difficulty)
        image = field.image.astype(np.float64)
        background = _background(field.image, field.labels)
        for cell in field.cells.itertuples():
            inside = field.labels == cell.mask_id
            x, y = int(round(cell.x)), int(round(cell.y))
            window = field.labels[max(0, y - 64) : y + 64, max(0, x - 64) : x + 64]
            neighbour = bool(np.isin(window, [0, cell.mask_id], invert=True).any())
            rows.append((cell.morphotype, int(inside.sum()), float(image[inside].mean() / background - 1), neighbour))
    return pd.DataFrame(rows, columns=["morphotype", "area", "contrast", "neighbour"])


def test_hard_morphotypes_differ_in_shape_not_brightness_and_vary_in_size():
    easy, hard = _cell_stats("easy"), _cell_stats("hard")
    # Brightness: the spread of the morphotypes' mean contrast shrinks (no refractile rim, one thickness).
    spread = {name: t.groupby("morphotype")["contrast"].mean().std() for name, t in (("easy", easy), ("hard", hard))}
    assert spread["hard"] < 0.5 * spread["easy"]

    # Size varies more within a morphotype (single cells; clump members are cut by their neighbours).
    def cv(t, m):
        a = t.loc[t["morphotype"] == m, "area"]
        return a.std() / a.mean()

    for m in ("small_round", "large_flat"):
        assert cv(hard, m) > 1.2 * cv(easy, m), m

    # Neighbours (a sparse field): more single cells (clump members always have them) have another
    # cell within half a 128-px crop.
    def near(t):
        return t.loc[t["morphotype"] != "clump", "neighbour"].mean()

    assert near(_cell_stats("hard", n_cells=20)) > near(_cell_stats("easy", n_cells=20)) + 0.15


def test_easy_is_the_default_and_difficulty_is_checked(tmp_path):
    mixture = culture_mixture("GBM01")
    a = synthesize_image(np.random.default_rng(1), mixture, 12, 256)
    b = synthesize_image(np.random.default_rng(1), mixture, 12, 256, difficulty="easy")
    assert np.array_equal(a.image, b.image) and a.cells.equals(b.cells)
    with pytest.raises(ValueError, match="difficulty"):
        synthesize_image(np.random.default_rng(1), mixture, 12, 256, difficulty="medium")
    with pytest.raises(ValueError, match="difficulty"):
        write_plates(tmp_path, n_cultures=1, n_concentrations=1, images_per_plate=1, size=128, difficulty="x")


def test_changing_difficulty_rewrites_the_plate(tmp_path):
    (plate,) = write_plates(tmp_path, n_cultures=1, n_concentrations=1, images_per_plate=1, size=256)
    easy = tifffile.imread(plate / "img000.tif")
    params = json.loads((plate / PARAMS_NAME).read_text())
    assert params["difficulty"] == "easy" and params["version"] == GENERATOR_VERSION >= 2
    write_plates(tmp_path, n_cultures=1, n_concentrations=1, images_per_plate=1, size=256, difficulty="hard")
    assert json.loads((plate / PARAMS_NAME).read_text())["difficulty"] == "hard"
    assert not np.array_equal(tifffile.imread(plate / "img000.tif"), easy)


def test_plates_of_an_older_generator_are_found_and_regenerated_in_place(tmp_path):
    from gbm_assets.imaging.synthetic import regenerate_plates, stale_plates

    plates = write_plates(
        tmp_path, n_cultures=1, n_concentrations=2, images_per_plate=1, size=256, seed=4, difficulty="easy"
    )
    (tmp_path / "lab-plate").mkdir()  # a lab's plate: never touched
    assert stale_plates(tmp_path) == [] and stale_plates(tmp_path / "missing") == []
    old = plates[1] / PARAMS_NAME
    old.write_text(json.dumps({**json.loads(old.read_text()), "version": GENERATOR_VERSION - 1}))
    manifest = (plates[1] / "manifest.csv").read_bytes()
    before = tifffile.imread(plates[1] / "img000.tif")
    assert stale_plates(tmp_path) == [plates[1]]
    assert regenerate_plates(stale_plates(tmp_path)) == [plates[1]]
    params = json.loads(old.read_text())
    assert params["version"] == GENERATOR_VERSION and params["difficulty"] == "hard"
    assert params["entropy"][0] == 4 and params["size"] == 256
    assert (plates[1] / "manifest.csv").read_bytes() == manifest
    assert not np.array_equal(tifffile.imread(plates[1] / "img000.tif"), before)
    assert stale_plates(tmp_path) == []
    (plates[0] / PARAMS_NAME).write_text(json.dumps({"version": 0, "entropy": [4, 0, 3, 1, 0]}))
    with pytest.raises(ValueError, match="not a synthetic plate's parameters"):
        regenerate_plates([plates[0]])
