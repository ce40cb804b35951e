"""The hand-crafted baseline: AreaShape measurements, intensity and texture of the masked crop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gbm_assets.analysis.handcrafted import HANDCRAFTED_FEATURES, PIXEL_FEATURES, handcrafted_features, pixel_features
from gbm_assets.schema import MEASUREMENT_COLUMNS


def _disc_crops():
    """Two 64 px crops: a flat disc of grey 60 on 200, and the same disc with a checkerboard texture."""
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 12**2
    flat = np.where(disc, 60, 200).astype(np.uint8)
    checker = ((yy // 2 + xx // 2) % 2 * 80).astype(np.uint8)
    textured = np.where(disc, 20 + checker, 200).astype(np.uint8)
    return np.stack([flat, textured]), np.stack([disc, disc]).astype(np.uint8)


def test_intensity_is_measured_inside_the_mask_and_texture_tells_textured_from_flat():
    pixels, masks = _disc_crops()
    f = pd.DataFrame(pixel_features(pixels, masks), columns=list(PIXEL_FEATURES))
    assert f.loc[0, "Intensity_MeanIntensity"] == pytest.approx(60)
    assert f.loc[0, "Intensity_StdIntensity"] == pytest.approx(0, abs=1e-6)
    assert f.loc[0, "Intensity_MeanBackground"] == pytest.approx(200)
    assert f.loc[1, "Intensity_Percentile05"] == pytest.approx(20) and f.loc[
        1, "Intensity_Percentile95"
    ] == pytest.approx(100)
    assert f.loc[1, "Texture_contrast_1"] > 10 * max(f.loc[0, "Texture_contrast_1"], 1e-3)
    assert f.loc[1, "Texture_homogeneity_1"] < f.loc[0, "Texture_homogeneity_1"]
    assert f.loc[1, "Texture_GradientMean"] > f.loc[0, "Texture_GradientMean"]
    assert np.isfinite(f.to_numpy()).all()


def test_empty_mask_is_measured_at_the_centre_and_shapes_are_checked():
    pixels, masks = _disc_crops()
    masks[0] = 0
    f = pixel_features(pixels, masks)
    assert f[0, PIXEL_FEATURES.index("Intensity_MeanIntensity")] == pytest.approx(60)  # the disc at the centre
    with pytest.raises(ValueError, match="must both be"):
        pixel_features(pixels, masks[:, :32])


def test_handcrafted_features_put_shape_first_and_fill_missing_measurements():
    pixels, masks = _disc_crops()
    measurements = pd.DataFrame({c: [10.0, np.nan] for c in MEASUREMENT_COLUMNS})
    f = handcrafted_features(measurements, pixels, masks)
    assert f.shape == (2, len(HANDCRAFTED_FEATURES)) and f.dtype == np.float32
    assert HANDCRAFTED_FEATURES[0] == "AreaShape_area"
    assert f[1, 0] == 10.0  # the missing area takes the column's median
    with pytest.raises(ValueError, match="lack columns"):
        handcrafted_features(measurements.drop(columns="solidity"), pixels, masks)
    with pytest.raises(ValueError, match="measurement rows"):
        handcrafted_features(measurements.iloc[:1], pixels, masks)
