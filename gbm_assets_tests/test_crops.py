"""Crops: the edge rule and per-crop normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gbm_assets.imaging.crops import centre_component, extract_crops, normalise_crops


def test_edge_crops_are_dropped():
    image = np.zeros((200, 200), np.uint16)
    cells = pd.DataFrame({"cell_id": [1, 2, 3], "x": [100.0, 20.0, 180.0], "y": [100.0, 100.0, 150.0]})
    labels = np.zeros((200, 200), np.int32)
    batch = extract_crops(image, cells, labels, crop_size=64)
    assert batch.cells["cell_id"].tolist() == [1]
    assert batch.pixels.shape == (1, 64, 64) and batch.pixels.dtype == np.uint8


def test_normalisation_stretches_each_crop_on_its_own():
    dim = np.linspace(1000, 1100, 64 * 64).reshape(1, 64, 64)
    bright = dim * 40
    out = normalise_crops(np.concatenate([dim, bright]))
    assert out[0].min() == 0 and out[0].max() == 255
    assert np.array_equal(out[0], out[1])  # same pattern, different exposure: same crop


def test_mask_keeps_only_the_component_at_the_centre():
    mask = np.zeros((32, 32), bool)
    mask[12:20, 12:20] = True
    mask[0:4, 0:4] = True
    kept = centre_component(mask)
    assert kept[16, 16] == 1 and kept[:4, :4].sum() == 0
