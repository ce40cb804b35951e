"""The plate format: data/raw/<plate_id>/ holding images and a manifest.csv, and its validation.

Only the manifest columns `image` and `culture` are required. Missing optional columns get
defaults: concentration "na", replicate 1, timepoint_h 0.0, well "na", position "na"; an optional
pixel_size_um (µm per pixel) supplies or checks the size the image files record. A plate is
ready once its manifest.csv exists (write the images first, the manifest last).

The manifest is read as spreadsheet programs save it (see gbm_assets.tables): UTF-8 with or without
BOM, Windows-1252, CRLF, comma, semicolon or tab separators, decimal commas when the separator is
not a comma, header names in any case with surrounding spaces, trailing empty rows.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from gbm_assets.errors import InputError, PlateError
from gbm_assets.imaging.io import IMAGE_SUFFIXES, image_size
from gbm_assets.imaging.pixel_size import PIXEL_SIZE_COLUMN, PixelSize, plate_pixel_size
from gbm_assets.tables import LINE_COLUMN, describe_header, parse_numbers, read_delimited

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("image", "culture")
OPTIONAL_DEFAULTS = {"concentration": "na", "replicate": 1, "timepoint_h": 0.0, "well": "na", "position": "na"}
MANIFEST_COLUMNS = ("image", "culture", "concentration", "replicate", "timepoint_h", "well", "position")
MAX_TIMEPOINT_H = 366 * 24.0  # a time point later than a year after plating is a unit or date mix-up

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PLATE_ID_RULE = "letters, digits, '.', '_', '-'; starting with a letter or digit; at most 128; no '..'"
_WELL = re.compile(r"^([A-Za-z]{1,2})[-_ ]?0*(\d{1,3})$")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")
_GROUPED = re.compile(r"^[+-]?\d{1,3}(?:[ \u00a0\u202f']\d{3})+(?:\.\d+)?$")  # 1 000, 1'000.5
_POINT_GROUPS = re.compile(r"^[+-]?\d{1,3}(?:\.\d{3})+$")
_DIGIT_GROUPS = re.compile(r"[ \u00a0\u202f']")
_NUMERIC = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def check_plate_id(plate_id: str) -> str:
    """Return the plate id if it is a safe folder and partition name, else raise PlateError.

    Rejects '..', path separators, control characters, spaces and leading dots.

    Raises
    ------
    PlateError
        Naming the id when it is empty or not a string, holds control characters, or is not a
        safe name (the message suggests safe_plate_id's).
    """
    if not isinstance(plate_id, str) or not plate_id:
        raise PlateError(repr(plate_id), "plate id is empty")
    if any(unicodedata.category(ch).startswith("C") for ch in plate_id):
        raise PlateError(repr(plate_id), "plate id contains control characters")
    if "/" in plate_id or "\\" in plate_id or ".." in plate_id or not _SAFE_ID.match(plate_id):
        raise PlateError(
            repr(plate_id), f"plate id is not a safe name (use {_PLATE_ID_RULE}); e.g. {safe_plate_id(plate_id)!r}"
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
    """'b02', 'B-02', 'B_2' -> 'B2': plate maps and instruments write the same well differently. 'na' stays."""
    match = _WELL.match(str(well).strip())
    return f"{match.group(1).upper()}{int(match.group(2))}" if match else str(well).strip()


def concentration_labels(table: pd.DataFrame, column: str) -> list[str]:
    """Concentration labels of a column read by read_delimited, one label per plated concentration.

    A label that is a number is written one way, whatever a spreadsheet or script made of it:
    "1000.0", "1e3", "1 000" (digit groups split by a space, no-break space or apostrophe) and
    "1000" are all "1000"; "0.50" is "0.5"; "0,5" is "0.5" where the table is not comma-delimited
    (a European-locale spreadsheet, where "1.000" may be a thousand and is kept as written).
    Otherwise the plates of one concentration would fall into several classes. Other labels
    ("na", "high", "1000 cells/well") are kept as written.
    """
    if table.attrs.get("delimiter", ",") == ",":
        return [_number_label(c) for c in table[column]]
    # Where the comma is the decimal mark, "1.000" may be a thousand: kept as written.
    return [
        _number_label(c.replace(",", "."))
        if _DECIMAL_COMMA.match(c)
        else c
        if _POINT_GROUPS.match(c)
        else _number_label(c)
        for c in table[column]
    ]


def concentration_label(text: str) -> str:
    """One concentration label as concentration_labels writes it ("1e3", "1000.0", "1 000" -> "1000"),
    for a label given on the command line (comma-delimited rules: "1.000" is a number, 1)."""
    return _number_label(str(text).strip())


def _number_label(text: str) -> str:
    compact = _DIGIT_GROUPS.sub("", text) if _GROUPED.match(text) else text
    try:
        number = float(compact)
    except ValueError:
        return text
    if not math.isfinite(number) or not _NUMERIC.match(compact):
        return text  # "nan", "inf", "infinity": words, not amounts
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return f"{number:.15g}"


def check_image_name(manifest: Path, row: int, name: str) -> str:
    """An image name must be a relative path inside the plate folder (no '..', not absolute).

    Returns the name as a POSIX path ('\\' read as '/').

    Raises
    ------
    PlateError
        Naming the manifest and row when the name is empty, absolute, climbs out with '..',
        holds control characters or does not end in one of IMAGE_SUFFIXES.
    """
    if not isinstance(name, str) or not name.strip():
        raise PlateError(manifest, f"row {row}: empty image name")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or any(unicodedata.category(ch).startswith("C") for ch in name):
        raise PlateError(manifest, f"row {row}: image name {name!r} escapes the plate folder")
    if pure.suffix.lower() not in IMAGE_SUFFIXES:
        raise PlateError(manifest, f"row {row}: image {name!r} is not a supported image ({', '.join(IMAGE_SUFFIXES)})")
    return str(pure)


def _on_disk(plate_dir: Path, name: str) -> str:
    """The name as stored on disk when it differs only in Unicode normalisation (macOS writes NFD),
    or only in letter case from exactly one file (a manifest typed on Windows or macOS, whose file
    systems ignore case: `T07.TIF` for t07.tif); otherwise the name as given."""
    if (plate_dir / name).exists():
        return name
    parent = (plate_dir / name).parent
    wanted = unicodedata.normalize("NFC", PurePosixPath(name).name)
    try:
        entries = os.listdir(parent)
    except OSError:
        return name
    for entry in entries:
        if unicodedata.normalize("NFC", entry) == wanted:
            return str(PurePosixPath(name).with_name(entry))
    folded = [entry for entry in entries if unicodedata.normalize("NFC", entry).casefold() == wanted.casefold()]
    if len(folded) == 1 and (parent / folded[0]).is_file():
        return str(PurePosixPath(name).with_name(folded[0]))
    return name


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# Header names a person writes for a manifest column, which would otherwise be kept as an extra
# column while every image got the column's default (time point 0, replicate 1, well na...).
_LOOK_ALIKES = {
    "image": ("file", "filename", "imagename", "imagefile", "imagefilename", "img", "path", "filepath"),
    "culture": ("cellline", "line", "cells", "celltype", "patient", "sample", "culturename"),
    "concentration": ("conc", "cellsperwell", "density", "seedingdensity", "cellnumber", "dilution"),
    "replicate": ("rep", "repl", "replica", "replicateno", "replicatenumber", "replicateid", "biologicalreplicate"),
    "timepoint_h": (
        "time",
        "timepoint",
        "timepoints",
        "tp",
        "timeh",
        "timehours",
        "timehrs",
        "hours",
        "hour",
        "hrs",
        "elapsed",
        "elapsedh",
        "elapsedtime",
        "elapsedtimeh",
        "elapsedhours",
        "timemin",
        "timepointmin",
        "timeminutes",
        "frame",
    ),
    "well": ("wellid", "wellname", "wellposition", "wells"),
    "position": ("field", "site", "fov", "fieldofview", "pos", "fieldno", "siteno", "positionno"),
    PIXEL_SIZE_COLUMN: (
        "pixelsize",
        "pixelsizenm",
        "pixelsizemm",
        "pixelwidth",
        "pixelspacing",
        "physicalsizex",
        "calibration",
        "resolution",
    ),
}
# Header names of pixel_size_um, squashed after reading µ (micro sign or Greek mu) as "u".
_PIXEL_SIZE_NAMES = ("pixelsizeum", "pixelsizemicron", "pixelsizemicrons", "umperpixel", "micronsperpixel")


def column_name(name: str) -> str:
    """A manifest header as the column it names: any case, surrounding spaces, and separators or
    a unit in brackets spelled otherwise ('Time point (h)', 'TimePoint_h') -> 'timepoint_h'."""
    name = name.strip().lower()
    squashed = _squash(name)
    if squashed == "timepointhours":
        return "timepoint_h"
    if _squash(name.replace("\u00b5", "u").replace("\u03bc", "u")) in _PIXEL_SIZE_NAMES:
        return PIXEL_SIZE_COLUMN
    return next((column for column in MANIFEST_COLUMNS if squashed == _squash(column)), name)


def check_one_spelling(table: Path, df: pd.DataFrame, column: str) -> None:
    """Refuse a table (read by read_delimited) in which two values of `column` differ only in letter
    case or spaces ('GBM03', 'gbm 03'): one culture typed two ways would silently become two
    cultures. Punctuation is kept apart: 'CD133+' and 'CD133-', 'GBM1.2' and 'GBM12' are different.

    Raises
    ------
    PlateError
        Naming the table, both spellings and their lines.
    """
    first: dict[str, tuple[str, int]] = {}
    for value, line in zip(df[column].astype(str), df[LINE_COLUMN], strict=False):
        seen = first.setdefault(_spelling_key(value), (value, int(line)))
        if seen[0] != value:
            raise PlateError(
                table,
                f"{column} {seen[0]!r} (line {seen[1]}) and {value!r} (line {int(line)}) differ only in case "
                f"or spaces; write one {column} one way (if they are two, name them apart)",
            )


def _spelling_key(value: str) -> str:
    """What is left of a name when letter case and spaces are set aside ('GBM 03' -> 'gbm03')."""
    return re.sub(r"\s+", "", value.casefold()) or value


def culture_spelling_clashes(raw: str | Path, plate_id: str | None = None) -> list[str]:
    """One message per culture typed two ways across the plates under raw/ ('GBM03' in one
    manifest, 'gbm 03' in another): each spelling would be counted as a culture of its own in the
    composition report, without a word. Within one manifest this is an error (check_one_spelling);
    across plates each plate is valid on its own, so the callers warn (gbm-assets run, raw_plates).

    plate_id: only the clashes that involve this plate. Plates whose manifest cannot be read are
    left out (their own ingest says why). Returns [] when every culture has one spelling.
    """
    spellings: dict[str, dict[str, list[str]]] = {}
    for plate in find_ready_plates(raw):
        try:
            cultures = read_manifest(Path(raw) / plate)["culture"].unique()
        except PlateError:
            continue
        for culture in cultures:
            spellings.setdefault(_spelling_key(str(culture)), {}).setdefault(str(culture), []).append(plate)
    messages = []
    for forms in spellings.values():
        if len(forms) < 2 or (plate_id is not None and not any(plate_id in p for p in forms.values())):
            continue
        listed = "; ".join(
            f"{culture!r} in {', '.join(plates[:3])}{' ...' if len(plates) > 3 else ''}"
            for culture, plates in forms.items()
        )
        messages.append(
            f"culture spelled {len(forms)} ways ({listed}): each counts as a culture of its own; "
            "write it one way in every plate's manifest if they are one culture"
        )
    return messages


def check_look_alikes(table: Path, header: list[str], columns=(*MANIFEST_COLUMNS, PIXEL_SIZE_COLUMN)) -> None:
    """Refuse a header that names one of `columns` in other words ('Time', 'Rep', 'Site') when that
    column is absent: the images would silently get the column's default instead of what it says.

    Raises
    ------
    PlateError
        Naming the table, the header found and the column it looks like.
    """
    for column, names in _LOOK_ALIKES.items():
        if column in header or column not in columns:
            continue
        for name in header:
            squashed = _squash(name)
            if squashed in names or (squashed.startswith(_squash(column)) and squashed != _squash(column)):
                unit = {
                    "timepoint_h": " (hours after plating: convert other units)",
                    PIXEL_SIZE_COLUMN: " (µm per pixel: convert other units)",
                }.get(column, "")
                raise PlateError(
                    table,
                    f"column {name!r} looks like {column!r}, which is read only under that name{unit}; "
                    f"rename it to {column!r}, or to something else if it means another thing",
                )


def read_manifest(plate_dir: str | Path) -> pd.DataFrame:
    """Read and normalise a plate's manifest: required columns present, defaults filled, types set.

    Returns one row per image with MANIFEST_COLUMNS first (image, culture, concentration: str;
    replicate: int64; timepoint_h: float64; well, position: str), then any extra columns; an
    optional pixel_size_um column (header 'Pixel size (µm)' and the like) is float64 µm per pixel,
    NaN where the cell is empty.
    Raises PlateError naming the manifest and, for a bad value, its line and column (a time point
    later than MAX_TIMEPOINT_H, a year, is one: a spreadsheet's date serial or another unit).
    """
    plate_dir = Path(plate_dir)
    manifest = plate_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise PlateError(manifest, "manifest.csv missing (a plate is ready once its manifest exists)")
    try:
        df = read_delimited(manifest, what="manifest")
    except InputError as exc:
        raise PlateError(manifest, exc.problem) from None
    df.columns = [c if c == LINE_COLUMN else column_name(str(c)) for c in df.columns]
    header = [c for c in df.columns if c != LINE_COLUMN]
    check_look_alikes(manifest, header)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise PlateError(
            manifest, f"manifest lacks required column(s) {missing}; {describe_header(header, MANIFEST_COLUMNS)}"
        )
    if len(set(header)) < len(header):
        twice = sorted({c for c in header if header.count(c) > 1 and c in MANIFEST_COLUMNS})
        raise PlateError(manifest, f"manifest repeats a column name{' (' + ', '.join(twice) + ')' if twice else ''}")
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
        _on_disk(plate_dir, check_image_name(manifest, line, name))
        for line, name in zip(df[LINE_COLUMN], df["image"], strict=False)
    ]
    dup = df["image"][df["image"].duplicated()]
    if not dup.empty:
        raise PlateError(manifest, f"image {dup.iloc[0]!r} listed more than once")
    check_one_spelling(manifest, df, "culture")
    df["concentration"] = concentration_labels(df, "concentration")
    df["well"] = df["well"].map(normalise_well)
    try:
        df["replicate"] = parse_numbers(df, "replicate", kind=int, what="manifest")
        df["timepoint_h"] = parse_numbers(df, "timepoint_h", kind=float, what="manifest")
    except InputError as exc:
        raise PlateError(manifest, exc.problem) from None
    late = df["timepoint_h"] > MAX_TIMEPOINT_H
    if late.any():
        raise PlateError(
            manifest,
            f"line {df[LINE_COLUMN][late].iloc[0]}, column 'timepoint_h': {df['timepoint_h'][late].iloc[0]:g} h is more "
            "than a year after plating: a date or time a spreadsheet turned into a number (44927 is 1 January "
            "2023), or minutes or seconds? give hours after plating",
        )
    if PIXEL_SIZE_COLUMN in df:
        df[PIXEL_SIZE_COLUMN] = _pixel_sizes(manifest, df)
    extra = [c for c in header if c not in MANIFEST_COLUMNS]
    return df[list(MANIFEST_COLUMNS) + extra].reset_index(drop=True)


def _pixel_sizes(manifest: Path, df: pd.DataFrame) -> pd.Series:
    """The manifest's pixel_size_um column as float64 µm, NaN where a cell is empty (the file's own size
    is used there); PlateError naming line and column for anything but a positive, finite number."""
    given = df[PIXEL_SIZE_COLUMN].astype(str).str.strip() != ""
    out = pd.Series(np.nan, index=df.index, dtype="float64", name=PIXEL_SIZE_COLUMN)
    if not given.any():
        return out
    try:
        values = parse_numbers(df[given], PIXEL_SIZE_COLUMN, kind=float, what="manifest")
    except InputError as exc:
        raise PlateError(manifest, f"{exc.problem} (the pixel size in µm)") from None
    bad = ~(values > 0)
    if bad.any():
        line = df.loc[given, LINE_COLUMN][bad].iloc[0]
        raise PlateError(
            manifest,
            f"line {line}, column {PIXEL_SIZE_COLUMN!r}: {values[bad].iloc[0]:g} is not a pixel size "
            "(a positive number of µm per pixel)",
        )
    out[given] = values
    return out


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
    pixel_size: PixelSize | None = None  # the plate's µm per pixel (pixel_size.plate_pixel_size), None if unknown

    @property
    def n_images(self) -> int:
        return len(self.manifest)


def validate_plate(plate_dir: str | Path, check_pixels: bool = True, plate_id: str | None = None) -> PlateSummary:
    """Check a plate folder end to end; raise PlateError/ImageReadError naming the file and problem.

    With check_pixels, every image is decoded once, so a corrupt file is caught here and not
    halfway through cell finding. plate_id defaults to the folder name (a staging folder being
    checked before it is renamed into place passes the id it will have).

    Raises
    ------
    PlateError
        For an unsafe plate id, a missing folder, a bad manifest (see read_manifest), a listed
        image that does not exist, images of differing sizes (height x width), or a pixel size
        that the manifest and a file disagree on or that differs between images
        (pixel_size.plate_pixel_size).
    ImageReadError
        Naming the image that cannot be read (see io.read_image; io.image_size without
        check_pixels), or whose pixels are not square (pixel_size.recorded_pixel_size).
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
            raise PlateError(path, f"mixed image sizes in plate: {first!r} is {a[1]}x{a[0]}, {name!r} is {b[1]}x{b[0]}")
    ((height, width),) = sizes.keys()
    pixel_size = plate_pixel_size(plate_dir, manifest)
    return PlateSummary(
        plate_id=plate_id,
        path=plate_dir,
        manifest=manifest,
        height=height,
        width=width,
        bits=max(bits_seen),
        cultures=sorted(manifest["culture"].unique().tolist()),
        concentrations=sorted(manifest["concentration"].unique().tolist(), key=natural_key),
        pixel_size=pixel_size,
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


# --- Plate versions: one manifest version per run ----------------------------------------------
#
# A plate's version is what raw_plates validated: the SHA-256 of manifest.csv's bytes (the content,
# so touching an identical manifest changes nothing) and a fingerprint of the images it lists
# (name, size in bytes and mtime in ns of each, read with os.stat: cheap, no pixel is read, and an
# image replaced or still being copied under the same name changes it). raw_plates writes it to
# data/plate_versions/<plate>.json; cell_coordinates refuses to run when the plate no longer has
# that version, and records the version it used in its Parquet file; cell_crops refuses when the
# plate no longer has the version cell_coordinates used. The new-plate sensor keys its runs on the
# manifest part only (`key`): a changed manifest re-ingests at once, a changed image is picked up
# by the retry of the run that refused it.

PLATE_VERSION_METADATA_KEY = b"gbm.plate_version"


@dataclass(frozen=True)
class PlateVersion:
    """The version of a plate: manifest content hash and image-list fingerprint (hex SHA-256 each)."""

    manifest_sha256: str
    images_sha256: str
    n_images: int

    @property
    def key(self) -> str:
        """Short id of the manifest content (16 hex digits), used in the sensor's run keys."""
        return self.manifest_sha256[:16]

    def as_dict(self) -> dict:
        return {"manifest_sha256": self.manifest_sha256, "images_sha256": self.images_sha256, "n_images": self.n_images}

    @classmethod
    def from_dict(cls, d: dict, where: str | Path) -> PlateVersion:
        """Rebuild from as_dict().

        Raises
        ------
        PlateError
            Naming `where` when d is not a plate version (keys missing or of the wrong type).
        """
        try:
            return cls(str(d["manifest_sha256"]), str(d["images_sha256"]), int(d["n_images"]))
        except (KeyError, TypeError, ValueError):
            raise PlateError(
                where, "holds no valid plate version (keys manifest_sha256, images_sha256, n_images)"
            ) from None

    def describe_change(self, now: PlateVersion) -> str:
        """What differs between this (earlier) version and `now`, in words."""
        parts = []
        if now.manifest_sha256 != self.manifest_sha256:
            parts.append(f"{MANIFEST_NAME} content changed (sha256 {self.key}... -> {now.key}...)")
        if now.images_sha256 != self.images_sha256:
            parts.append(f"its images changed (size or modification time; {self.n_images} -> {now.n_images} listed)")
        return "; ".join(parts) or "unchanged"


def manifest_sha256(plate_dir: str | Path) -> str:
    """Hex SHA-256 of the bytes of <plate_dir>/manifest.csv. Raises PlateError if it is missing."""
    import hashlib

    manifest = Path(plate_dir) / MANIFEST_NAME
    try:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise PlateError(manifest, "manifest.csv missing (a plate is ready once its manifest exists)") from None
    except OSError as exc:
        raise PlateError(manifest, f"cannot read the manifest ({exc.strerror or exc})") from None


def plate_version(plate_dir: str | Path, images=None) -> PlateVersion:
    """The plate's current version (see PlateVersion): hashes manifest.csv, stats each image.

    images: the manifest's image names (read_manifest(plate_dir)["image"]); read from the
    manifest when None. A missing image is fingerprinted as missing, not an error (validation
    reports it). Raises PlateError for a missing or unreadable manifest.
    """
    import hashlib

    plate_dir = Path(plate_dir)
    manifest_hash = manifest_sha256(plate_dir)
    if images is None:
        images = read_manifest(plate_dir)["image"]
    names = [str(name) for name in images]
    digest = hashlib.sha256()
    for name in names:
        try:
            st = os.stat(plate_dir / name)
            entry = f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n"
        except OSError:
            entry = f"{name}\tmissing\n"
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return PlateVersion(manifest_hash, digest.hexdigest(), len(names))


def write_plate_version(path: str | Path, plate_id: str, version: PlateVersion, **extra) -> Path:
    """Record a plate's version as JSON at `path` (atomically): plate, the version, any extra keys."""
    import json

    from gbm_assets.storage import write_bytes_atomic

    record = {"plate": plate_id, **version.as_dict(), **extra}
    return write_bytes_atomic(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def read_plate_version(path: str | Path) -> PlateVersion | None:
    """The version recorded at `path` by write_plate_version; None if no file is there.

    Raises PlateError naming the file when it is not such a record.
    """
    import json

    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlateError(path, f"unreadable plate version record ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise PlateError(path, "holds no valid plate version (not a JSON object)")
    return PlateVersion.from_dict(record, path)


def check_plate_unchanged(
    plate_dir: str | Path, plate_id: str, expected: PlateVersion, since: str, images=None
) -> PlateVersion:
    """Return the plate's current version if it equals `expected`, else raise PlateError.

    since: what recorded `expected`, for the message (e.g. "raw_plates validated it").

    Raises
    ------
    PlateError
        When the plate changed: the error names the plate and manifest, says what changed and how
        the plate is re-ingested; also for a missing or unreadable manifest (see plate_version).
    """
    now = plate_version(plate_dir, images)
    if now != expected:
        raise PlateError(
            Path(plate_dir) / MANIFEST_NAME,
            f"plate {plate_id!r} changed since {since}: {expected.describe_change(now)}. Refusing to mix "
            "two versions of the plate in one result; re-ingest it (raw_plates, cell_coordinates, "
            "cell_crops): the new-plate sensor does so on its own (at once for a changed manifest, "
            "on retry for changed images), or run `gbm-assets run --refresh`",
        )
    return now


def plate_version_schema_metadata(version: PlateVersion, metadata: dict | None = None) -> dict:
    """Parquet key-value metadata `metadata` plus the plate version (under PLATE_VERSION_METADATA_KEY)."""
    import json

    return {**(metadata or {}), PLATE_VERSION_METADATA_KEY: json.dumps(version.as_dict(), sort_keys=True).encode()}


def parquet_plate_version(path: str | Path) -> PlateVersion | None:
    """The plate version recorded in a Parquet file's key-value metadata; None if it records none.

    Raises FileNotFoundError if the file is missing, PlateError naming it if the record is bad.
    """
    import json

    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(PLATE_VERSION_METADATA_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PlateError(path, "holds no valid plate version (bad JSON in its Parquet metadata)") from None
    return PlateVersion.from_dict(record if isinstance(record, dict) else {}, path)
