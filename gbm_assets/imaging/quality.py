"""Data-quality rules for cell crops, kept pure so that they can be tested on bad data directly."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from gbm_assets.imaging.plate_cells import CropFilters
from gbm_assets.schema import MEASUREMENT_COLUMNS, PROVENANCE_COLUMNS

CROP_CHECKS = {
    "cells_cropped": "The plate yields at least one crop (no plate silently yields zero cells).",
    "no_nan": "No NaN in coordinates or measurements.",
    "provenance_complete": "Every provenance column is non-null.",
    "crop_ids_unique": "crop_id is unique.",
    "count_matches_coordinates": "Crop count equals the coordinates kept by the filters and the edge rule.",
}


def expected_crop_count(
    coords: pd.DataFrame,
    manifest: pd.DataFrame,
    sizes: pd.DataFrame,
    crop_size: int,
    filters: CropFilters,
    keep_qc: Iterable[str] = ("cell",),
) -> int:
    """Coordinates with a kept qc label that pass the image filters and whose crop window lies
    inside the image.

    sizes: image, height, width. Computed from the coordinates, independently of the cropper.
    """
    if "qc" in coords:
        coords = coords[coords["qc"].isin(list(keep_qc))]
    df = coords.merge(manifest[["image", "timepoint_h"]], on="image").merge(sizes, on="image")
    if df.empty:
        return 0
    n_per_image = df.groupby("image")["cell_id"].transform("size")
    keep = np.array(
        [filters.keep_image(n, t) for n, t in zip(n_per_image, df["timepoint_h"], strict=False)], dtype=bool
    )
    half = crop_size // 2
    x0 = np.rint(df["x"].to_numpy(float)).astype(int) - half
    y0 = np.rint(df["y"].to_numpy(float)).astype(int) - half
    inside = (
        (x0 >= 0) & (y0 >= 0) & (x0 + crop_size <= df["width"].to_numpy()) & (y0 + crop_size <= df["height"].to_numpy())
    )
    return int((keep & inside).sum())


def check_crops(df: pd.DataFrame, expected: int) -> dict[str, tuple[bool, dict]]:
    """Evaluate every rule of CROP_CHECKS on a crops table (pixel columns not needed)."""
    nan_cols = [c for c in ("x", "y", "timepoint_h", *MEASUREMENT_COLUMNS) if df[c].isna().any()]
    null_cols = [c for c in PROVENANCE_COLUMNS if df[c].isna().any() or (df[c].astype(str) == "").any()]
    dup = int(df["crop_id"].duplicated().sum())
    return {
        "cells_cropped": (len(df) > 0, {"n_crops": len(df)}),
        "no_nan": (not nan_cols, {"columns_with_nan": ", ".join(nan_cols) or "none"}),
        "provenance_complete": (not null_cols, {"columns_with_nulls": ", ".join(null_cols) or "none"}),
        "crop_ids_unique": (dup == 0, {"duplicates": dup}),
        "count_matches_coordinates": (len(df) == expected, {"n_crops": len(df), "expected": expected}),
    }
