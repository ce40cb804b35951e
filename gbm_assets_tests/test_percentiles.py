import numpy as np
import pytest

from gbm_assets.imaging.percentiles import percentiles


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int32])
@pytest.mark.parametrize("q", [(25, 50, 75), (0.5, 99.5), (0, 100), (1.0,)])
def test_percentiles_equal_numpys_to_the_bit(dtype, q):
    rng = np.random.default_rng(7)
    image = (rng.lognormal(3, 2, (301, 257)) * 50).astype(dtype)
    image[:40, :40] = image[0, 0]  # ties
    for values in (image, image[::4, ::3], image.ravel()[:7], image.ravel()[:1]):
        got, want = percentiles(values, q), np.percentile(values, q)
        assert got.dtype == want.dtype
        assert np.array_equal(got, want)  # exact, not close


def test_percentiles_of_values_with_nan_are_nan_as_numpys():
    values = np.array([3.0, np.nan, 1.0, 2.0], np.float32)
    assert np.isnan(percentiles(values, (25, 75))).all() and np.isnan(np.percentile(values, (25, 75))).all()
