"""The plate format: data/raw/<plate_id>/ holding images and a manifest.csv, and its validation.

Only the manifest columns `image` and `culture` are required. Missing optional columns get
defaults: concentration "na", replicate 1, timepoint_h 0.0. A plate is ready once its
manifest.csv exists (write the images first, the manifest last).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from gbm_assets.errors import InputError, PlateError
from gbm_assets.imaging.io import IMAGE_SUFFIXES, image_size

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("image", "culture")
OPTIONAL_DEFAULTS = {"concentration": "na", "replicate": 1, "timepoint_h": 0.0}
MANIFEST_COLUMNS = ("image", "culture", "concentration", "replicate", "timepoint_h")

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
            "plate id is not a safe name (use letters, digits, '.', '_', '-'; no '..' or slashes)",
        )
    return plate_id


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
        raise PlateError(manifest, f"row {row}: image {name!r} is not a TIFF or PNG file")
    return str(pure)


def read_manifest(plate_dir: str | Path) -> pd.DataFrame:
    """Read and normalise a plate's manifest: required columns present, defaults filled, types set."""
    plate_dir = Path(plate_dir)
    manifest = plate_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise PlateError(manifest, "manifest.csv missing (a plate is ready once its manifest exists)")
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:
        raise PlateError(manifest, f"unreadable manifest ({type(exc).__name__}: {exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise PlateError(manifest, f"manifest lacks required column(s) {missing}; has {list(df.columns)}")
    if df.empty:
        raise PlateError(manifest, "manifest lists no images (empty plate)")
    for col, default in OPTIONAL_DEFAULTS.items():
        if col not in df.columns:
            df[col] = str(default)
        df[col] = df[col].astype(str).str.strip().replace("", str(default))
    df["image"] = [check_image_name(manifest, i + 2, n.strip()) for i, n in enumerate(df["image"])]
    df["culture"] = df["culture"].astype(str).str.strip()
    if (df["culture"] == "").any():
        row = int((df["culture"] == "").to_numpy().argmax()) + 2
        raise PlateError(manifest, f"row {row}: empty culture")
    dup = df["image"][df["image"].duplicated()]
    if not dup.empty:
        raise PlateError(manifest, f"image {dup.iloc[0]!r} listed more than once")
    for col, kind in (("replicate", int), ("timepoint_h", float)):
        try:
            df[col] = pd.to_numeric(df[col], errors="raise").astype(kind)
        except (ValueError, TypeError) as exc:
            raise PlateError(manifest, f"column {col!r} must be numeric ({exc})") from exc
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
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


def validate_plate(plate_dir: str | Path, check_pixels: bool = True) -> PlateSummary:
    """Check a plate folder end to end; raise PlateError/ImageReadError naming the file and problem.

    With check_pixels, every image is decoded once, so a corrupt file is caught here and not
    halfway through cell finding.
    """
    from gbm_assets.imaging.io import read_image

    plate_dir = Path(plate_dir)
    plate_id = check_plate_id(plate_dir.name)
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
    """Plate ids under raw/ whose manifest exists and whose folder name is safe, sorted."""
    raw = Path(raw)
    if not raw.is_dir():
        return []
    ready = []
    for child in sorted(raw.iterdir()):
        if child.is_dir() and (child / MANIFEST_NAME).is_file():
            try:
                ready.append(check_plate_id(child.name))
            except InputError:
                continue  # unsafe names are never registered; raw_plates reports them if asked
    return ready


def make_plate(
    source: str | Path, raw: str | Path, plate_id: str, culture: str, concentration: str = "na",
    replicate: int = 1, timepoint_pattern: str | None = None, link: bool = True,
) -> Path:
    """Turn a folder of images into a plate under raw/: images linked (or copied), manifest last.

    timepoint_pattern: a regular expression whose first group, read from each file name, is the
    time point in hours (e.g. r"t(\d+)"); without it every image is time point 0.
    """
    import os
    import shutil

    source = Path(source)
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PlateError(source, "no TIFF or PNG images in this folder")
    plate_dir = Path(raw) / check_plate_id(plate_id)
    plate_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in images:
        target = plate_dir / path.name
        if not target.exists():
            if link:
                target.symlink_to(path.resolve())
            else:
                shutil.copy2(path, target)
        hours = 0.0
        if timepoint_pattern:
            match = re.search(timepoint_pattern, path.name)
            if not match:
                raise PlateError(path, f"file name does not match the time-point pattern {timepoint_pattern!r}")
            hours = float(match.group(1))
        rows.append((path.name, culture, concentration, replicate, hours))
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    tmp = plate_dir / f".{MANIFEST_NAME}.tmp"
    manifest.to_csv(tmp, index=False)
    os.replace(tmp, plate_dir / MANIFEST_NAME)
    return plate_dir
