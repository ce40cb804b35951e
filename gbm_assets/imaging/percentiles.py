"""numpy's percentiles, faster on the large float samples that cell finding takes them of."""

from __future__ import annotations

import numpy as np


def percentiles(values: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """np.percentile(values, q) (linear interpolation, over all elements), computed on a sorted copy.

    The same values to the bit: percentiles depend on the values' order statistics alone,
    and numpy sorts float arrays with SIMD several times faster than np.percentile partitions
    an unsorted copy (about 0.25 ms instead of 1 ms for 65,000 float32 values).

    values: array of any shape and real dtype (NaN gives NaN, as np.percentile). q: percentiles
    in 0-100. Returns a float array of len(q), of values' float dtype (float64 for integers).
    """
    return np.percentile(np.sort(values, axis=None), q)
