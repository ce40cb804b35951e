"""The pixel size (µm per pixel) an image file records, and the one of a plate.

What is read (from the header only; no pixel is decoded):
    OME-TIFF: Pixels PhysicalSizeX / PhysicalSizeY in PhysicalSizeXUnit / PhysicalSizeYUnit (µm when
        absent, as the OME schema says; every length unit of the schema converts: nm, mm, Å, ...).
    ImageJ TIFF: 1 / XResolution (and YResolution) in the `unit` of its ImageDescription (`micron`,
        `um`, `µm`, ImageJ's `\\u00B5m`, `nm`, `mm`, `cm`, `inch`...).
    MetaMorph / MetaXpress (MetaSeries) TIFF: PlaneInfo spatial-calibration-x / -y in
        spatial-calibration-units, when spatial-calibration-state is on (these files put no
        calibration in the resolution tags).
    Other TIFFs: 1 / XResolution (YResolution) in ResolutionUnit (inch or centimetre; tifffile's
        millimetre and micrometre too).
    ND2, CZI, LIF: bioio's physical_pixel_sizes (µm), with the formats extra.
    PNG, JPEG, BMP: not read (their density fields are a print resolution): None.

"Not recorded" (None) is not a pixel size: a TIFF without resolution tags, ResolutionUnit NONE (tifffile
and many writers put 1 pixel per unit there), an ImageJ `pixel` unit, and the print resolutions
image editors and cameras write by default (72, 96, 300, 600 dpi) are all None. A resolution given in
inches or centimetres is a calibration only when the pixel is finer than COARSEST_CALIBRATED_UM
(20 µm, 1,270 dpi): a microscope's pixel is 0.1-15 µm, while 72 dpi is 353 µm and 600 dpi 42 µm.

Non-square pixels (X and Y sizes more than PIXEL_SIZE_TOLERANCE apart) are refused, not averaged:
cell finding and the shape measurements (area, axis lengths, eccentricity, form factor) work on the
pixel grid as if pixels were square, so the geometric mean would give the right area but every
elongation and outline would stay distorted. Resample such images to square pixels first. When a file
gives one axis only, that size is used for both (OME's PhysicalSizeY is optional).

A plate (plate_pixel_size) has one pixel size: its images' recorded sizes, or the manifest's
`pixel_size_um` column, which supplies a size the files lack and must agree with one they record.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from gbm_assets.errors import ImageReadError, PlateError
from gbm_assets.imaging.io import is_thumbnail_or_mask

PIXEL_SIZE_COLUMN = "pixel_size_um"  # manifest and cell_coordinates column, µm per pixel
PIXEL_SIZE_TOLERANCE = 0.01  # relative: two sizes closer than 1% are one (rationals, rounding in writers)
COARSEST_CALIBRATED_UM = 20.0  # an inch/cm resolution coarser than this is a print default, not a calibration

# Micrometres per unit: OME's UnitsLength (the schema's enumeration) and ImageJ's spellings.
_UM_PER_UNIT = {
    "ym": 1e-18,
    "zm": 1e-15,
    "am": 1e-12,
    "fm": 1e-9,
    "pm": 1e-6,
    "å": 1e-4,
    "Å": 1e-4,
    "angstrom": 1e-4,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "\\u00b5m": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "dm": 1e5,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "thou": 25.4,
    "mil": 25.4,
    "in": 25_400.0,
    "inch": 25_400.0,
    "inches": 25_400.0,
    "ft": 304_800.0,
}
_NOT_A_LENGTH = {"", "pixel", "pixels", "px", "reference frame"}
_UNIT_MEANS_PRINT = {"in", "inch", "inches", "cm", "centimeter", "centimetre"}
_RESUNIT_UM = {
    tifffile.RESUNIT.INCH: 25_400.0,
    tifffile.RESUNIT.CENTIMETER: 1e4,
    tifffile.RESUNIT.MILLIMETER: 1e3,
    tifffile.RESUNIT.MICROMETER: 1.0,
}


@dataclass(frozen=True)
class PixelSize:
    """A pixel size: um (µm per pixel, > 0) and where it comes from (e.g. "OME PhysicalSizeX", "manifest")."""

    um: float
    source: str


def same_pixel_size(a: float, b: float, tolerance: float = PIXEL_SIZE_TOLERANCE) -> bool:
    """Whether two sizes (µm) agree within `tolerance`, relative to the larger."""
    return abs(a - b) <= tolerance * max(abs(a), abs(b))


def recorded_pixel_size(path: str | Path) -> PixelSize | None:
    """The pixel size (µm per pixel) an image file's header records, None when it records none.

    Parameters
    ----------
    path : str or Path
        An image file (see the module for what each format gives).

    Returns
    -------
    PixelSize or None
        um > 0 and finite, and its source ("OME PhysicalSizeX", "ImageJ unit 'micron'", "TIFF
        XResolution (inch)", "bioio physical_pixel_sizes"); None when not recorded (module docstring).

    Raises
    ------
    ImageReadError
        Naming the file when its pixels are not square (X and Y sizes more than
        PIXEL_SIZE_TOLERANCE apart), when it gives a size in a unit that is not a length unit known
        here, when its header cannot be read, or (ND2/CZI/LIF) when bioio is not installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    from gbm_assets.imaging.io import VENDOR_SUFFIXES

    if suffix in VENDOR_SUFFIXES:
        return _vendor(path, VENDOR_SUFFIXES[suffix])
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read the file ({type(exc).__name__})") from None
    if head not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None  # PNG, JPEG, BMP: a print density at most
    try:
        with tifffile.TiffFile(path) as tif:
            page = _image_page(tif)
            ome = tif.ome_metadata if tif.is_ome else None
            imagej = tif.imagej_metadata if tif.is_imagej else None
            metaseries = tif.metaseries_metadata if tif.is_metaseries else None
            tags = page.tags
            resolution = tuple(_rational(tags[name].value) for name in ("XResolution", "YResolution") if name in tags)
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
    except Exception as exc:  # a damaged header; only the class: the text may quote the file
        raise ImageReadError(path, f"unreadable TIFF header ({type(exc).__name__})") from None
    if ome:
        found = _ome(path, ome)
        if found is not None:
            return found
    if metaseries:
        found = _metaseries(path, metaseries.get("PlaneInfo") or {})
        if found is not None:
            return found
    if imagej and str(imagej.get("unit", "")).strip():
        return _from_resolution(path, resolution, str(imagej["unit"]).strip(), f"ImageJ unit {imagej['unit']}")
    if unit is None or int(unit) not in {int(u) for u in _RESUNIT_UM}:
        return None  # no unit (RESUNIT.NONE): an aspect ratio, not a size
    name = tifffile.RESUNIT(int(unit)).name.lower()
    return _from_resolution(path, resolution, name, f"TIFF XResolution ({name})", um_per_unit=_RESUNIT_UM[unit])


def plate_pixel_size(plate_dir: str | Path, manifest: pd.DataFrame) -> PixelSize | None:
    """The one pixel size of a plate's images (µm), from their headers and the manifest.

    Parameters
    ----------
    plate_dir : str or Path
        The plate folder.
    manifest : DataFrame
        plates.read_manifest's table: `image`, and optionally `pixel_size_um` (float64, µm, NaN
        where not given; read_manifest has checked it is positive and finite).

    Returns
    -------
    PixelSize or None
        The manifest's size where it gives one (source "manifest"), else the recorded one; None
        when no image has either.

    Raises
    ------
    PlateError
        Naming the manifest and the image when the manifest's pixel_size_um and the file's recorded
        size differ by more than PIXEL_SIZE_TOLERANCE (both given); naming two images when the
        plate's images have different sizes (two set-ups: make them two plates), or when some have a
        size and others none (give pixel_size_um in the manifest for every image).
    ImageReadError
        From recorded_pixel_size (non-square pixels, an unknown unit, an unreadable header) for an
        image whose manifest row gives no pixel_size_um (a row that gives one overrides the header).
    """
    plate_dir = Path(plate_dir)
    manifest_file = plate_dir / "manifest.csv"
    given = (
        manifest[PIXEL_SIZE_COLUMN].to_numpy(float) if PIXEL_SIZE_COLUMN in manifest else np.full(len(manifest), np.nan)
    )
    sizes: list[tuple[str, PixelSize | None]] = []
    for name, stated in zip(manifest["image"], given, strict=True):
        if math.isfinite(stated):
            try:
                recorded = recorded_pixel_size(plate_dir / name)
            except ImageReadError:
                recorded = None  # a header we cannot interpret (unit, non-square): the manifest decides
            if recorded is not None and not same_pixel_size(stated, recorded.um):
                raise PlateError(
                    manifest_file,
                    f"image {name!r}: pixel_size_um {stated:g} µm, but {plate_dir / name} records "
                    f"{recorded.um:.6g} µm ({recorded.source}); correct the manifest, or leave the cell "
                    "empty to use the file's",
                )
            sizes.append((name, PixelSize(float(stated), "manifest")))
        else:
            sizes.append((name, recorded_pixel_size(plate_dir / name)))
    if not sizes:
        return None
    known = [(n, s) for n, s in sizes if s is not None]
    if not known:
        return None
    if len(known) < len(sizes):
        missing = next(n for n, s in sizes if s is None)
        first, size = known[0]
        raise PlateError(
            manifest_file,
            f"pixel size known for {first!r} ({size.um:.6g} µm, {size.source}) but not for {missing!r}: "
            f"give {PIXEL_SIZE_COLUMN} in the manifest for every image (or none)",
        )
    first, size = known[0]
    for name, other in known[1:]:
        if not same_pixel_size(size.um, other.um):
            raise PlateError(
                manifest_file,
                f"images of different pixel sizes in one plate: {first!r} {size.um:.6g} µm ({size.source}), "
                f"{name!r} {other.um:.6g} µm ({other.source}); two set-ups (objective, binning): make them two plates",
            )
    sources = sorted({s.source for _, s in known})
    return PixelSize(size.um, sources[0] if len(sources) == 1 else "; ".join(sources))


def coordinates_pixel_sizes(coordinates_dir: str | Path, plates=None) -> dict[str, float]:
    """{plate: pixel size in µm} as cell_coordinates recorded it (its `pixel_size_um` column).

    plates: the plate ids to look up; None: every plate with a file under coordinates_dir
    (plate=<id>/part-0.parquet). NaN for a plate whose size is unknown, whose coordinates file is
    missing, or was written before the column existed. Reads one column of one row group per plate.
    """
    import pyarrow.parquet as pq

    from gbm_assets.paths import plate_file

    if plates is None:
        plates = [
            f.parent.name.removeprefix("plate=") for f in sorted(Path(coordinates_dir).glob("plate=*/part-0.parquet"))
        ]
    out = {}
    for plate in plates:
        path = plate_file(coordinates_dir, str(plate))
        value = math.nan
        try:
            with pq.ParquetFile(path) as pf:
                if PIXEL_SIZE_COLUMN in pf.schema_arrow.names and pf.metadata.num_rows:
                    column = pf.read_row_group(0, columns=[PIXEL_SIZE_COLUMN]).column(0)
                    value = float(column[0].as_py()) if len(column) and column[0].is_valid else math.nan
        except FileNotFoundError:
            pass
        out[str(plate)] = value
    return out


# ------------------------------------------------------------------------------------------- helpers


def _image_page(tif: tifffile.TiffFile):
    """The first page that is the image itself, not a thumbnail or mask (NewSubfileType flags)."""
    return next((page for page in tif.pages if not is_thumbnail_or_mask(page)), tif.pages.first)


def _rational(value) -> float:
    if isinstance(value, tuple):
        return value[0] / value[1] if len(value) == 2 and value[1] else math.nan
    return float(value)


def _unit_um(path: Path, unit: str, where: str) -> float | None:
    key = unit.strip()
    if key.lower() in _NOT_A_LENGTH:
        return None
    factor = _UM_PER_UNIT.get(key, _UM_PER_UNIT.get(key.lower()))
    if factor is None:
        raise ImageReadError(
            path,
            f"{where} gives the pixel size in {unit!r}, not a length unit known here; give pixel_size_um in the manifest",
        )
    return factor


def _square(path: Path, x: float | None, y: float | None, source: str) -> PixelSize | None:
    valid = [v for v in (x, y) if v is not None and math.isfinite(v) and v > 0]
    if not valid:
        return None
    if len(valid) == 2 and not same_pixel_size(x, y):
        raise ImageReadError(
            path,
            f"non-square pixels ({x:.6g} x {y:.6g} µm, {source}): cell finding and shape measurements "
            "assume square pixels; resample the image to square pixels first",
        )
    return PixelSize(float(valid[0]) if len(valid) == 1 else float(math.sqrt(x * y)), source)


def _from_resolution(
    path: Path, resolution: tuple, unit: str, source: str, um_per_unit: float | None = None
) -> PixelSize | None:
    factor = um_per_unit if um_per_unit is not None else _unit_um(path, unit, source)
    if factor is None or not resolution:
        return None
    per_unit = [r if math.isfinite(r) and r > 0 else None for r in resolution]
    x, y = (factor / r if r else None for r in (per_unit + [None])[:2])
    if unit.lower() in _UNIT_MEANS_PRINT and any(v is not None and v >= COARSEST_CALIBRATED_UM for v in (x, y)):
        return None  # 72, 96, 300 dpi (even 72 x 96): a print resolution, not a calibration
    return _square(path, x, y, source)


def _ome(path: Path, xml: str) -> PixelSize | None:
    try:
        image = tifffile.xml2dict(xml)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except Exception:
        raise ImageReadError(path, "unreadable OME-XML metadata (no OME/Image/Pixels)") from None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            sizes.append(None)
            continue
        factor = _unit_um(path, str(pixels.get(f"PhysicalSize{axis}Unit", "µm")), f"OME PhysicalSize{axis}Unit")
        try:
            sizes.append(float(value) * factor if factor is not None else None)
        except (TypeError, ValueError):
            raise ImageReadError(path, f"OME PhysicalSize{axis} {value!r} is not a number") from None
    return _square(path, *sizes, "OME PhysicalSizeX")


def _metaseries(path: Path, plane: dict) -> PixelSize | None:
    """MetaMorph / MetaXpress: PlaneInfo spatial-calibration-x/-y in spatial-calibration-units,
    used when spatial-calibration-state is on (off: the image is uncalibrated, sizes are 1 pixel)."""
    if plane.get("spatial-calibration-state") is not True:
        return None
    factor = _unit_um(path, str(plane.get("spatial-calibration-units", "")), "MetaSeries spatial-calibration-units")
    if factor is None:
        return None
    try:
        x, y = (float(plane[f"spatial-calibration-{axis}"]) * factor for axis in "xy")
    except (KeyError, TypeError, ValueError):
        raise ImageReadError(path, "MetaSeries spatial calibration is on but its x or y is not a number") from None
    return _square(path, x, y, "MetaSeries spatial-calibration-x")


def _vendor(path: Path, module: str) -> PixelSize | None:
    try:
        plugin = importlib.import_module(module)
        from bioio import BioImage
    except ImportError:
        raise ImageReadError(
            path, f"reading {path.suffix} needs the optional extra: pip install 'gbm-assets[formats]'"
        ) from None
    try:
        sizes = BioImage(path, reader=plugin.Reader).physical_pixel_sizes
    except Exception as exc:
        raise ImageReadError(path, f"unreadable or corrupt image ({type(exc).__name__})") from None
    return _square(path, sizes.X, sizes.Y, "bioio physical_pixel_sizes")
