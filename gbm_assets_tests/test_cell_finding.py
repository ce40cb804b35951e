"""Cell finding: measurements on drawn shapes, splitting touching cells, scoring, real T98G frames."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from gbm_assets.imaging.crops import extract_crops
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.scoring import score_point_in_mask, score_within_distance
from gbm_assets.imaging.segmentation import find_cells, measure_cells


def test_disc_measurements():
    labels = np.zeros((200, 200), np.int32)
    cv2.circle(labels, (100, 100), 30, 1, -1)
    (row,) = measure_cells(labels).itertuples()
    assert row.area == pytest.approx(np.pi * 30**2, rel=0.03)
    assert row.eccentricity < 0.15
    assert row.major_axis_length == pytest.approx(60, rel=0.05)
    assert row.solidity > 0.97 and row.form_factor > 0.85
    assert (row.x, row.y) == (pytest.approx(100, abs=0.5), pytest.approx(100, abs=0.5))


def test_ellipse_axes_and_elongation():
    labels = np.zeros((200, 300), np.int32)
    cv2.ellipse(labels, (150, 100), (80, 20), 30, 0, 360, 1, -1)
    (row,) = measure_cells(labels).itertuples()
    assert row.major_axis_length == pytest.approx(160, rel=0.05)
    assert row.minor_axis_length == pytest.approx(40, rel=0.08)
    assert row.eccentricity > 0.95 and row.form_factor < 0.75


def _phase_contrast(centres, radius, size=256, seed=0):
    """Dark textured discs with bright halos on a noisy grey background (16-bit)."""
    rng = np.random.default_rng(seed)
    phase = np.zeros((size, size), np.float32)
    for cx, cy in centres:
        cv2.circle(phase, (cx, cy), radius, 1.0, -1)
        cv2.circle(phase, (cx, cy), radius // 3, 2.0, -1)  # a denser nucleus
    phase = cv2.GaussianBlur(phase, (0, 0), 2) * (1 + 0.3 * rng.standard_normal((size, size)).astype(np.float32))
    highpass = phase - cv2.GaussianBlur(phase, (0, 0), 6)
    image = 32000 * (1 - 0.5 * highpass - 0.1 * phase) + rng.normal(0, 300, (size, size))
    return np.clip(image, 0, 65535).astype(np.uint16)


def test_two_touching_cells_are_split():
    image = _phase_contrast([(100, 128), (142, 128)], radius=22)
    cells, labels = find_cells(image)
    near = cells[(cells["x"].between(70, 170)) & (cells["y"].between(100, 156))]
    assert len(near) == 2
    assert sorted(near["x"].round()) == [pytest.approx(100, abs=8), pytest.approx(142, abs=8)]
    assert set(np.unique(labels)) >= set(near["cell_id"])
    single, _ = find_cells(_phase_contrast([(120, 128)], radius=22))
    assert len(single) == 1  # the split is not a habit of over-splitting


def test_edge_crops_are_dropped():
    image = np.zeros((200, 200), np.uint16)
    cells = pd.DataFrame({"cell_id": [1, 2, 3], "x": [100.0, 20.0, 180.0], "y": [100.0, 100.0, 150.0]})
    labels = np.zeros((200, 200), np.int32)
    batch = extract_crops(image, cells, labels, crop_size=64)
    assert batch.cells["cell_id"].tolist() == [1]


def test_scoring_rules():
    truth = np.zeros((50, 50), np.int32)
    truth[5:15, 5:15] = 1
    truth[30:40, 30:40] = 2
    s = score_point_in_mask([(10, 10), (11, 11), (35, 35), (48, 2)], truth)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 0)
    d = score_within_distance([(0, 0), (20, 0)], [(3, 4), (100, 100)], max_dist=8)
    assert (d["tp"], d["fp"], d["fn"]) == (1, 1, 1)


def test_real_t98g_frames_f1(t98g):
    f1 = []
    for path in sorted((t98g / "images").glob("*.tif")):
        cells, _ = find_cells(read_image(path))
        truth = cv2.imread(str(t98g / "masks" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        f1.append(score_point_in_mask(cells[["x", "y"]].to_numpy(), truth)["f1"])
    assert np.mean(f1) >= 0.78 and min(f1) >= 0.7, f1
