"""The plate format: data/raw/<plate_id>/ holding images and a manifest.csv, and its validation.

Only the manifest columns `image` and `culture` are required. Missing optional columns get
defaults: concentration "na", replicate 1, timepoint_h 0.0, well "na", position "na". A plate is
ready once its manifest.csv exists (write the images first, the manifest last).

The manifest is read as spreadsheet programs save it (see gbm_assets.tables): UTF-8 with or without
BOM, Windows-1252, CRLF, comma, semicolon or tab separators, decimal commas when the separator is
not a comma, header names in any case with surrounding spaces, trailing empty rows.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from gbm_assets.errors import InputError, PlateError
from gbm_assets.imaging.io import IMAGE_SUFFIXES, image_size
from gbm_assets.tables import LINE_COLUMN, describe_header, parse_numbers, read_delimited

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("image", "culture")
OPTIONAL_DEFAULTS = {"concentration": "na", "replicate": 1, "timepoint_h": 0.0, "well": "na", "position": "na"}
MANIFEST_COLUMNS = ("image", "culture", "concentration", "replicate", "timepoint_h", "well", "position")

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PLATE_ID_RULE = "letters, digits, '.', '_', '-'; starting with a letter or digit; at most 128; no '..'"
_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


def check_plate_id(plate_id: str) -> str:
    """Return the plate id if it is a safe folder and partition name, else raise PlateError.

    Rejects '..', path separators, control characters, spaces and leading dots.
    """
    if not isinstance(plate_id, str) or not plate_id:
        raise PlateError(repr(plate_id), "plate id is empty")
    if any(unicodedata.category(ch).startswith("C") for ch in plate_id):
        raise PlateError(repr(plate_id), "plate id contains control characters")
    if "/" in plate_id or "\\" in plate_id or ".." in plate_id or not _SAFE_ID.match(plate_id):
        raise PlateError(
            repr(plate_id),
            f"plate id is not a safe name (use {_PLATE_ID_RULE}); e.g. {safe_plate_id(plate_id)!r}",
        )
    return plate_id


def safe_plate_id(name: str) -> str:
    """A safe plate id derived from any folder name: 'GBM03 plate 1' -> 'GBM03-plate-1'.

    Accents are dropped (Zürich -> Zurich), every run of other characters becomes one '-'.
    """
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_name).replace("..", ".").strip("-._")[:128]
    return slug or "plate"


def normalise_well(well: str) -> str:
    """'b02' -> 'B2': plate maps and instruments write the same well differently. 'na' stays."""
    match = _WELL.match(str(well).strip())
    return f"{match.group(1).upper()}{int(match.group(2))}" if match else str(well).strip()


def decimal_points(table: pd.DataFrame, column: str) -> list[str]:
    """Labels of a column read by read_delimited, with "0,5" as 0.5 where the table is not
    comma-delimited (what a European-locale spreadsheet writes)."""
    if table.attrs.get("delimiter", ",") == ",":
        return list(table[column])
    return [c.replace(",", ".") if _DECIMAL_COMMA.match(c) else c for c in table[column]]


def check_image_name(manifest: Path, row: int, name: str) -> str:
    """An image name must be a relative path inside the plate folder (no '..', not absolute)."""
    if not isinstance(name, str) or not name.strip():
        raise PlateError(manifest, f"row {row}: empty image name")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or any(
        unicodedata.category(ch).startswith("C") for ch in name
    ):
        raise PlateError(manifest, f"row {row}: image name {name!r} escapes the plate folder")
    if pure.suffix.lower() not in IMAGE_SUFFIXES:
        raise PlateError(manifest, f"row {row}: image {name!r} is not a supported image ({', '.join(IMAGE_SUFFIXES)})")
    return str(pure)


def _on_disk(plate_dir: Path, name: str) -> str:
    """The name as stored on disk when it differs only in Unicode normalisation (macOS writes NFD)."""
    if (plate_dir / name).exists():
        return name
    parent = (plate_dir / name).parent
    wanted = unicodedata.normalize("NFC", PurePosixPath(name).name)
    try:
        for entry in os.listdir(parent):
            if unicodedata.normalize("NFC", entry) == wanted:
                return str(PurePosixPath(name).with_name(entry))
    except OSError:
        pass
    return name


def read_manifest(plate_dir: str | Path) -> pd.DataFrame:
    """Read and normalise a plate's manifest: required columns present, defaults filled, types set.

    Returns one row per image with MANIFEST_COLUMNS first (image, culture, concentration: str;
    replicate: int64; timepoint_h: float64; well, position: str), then any extra columns.
    Raises PlateError naming the manifest and, for a bad value, its line and column.
    """
    plate_dir = Path(plate_dir)
    manifest = plate_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise PlateError(manifest, "manifest.csv missing (a plate is ready once its manifest exists)")
    try:
        df = read_delimited(manifest, what="manifest")
    except InputError as exc:
        raise PlateError(manifest, exc.problem) from None
    df.columns = [c if c == LINE_COLUMN else str(c).strip().lower() for c in df.columns]
    header = [c for c in df.columns if c != LINE_COLUMN]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise PlateError(manifest, f"manifest lacks required column(s) {missing}; {describe_header(header)}")
    if len(set(header)) < len(header):
        raise PlateError(manifest, f"manifest repeats a column name: {header}")
    if df.empty:
        raise PlateError(manifest, "manifest lists no images (empty plate)")
    for col, default in OPTIONAL_DEFAULTS.items():
        if col not in df.columns:
            df[col] = str(default)
        df[col] = df[col].replace("", str(default))
    for col in ("image", "culture"):
        empty = df[col] == ""
        if empty.any():
            raise PlateError(manifest, f"line {df[LINE_COLUMN][empty].iloc[0]}: empty {col}")
    df["image"] = [
        _on_disk(plate_dir, check_image_name(manifest, line, name)) for line, name in zip(df[LINE_COLUMN], df["image"])
    ]
    dup = df["image"][df["image"].duplicated()]
    if not dup.empty:
        raise PlateError(manifest, f"image {dup.iloc[0]!r} listed more than once")
    df["concentration"] = decimal_points(df, "concentration")
    df["well"] = df["well"].map(normalise_well)
    try:
        df["replicate"] = parse_numbers(df, "replicate", kind=int, what="manifest")
        df["timepoint_h"] = parse_numbers(df, "timepoint_h", kind=float, what="manifest")
    except InputError as exc:
        raise PlateError(manifest, exc.problem) from None
    extra = [c for c in header if c not in MANIFEST_COLUMNS]
    return df[list(MANIFEST_COLUMNS) + extra].reset_index(drop=True)


@dataclass
class PlateSummary:
    """What raw_plates records about a valid plate."""

    plate_id: str
    path: Path
    manifest: pd.DataFrame
    height: int
    width: int
    bits: int
    cultures: list[str] = field(default_factory=list)
    concentrations: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.manifest)


def validate_plate(plate_dir: str | Path, check_pixels: bool = True, plate_id: str | None = None) -> PlateSummary:
    """Check a plate folder end to end; raise PlateError/ImageReadError naming the file and problem.

    With check_pixels, every image is decoded once, so a corrupt file is caught here and not
    halfway through cell finding. plate_id defaults to the folder name (a staging folder being
    checked before it is renamed into place passes the id it will have).
    """
    from gbm_assets.imaging.io import read_image

    plate_dir = Path(plate_dir)
    plate_id = check_plate_id(plate_dir.name if plate_id is None else plate_id)
    if not plate_dir.is_dir():
        raise PlateError(plate_dir, "plate folder not found")
    manifest = read_manifest(plate_dir)
    sizes: dict[tuple[int, int], str] = {}
    bits_seen: set[int] = set()
    for name in manifest["image"]:
        path = plate_dir / name
        if not path.is_file():
            raise PlateError(plate_dir / MANIFEST_NAME, f"lists {name!r} but {path} does not exist")
        if check_pixels:
            img = read_image(path)
            h, w, bits = img.shape[0], img.shape[1], img.dtype.itemsize * 8
        else:
            h, w, bits = image_size(path)
        sizes.setdefault((h, w), name)
        bits_seen.add(bits)
        if len(sizes) > 1:
            (a, first), (b, _) = list(sizes.items())[:2]
            raise PlateError(
                path, f"mixed image sizes in plate: {first!r} is {a[1]}x{a[0]}, {name!r} is {b[1]}x{b[0]}"
            )
    (height, width), = sizes.keys()
    return PlateSummary(
        plate_id=plate_id,
        path=plate_dir,
        manifest=manifest,
        height=height,
        width=width,
        bits=max(bits_seen),
        cultures=sorted(manifest["culture"].unique().tolist()),
        concentrations=sorted(manifest["concentration"].unique().tolist(), key=natural_key),
    )


def natural_key(value: str):
    """Sort key putting numeric labels in numeric order ('500' before '1000') and text after."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def find_ready_plates(raw: str | Path) -> list[str]:
    """Plate ids under raw/ whose manifest exists and whose folder name is safe, sorted.

    Folders that hold a manifest but cannot be plates are not returned: unusable_plate_folders
    says why, so that callers tell the user instead of skipping them without a word.
    """
    return [folder.name for folder in _plate_folders(raw) if _is_safe_id(folder.name)]


def unusable_plate_folders(raw: str | Path) -> list[str]:
    """One message per folder under raw/ that holds a manifest but whose name is not a safe plate id."""
    return [
        f"{folder}: folder name {folder.name!r} is not a safe plate id ({_PLATE_ID_RULE}); rename it, "
        f"e.g. to {safe_plate_id(folder.name)!r}, or add it with `gbm-assets add-plate`, which derives one"
        for folder in _plate_folders(raw)
        if not _is_safe_id(folder.name)
    ]


def _plate_folders(raw: str | Path) -> list[Path]:
    """Sub-folders of raw/ holding a manifest; hidden ones (staging folders, .DS_Store) excluded."""
    raw = Path(raw)
    if not raw.is_dir():
        return []
    return [c for c in sorted(raw.iterdir()) if not c.name.startswith(".") and (c / MANIFEST_NAME).is_file()]


def _is_safe_id(name: str) -> bool:
    try:
        check_plate_id(name)
    except InputError:
        return False
    return True
