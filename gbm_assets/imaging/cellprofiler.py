"""CellProfiler object tables: use a plate's own cell coordinates instead of our segmentation.

A CellProfiler export is a CSV with an image key (FileName_<channel> or ImageNumber, the
latter meaning the n-th manifest image, 1-based) and a centre (Location_Center_X/Y or
AreaShape_Center_X/Y). AreaShape_* measurements, when present, are kept.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gbm_assets.errors import PlateError

CENTRE_COLUMNS = (("Location_Center_X", "Location_Center_Y"), ("AreaShape_Center_X", "AreaShape_Center_Y"))
AREASHAPE_COLUMNS = {
    "AreaShape_Area": "area",
    "AreaShape_Perimeter": "perimeter",
    "AreaShape_MajorAxisLength": "major_axis_length",
    "AreaShape_MinorAxisLength": "minor_axis_length",
    "AreaShape_Eccentricity": "eccentricity",
    "AreaShape_Solidity": "solidity",
    "AreaShape_FormFactor": "form_factor",
}


def _is_object_table(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0).columns
    except Exception:
        return False
    has_key = "ImageNumber" in header or any(c.startswith("FileName_") for c in header)
    return has_key and any(x in header and y in header for x, y in CENTRE_COLUMNS)


def find_object_table(plate_dir: str | Path) -> Path | None:
    """The first CSV in the plate folder (other than the manifest and ground truth) that is a CellProfiler table."""
    skip = {"manifest.csv", "ground_truth.csv"}
    for path in sorted(Path(plate_dir).glob("*.csv")):
        if path.name not in skip and _is_object_table(path):
            return path
    return None


def read_object_table(path: str | Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """Return image, x, y (and any AreaShape measurements renamed) for the manifest's images."""
    path = Path(path)
    df = pd.read_csv(path)
    xcol, ycol = next((x, y) for x, y in CENTRE_COLUMNS if x in df.columns and y in df.columns)
    file_cols = [c for c in df.columns if c.startswith("FileName_")]
    if file_cols:
        image = df[file_cols[0]].astype(str)
    else:
        order = manifest["image"].tolist()
        number = pd.to_numeric(df["ImageNumber"], errors="coerce")
        if number.isna().any() or number.min() < 1 or number.max() > len(order):
            raise PlateError(path, f"ImageNumber outside 1..{len(order)} (the manifest's images)")
        image = number.astype(int).map(lambda n: order[n - 1])
    out = pd.DataFrame({"image": image, "x": df[xcol].astype(float), "y": df[ycol].astype(float)})
    for cp_name, name in AREASHAPE_COLUMNS.items():
        if cp_name in df.columns:
            out[name] = df[cp_name].astype(float)
    unknown = sorted(set(out["image"]) - set(manifest["image"]))
    if unknown:
        raise PlateError(path, f"object table names images not in the manifest: {unknown[:3]}")
    if out[["x", "y"]].isna().any().any():
        raise PlateError(path, "object table has missing centre coordinates")
    return out
