"""Ground truth for synthetic plates: the true morphotype of each crop, where the plate has one.

Synthetic plates ship ground_truth.csv (image, x, y, morphotype). A crop takes the morphotype of
the nearest true cell of its image within max_dist pixels (the detection-matching rule of cell
finding); crops of real plates, or without a match, get None.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pandas as pd
from scipy.spatial import cKDTree

from gbm_assets.errors import InputError
from gbm_assets.tables import LINE_COLUMN, describe_header, parse_numbers, read_delimited

GROUND_TRUTH_NAME = "ground_truth.csv"
TRUTH_COLUMNS = ("image", "x", "y", "morphotype")


def true_morphotypes(rows: pd.DataFrame, raw_dir: str | Path, max_dist: float = 8.0) -> pd.Series:
    """Morphotype per row of (plate, image, x, y), aligned with rows.index; None where unknown.

    Parameters
    ----------
    rows : DataFrame
        One row per crop with plate, image and x, y (the crop centre in pixels, x = column).
    raw_dir : str or Path
        The folder holding the plate folders; a plate's truth is <raw_dir>/<plate>/ground_truth.csv.
    max_dist : float
        Largest distance, in pixels, from a crop centre to the true cell centre it takes.

    Returns
    -------
    Series of object
        The morphotype (str) of the nearest true cell of the same image within max_dist, else
        None (no ground_truth.csv, no true cell of that image, or none near enough).

    Raises
    ------
    InputError
        Naming the ground_truth.csv that cannot be read (see read_ground_truth).
    """
    out = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    for plate, group in rows.groupby("plate", sort=False):
        path = Path(raw_dir) / str(plate) / GROUND_TRUTH_NAME
        if not path.is_file():
            continue
        truth = read_ground_truth(path)
        names = truth["image"].map(_same_form)  # a macOS name on disk is decomposed, the table's text composed
        for image, cells in group.groupby("image", sort=False):
            t = truth[names == _same_form(str(image))]
            if t.empty:
                continue
            dist, idx = cKDTree(t[["x", "y"]].to_numpy(float)).query(cells[["x", "y"]].to_numpy(float))
            hit = dist <= max_dist
            out.loc[cells.index[hit]] = t["morphotype"].to_numpy()[idx[hit]]
    return out


def _same_form(name: str) -> str:
    """A file name in one Unicode form (NFC), so composed and decomposed accents match."""
    return unicodedata.normalize("NFC", name)


def read_ground_truth(path: str | Path) -> pd.DataFrame:
    """A plate's ground_truth.csv as columns image (str), x, y (float64 pixels) and morphotype (str).

    Read as spreadsheet programs save it (gbm_assets.tables.read_delimited: any delimiter, BOM,
    UTF-16, decimal commas where the delimiter is not a comma; header names in any case).

    Raises
    ------
    InputError
        Naming the file when it cannot be read, lacks one of the columns image, x, y, morphotype,
        or (with its line and column) holds an x or y that is not a finite number.
    """
    table = read_delimited(path, what="ground truth")
    table.columns = [c if c == LINE_COLUMN else str(c).strip().lower() for c in table.columns]
    missing = [c for c in TRUTH_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            path, f"ground truth lacks column(s) {missing}; {describe_header(table.columns, TRUTH_COLUMNS)}"
        )
    return pd.DataFrame(
        {
            "image": table["image"].astype(str),
            "x": parse_numbers(table, "x", what="ground truth"),
            "y": parse_numbers(table, "y", what="ground truth"),
            "morphotype": table["morphotype"].astype(str),
        }
    )


def has_truth(series: pd.Series, min_fraction: float = 0.5) -> bool:
    """Whether enough rows have a known morphotype to score against.

    True when series (true_morphotypes' output) is non-empty, at least min_fraction (0..1) of
    its values are known and they hold more than one morphotype.
    """
    return len(series) > 0 and float(series.notna().mean()) >= min_fraction and series.nunique() > 1
