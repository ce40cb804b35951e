"""The cell explorer: one self-contained HTML page with the UMAP of a variant's cells.

The thesis judged its encoders by eye on a UMAP where hovering a point shows the cell behind it.
This page does that from disk, with no server and no network: a hand-written canvas scatter, the
cells' thumbnails embedded as data URIs, a legend that filters to one category and a gallery of
that category's cells. window.explorer exposes what a test needs (screen position of a point,
the visible points, a ready flag).

Thumbnails are lossless WebP of the crop shrunk with cv2.INTER_AREA and reduced to 32 grey
levels: 8-bit thumbnails of phase-contrast crops take ~1.7 kB each (about 48 MB of base64 for
20,000 points), 32 levels about 1 kB (28 MB on real T98G crops), and the image shown stays exactly
make_thumbnails(crop), so what a person sees is checkably the cell's own crop.

The page itself (HTML, CSS and script) is the template explorer.html beside this module, shipped
as package data; write_explorer fills its __TITLE__, __COUNT__, __OPTIONS__, __FIELDS__, __THUMB__
and __DATA__ slots.
"""

from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from gbm_assets.storage import write_bytes_atomic

CLUSTERINGS = ("hdbscan", "gmm", "auto")  # label -1 is noise, drawn grey
COLOURINGS = (*CLUSTERINGS, "culture", "concentration")
TOOLTIP_FIELDS = (
    "crop_id",
    "plate",
    "image",
    "x",
    "y",
    "culture",
    "concentration",
    "replicate",
    "timepoint_h",
    "well",
    "position",
    *CLUSTERINGS,
)
STRATA = ("culture", "hdbscan")
TEMPLATE = "explorer.html"  # package data of gbm_assets.analysis


def _fair_shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """Water-filling: groups smaller than an equal share keep all rows, the rest split what is left."""
    quota = np.zeros(len(sizes), np.int64)
    left = total
    for rank, g in enumerate(np.argsort(sizes, kind="stable")):
        quota[g] = min(int(sizes[g]), left // (len(sizes) - rank))
        left -= quota[g]
    return quota


def sample_for_explorer(labels: pd.DataFrame, max_points: int = 20_000, seed: int = 0) -> pd.DataFrame:
    """At most max_points rows, shared evenly across (culture, HDBSCAN cluster) groups; deterministic.

    A uniform sample would bury rare cultures and small clusters under the big ones, which are the
    cells one most wants to look at. Small groups are kept whole; the others get equal shares
    (every group is represented as long as there are no more groups than max_points).
    Rows keep their input order; the index is reset.

    Raises
    ------
    ValueError
        If max_points < 1.
    KeyError
        If labels (longer than max_points) lack a column of STRATA (culture, hdbscan).
    """
    if max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    if len(labels) <= max_points:
        return labels.reset_index(drop=True)
    group = labels.groupby(list(STRATA), sort=True, dropna=False).ngroup().to_numpy()
    sizes = np.bincount(group)
    members = np.split(np.argsort(group, kind="stable"), np.cumsum(sizes)[:-1])
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [
            rng.choice(rows, size=q, replace=False)
            for rows, q in zip(members, _fair_shares(sizes, max_points), strict=True)
        ]
    )
    return labels.iloc[np.sort(keep)].reset_index(drop=True)


def make_thumbnails(crops: np.ndarray, size: int = 48, grey_levels: int = 32) -> np.ndarray:
    """(n, size, size) uint8: crops shrunk with INTER_AREA, then reduced to grey_levels levels over 0..255.

    Parameters
    ----------
    crops : (n, S, S) ndarray of uint8
        Normalised cell crops (crops.normalise_crops).
    size : int
        Side of the thumbnails, in pixels.
    grey_levels : int
        Levels kept, 2..256, evenly spaced over 0..255 (fewer levels compress better).

    Returns
    -------
    thumbnails : (n, size, size) ndarray of uint8

    Raises
    ------
    ValueError
        If crops is not a 3-D uint8 array, or grey_levels is outside 2..256.
    """
    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be a uint8 array (n, S, S), got {crops.dtype} {crops.shape}")
    if not 2 <= grey_levels <= 256:
        raise ValueError(f"grey_levels must be in 2..256, got {grey_levels}")
    if crops.shape[1:] == (size, size):
        thumbs = crops
    elif len(crops):
        thumbs = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])
    else:
        thumbs = np.zeros((0, size, size), np.uint8)
    step = 255 / (grey_levels - 1)
    lut = np.round(np.round(np.arange(256) / step) * step).astype(np.uint8)
    return lut[thumbs]


def crop_thumbnails(
    crops_dir: str | Path, crop_ids, size: int = 48, grey_levels: int = 32, batch_size: int = 256
) -> np.ndarray:
    """(n, size, size) uint8 make_thumbnails of the given crops of a crops dataset, in crop_ids order.

    The same array as make_thumbnails(read_crops(crops_dir, crop_ids), size, grey_levels), but
    streamed (crop_dataset.iter_crops_by_id): one record batch of batch_size full-size crops is
    held at a time besides the thumbnails, so memory does not grow with the number of crops
    (a 48-pixel thumbnail is 1/7 of a 128-pixel crop). Raises KeyError
    (errors.MissingCropsError, naming their plates) for crop ids that are not in the dataset,
    ValueError as make_thumbnails does or when crop_ids repeat an id.
    """
    from gbm_assets.imaging.crop_dataset import iter_crops_by_id

    wanted = pd.Index(pd.Series(crop_ids, dtype=str))
    out = np.zeros((len(wanted), size, size), np.uint8)
    found = np.zeros(len(wanted), bool)
    for where, crops in iter_crops_by_id(crops_dir, wanted, batch_size=batch_size):
        out[where] = make_thumbnails(crops, size, grey_levels)
        found[where] = True
    if not found.all():
        from gbm_assets.errors import missing_crops_error

        raise missing_crops_error(crops_dir, wanted[~found], int((~found).sum()))
    return out


def _data_uri(thumb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".webp", thumb, [cv2.IMWRITE_WEBP_QUALITY, 101])  # quality > 100: lossless
    if not ok:
        raise RuntimeError("OpenCV could not encode a WebP thumbnail")
    return "data:image/webp;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _text(value) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "na"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _natural_key(text: str):
    """Numbers in numeric order ("250" < "1000"), then other labels alphabetically."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _categorical(values: pd.Series) -> dict:
    """A column as ordered category labels and one code per point: repeated labels cost a few bytes."""
    text = [_text(v) for v in values.tolist()]
    cats = sorted(set(text), key=_natural_key)
    index = {c: k for k, c in enumerate(cats)}
    return {"cats": cats, "codes": [index[t] for t in text]}


def _payload(points: pd.DataFrame, thumbs: np.ndarray, colourings: list, fields: list, gallery_size: int) -> str:
    data = {
        "x": np.round(points["umap_x"].to_numpy(float), 4).tolist(),
        "y": np.round(points["umap_y"].to_numpy(float), 4).tolist(),
        "colourings": colourings,
        "clusterings": [c for c in CLUSTERINGS if c in colourings],
        "gallerySize": gallery_size,
        "columns": {f: _categorical(points[f]) for f in dict.fromkeys(fields + colourings)},
        "thumbs": [_data_uri(t) for t in thumbs],
    }
    return script_json(data)


# Characters that may never appear raw inside a <script> element: "</script" would end it,
# "<!--" (with "<script") switches the HTML parser into a state where the real end tag is not
# seen; ">" and "&" are escaped as well (OWASP's rule for data in scripts), and U+2028/U+2029
# end a line in older JavaScript.
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")


def script_json(value) -> str:
    """value as JSON text that is safe inside an HTML <script> element, whatever strings it holds.

    The characters < > & U+2028 U+2029 are written as \\u escapes (they can only occur inside
    JSON strings, so json.loads of the result gives value back unchanged); no sequence in the
    output can close the script or open an HTML comment. Raises TypeError for what json cannot encode.
    """
    text = json.dumps(value, separators=(",", ":"))
    return _SCRIPT_UNSAFE_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group()], text)


def page_template() -> str:
    """The explorer page with its __NAME__ slots unfilled (the package's explorer.html, UTF-8)."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def write_explorer(
    path: str | Path,
    variant: str,
    points: pd.DataFrame,
    thumbnails: np.ndarray,
    thumb_size: int = 48,
    grey_levels: int = 32,
    gallery_size: int = 40,
) -> Path:
    """Write the explorer page for points (one row per cell) and their crops, atomically; return its path.

    Parameters
    ----------
    path : str or Path
        The HTML file to write (its folder is created).
    variant : str
        The model variant, shown in the title (HTML-escaped).
    points : DataFrame
        n rows, one per cell: crop_id, umap_x, umap_y (finite floats, UMAP units), at least one
        of COLOURINGS, and any of TOOLTIP_FIELDS to show on hover.
    thumbnails : (n, S, S) ndarray of uint8
        The cells' crops, aligned with the rows of points; or their thumbnails already made at
        thumb_size and grey_levels (crop_thumbnails, streamed from a crops dataset), which
        make_thumbnails leaves as they are.
    thumb_size, grey_levels : int
        Passed to make_thumbnails; thumbnails are drawn at 2 x thumb_size CSS pixels.
    gallery_size : int
        Most cells shown in the gallery of a category.

    Returns
    -------
    Path
        path, written atomically.

    Raises
    ------
    ValueError
        If points lack crop_id, umap_x or umap_y, or every colouring, if umap_x / umap_y hold
        non-finite values, if len(points) != len(thumbnails), or if thumbnails are not a 3-D
        uint8 array (make_thumbnails).
    RuntimeError
        If OpenCV cannot encode a WebP thumbnail.
    """
    missing = sorted({"crop_id", "umap_x", "umap_y"} - set(points.columns))
    if missing:
        raise ValueError(f"points lack columns {missing}")
    colourings = [c for c in COLOURINGS if c in points.columns]
    fields = [c for c in TOOLTIP_FIELDS if c in points.columns]
    if not colourings:
        raise ValueError(f"points have none of the colourings {COLOURINGS}")
    if len(points) != len(thumbnails):
        raise ValueError(f"{len(points)} points but {len(thumbnails)} thumbnails")
    if not np.isfinite(points[["umap_x", "umap_y"]].to_numpy(float)).all():
        raise ValueError("umap_x / umap_y hold non-finite values")
    thumbs = make_thumbnails(thumbnails, thumb_size, grey_levels)
    parts = {
        "TITLE": html.escape(f"Cell explorer: {variant}"),
        "COUNT": f"{len(points):,} cells",
        "OPTIONS": "".join(f'<option value="{c}">{c}</option>' for c in colourings),
        "FIELDS": "".join(f'<dt>{f}</dt><dd data-field="{f}"></dd>' for f in fields),
        "THUMB": str(2 * thumb_size),
        "DATA": _payload(points, thumbs, colourings, fields, gallery_size),
    }
    # One pass, so that text inserted (a variant name, a crop id) is never substituted again.
    page = re.sub(r"__([A-Z]+)__", lambda m: parts[m.group(1)], page_template())
    return write_bytes_atomic(path, page.encode("utf-8"))
