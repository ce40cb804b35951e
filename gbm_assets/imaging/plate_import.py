"""Making a plate from what labs hand over: a folder of images, an instrument export, image stacks.

Live-cell imagers (Incucyte and its peers) export one file per well, position and time, named
`<vessel>_<channel>_<well>_<position>_<DD>d<HH>h<MM>m.tif` (elapsed time since the scan started) or
with an absolute `<YYYY>y<MM>m<DD>d_<HH>h<MM>m` stamp; a lab's plate map (a table with a `well`
column and any of culture / concentration / replicate) says what each well holds. A multi-page TIFF,
ImageJ/OME stack or vendor time-lapse becomes one image per frame. Nothing appears under raw/ until
every image has been read: the plate is assembled in a hidden staging folder, validated, and
renamed into place in one step, so a failed import leaves no plate behind.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PurePosixPath

import pandas as pd
import tifffile

from gbm_assets.errors import InputError, PlateError
from gbm_assets.imaging.cellprofiler import (
    TABLE_SUFFIXES,
    WORKBOOK_SUFFIXES,
    check_plate_tables,
    is_database_file,
    table_files,
)
from gbm_assets.imaging.io import IMAGE_SUFFIXES, frame_axes, frame_times_h, image_files, read_frames
from gbm_assets.imaging.io import frame_interval_h as recorded_interval_h
from gbm_assets.imaging.pixel_size import recorded_pixel_size
from gbm_assets.imaging.plates import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    MAX_TIMEPOINT_H,
    check_look_alikes,
    check_one_spelling,
    check_plate_id,
    column_name,
    concentration_label,
    concentration_labels,
    normalise_well,
    read_manifest,
    safe_plate_id,
    validate_plate,
)
from gbm_assets.tables import LINE_COLUMN, describe_header, parse_numbers, read_delimited

ELAPSED = re.compile(r"(?<![0-9A-Za-z])(\d+)d(\d{1,2})h(\d{1,2})m(?![0-9A-Za-z])")
ABSOLUTE = re.compile(r"(?<!\d)(\d{4})y(\d{2})m(\d{2})d_(\d{2})h(\d{2})m(?![0-9A-Za-z])")
# <prefix>_<well>_<position>_<time>[_<tile>]: the prefix is the vessel and usually the channel
# (Incucyte S3: GBM03_Phase_B2_1_02d04h30m; Incucyte Zoom: VID193_A1_1_2016y06m23d_11h41m;
# LIVECell's tiles of a field add _<tile>: A172_Phase_C7_1_00d00h00m_2).
INSTRUMENT_NAME = re.compile(
    r"^(?P<prefix>.+?)_(?P<well>[A-Za-z]{1,2}\d{1,3})_(?P<position>\d+)_"
    r"(?P<time>\d+d\d{1,2}h\d{1,2}m|\d{4}y\d{2}m\d{2}d_\d{2}h\d{2}m)(?:_(?P<tile>\d+))?$"
)
PLATE_MAP_COLUMNS = ("culture", "concentration", "replicate")
_AXIS_NAMES = {"T": "time points", "Z": "focal planes (Z)", "I": "pages", "Q": "pages", "R": "tiles"}


@dataclass(frozen=True)
class SourceImage:
    """One image of the plate to be: where its pixels come from and what its name says."""

    source: Path
    name: str  # file name in the plate folder
    timepoint_h: float | None = None
    well: str = "na"
    position: str = "na"
    group: str = ""  # vessel and channel of an instrument export
    frame: int | None = None  # index within a stack


def elapsed_hours(name: str) -> float | None:
    """Hours from a `DDdHHhMMm` stamp in a file name ('..._02d04h30m.tif' -> 52.5), else None."""
    match = ELAPSED.search(name)
    if not match:
        return None
    days, hours, minutes = (int(g) for g in match.groups())
    return days * 24 + hours + minutes / 60


def parse_instrument_name(name: str) -> SourceImage | None:
    """Well, position and time of an instrument export's file name, or None for other names.

    Absolute stamps give hours since 2000-01-01 here; make_plate turns them into hours since the
    plate's first scan.

    Raises
    ------
    PlateError
        Naming the file when its absolute stamp (``YYYYyMMmDDd_HHhMMm``) is not a valid date and time.
    """
    match = INSTRUMENT_NAME.match(re.sub(r"\.ome$", "", Path(name).stem, flags=re.IGNORECASE))  # x.ome.tif
    if not match:
        return None
    stamp = match["time"]
    absolute = ABSOLUTE.fullmatch(stamp)
    if absolute:
        y, mo, d, h, mi = (int(g) for g in absolute.groups())
        try:
            hours = (datetime(y, mo, d, h, mi) - datetime(2000, 1, 1)).total_seconds() / 3600
        except ValueError:
            raise PlateError(name, f"time stamp {stamp!r} is not a valid date and time") from None
    else:
        hours = elapsed_hours(stamp)
    position = str(int(match["position"])) + (f"_{int(match['tile'])}" if match["tile"] else "")
    return SourceImage(Path(name), name, hours, normalise_well(match["well"]), position, match["prefix"])


def _timepoint_regex(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise PlateError("--timepoint-pattern", f"{pattern!r} is not a regular expression ({exc})") from None
    if regex.groups != 1:
        raise PlateError(
            "--timepoint-pattern",
            f"{pattern!r} has {regex.groups} groups; it needs exactly one, around the time point in hours "
            r"(e.g. 't(\d+)'; instrument stamps like 02d04h30m are read without a pattern)",
        )
    return regex


def _describe(path: Path, timepoint_pattern: re.Pattern | None) -> SourceImage:
    parsed = parse_instrument_name(path.name) or SourceImage(path, path.name, elapsed_hours(path.name))
    parsed = replace(parsed, source=path, name=path.name)
    if timepoint_pattern is not None:
        match = timepoint_pattern.search(path.name)
        if not match:
            raise PlateError(path, f"file name does not match the time-point pattern {timepoint_pattern.pattern!r}")
        try:
            parsed = replace(parsed, timepoint_h=float(match.group(1)))
        except (TypeError, ValueError):
            raise PlateError(path, f"the time-point pattern's group matched {match.group(1)!r}, not a number") from None
        if parsed.timepoint_h > MAX_TIMEPOINT_H:
            raise PlateError(
                path,
                f"the time-point pattern {timepoint_pattern.pattern!r} reads {match.group(1)!r} from its name, "
                f"{parsed.timepoint_h:g} h, more than a year after plating (a date, or minutes?): give a "
                "--timepoint-pattern whose group is the hours after plating",
            )
    return parsed


def _expand_frames(image: SourceImage, interval_h: float | None) -> list[SourceImage]:
    """One entry per frame of a stack, else the image. Frame k is at the file's time plus k times
    interval_h; without it, plus the time the file records for frame k (OME Plane DeltaT, see
    io.frame_times_h), else k times the interval the file records (ImageJ, OME, vendor metadata),
    else k hours.

    A stack must run along one axis: time, or an unlabelled page or slice sequence (ImageJ saves
    a time-lapse as slices unless told otherwise), read as time. Frames along two axes (an ImageJ
    hyperstack of time points x focal planes, an OME T x Z series), and focal planes alone (OME Z,
    an ImageJ stack with a z-step, a vendor Z series) are refused: giving each plane its own time
    point would be wrong, and giving a time point several planes of the same cells would count them
    several times.
    """
    axes = frame_axes(image.source)
    if not axes:
        return [image]
    if len(axes) > 1:
        shape = " x ".join(f"{n} {_AXIS_NAMES.get(a, a)}" for a, n in axes.items())
        raise PlateError(
            image.source,
            f"is a stack of {shape}; a plate takes one image per field and time point: save one plane "
            "per time point (e.g. ImageJ Image > Stacks > Z Project, or the in-focus plane) and add that",
        )
    if "Z" in axes:
        raise PlateError(
            image.source,
            f"is a stack of {axes['Z']} focal planes (Z) of one time point, not a time-lapse; a plate "
            "takes one image per field and time point: save one plane (e.g. ImageJ Image > Stacks > "
            "Z Project, or the in-focus plane) and add that",
        )
    n = next(iter(axes.values()))
    start = image.timepoint_h or 0.0
    times = frame_times_h(image.source) if interval_h is None else None
    if times is None or len(times) != n:
        step = interval_h if interval_h is not None else (recorded_interval_h(image.source) or 1.0)
        times = [k * step for k in range(n)]
    stem = Path(image.name).stem.removesuffix(".ome")
    return [replace(image, name=f"{stem}_frame{k:03d}.tif", frame=k, timepoint_h=start + times[k]) for k in range(n)]


def source_images(
    source: str | Path,
    timepoint_pattern: str | None = None,
    include: str | None = None,
    frame_interval_h: float | None = None,
) -> list[SourceImage]:
    """Every image (or stack frame) under `source` (a folder, or one file), with what its name says.

    Raises PlateError for an empty folder, a time-point pattern with other than one group, images
    of several vessels or channels mixed in one folder, two images of one well, position and time,
    and a pattern that gives several images one and the same time point.
    """
    source = Path(source)
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = image_files(source)
    else:
        raise PlateError(source, "no such file or folder")
    if include:
        files = [p for p in files if fnmatch.fnmatch(p.name, include)]
    if not files:
        raise PlateError(
            source, f"no images here ({', '.join(IMAGE_SUFFIXES)}{'; --include ' + include if include else ''})"
        )
    regex = _timepoint_regex(timepoint_pattern) if timepoint_pattern else None
    images = [_describe(p, regex) for p in files]
    groups = sorted({im.group for im in images if im.group})
    odd = [im for im in images if not im.group]
    if groups and odd:
        raise PlateError(
            odd[0].source,
            f"is not named like the instrument export beside it ({len(images) - len(odd)} files named "
            "<vessel>_<channel>_<well>_<position>_<time>), so its well, position and time are unknown "
            "(a renamed copy?); move it out or choose the export's files with --include",
        )
    if len(groups) > 1:
        raise PlateError(
            source,
            f"holds exports of {len(groups)} vessels or channels ({', '.join(groups[:4])}); "
            f"import one at a time, e.g. --include '{groups[0]}_*'",
        )
    times = [im.timepoint_h for im in images if im.timepoint_h is not None]
    if times and any(ABSOLUTE.search(im.name) for im in images):  # hours since the first scan
        first = min(times)
        images = [
            replace(im, timepoint_h=im.timepoint_h - first) if im.timepoint_h is not None else im for im in images
        ]
    if regex is not None and len(images) > 1 and len({im.timepoint_h for im in images}) == 1:
        raise PlateError(
            "--timepoint-pattern",
            f"{timepoint_pattern!r} gives all {len(images)} images the same "
            f"time point ({images[0].timepoint_h:g}); its group must capture what changes between files",
        )
    expanded = [frame for im in images for frame in _expand_frames(im, frame_interval_h)]
    seen: dict[tuple, str] = {}
    for im in expanded:  # after expansion: a stack's later frames may land on another file's time
        if im.well != "na":
            key = (im.well, im.position, im.timepoint_h)
            if key in seen:
                raise PlateError(
                    im.source,
                    f"{im.name!r} has the same well {im.well}, position {im.position} and "
                    f"time ({im.timepoint_h:g} h) as {seen[key]!r}",
                )
            seen[key] = im.name
    names = pd.Series([im.name for im in expanded])
    if names.duplicated().any():
        raise PlateError(source, f"two images would both be named {names[names.duplicated()].iloc[0]!r} in the plate")
    return expanded


def nested_inputs(source: str | Path, include: str | None = None, plate_map: str | Path | None = None, raw=None):
    """Images (matching `include`) and tables in the sub-folders of an add-plate source folder, which
    add-plate does not read: an export written one sub-folder per well, CellProfiler's tables in an
    output folder, or merely thumbnails and metadata. The caller says so (the CLI prints a note
    naming them), so none is left out without a word. The plate map and the raw plates folder are
    not counted, nor hidden files and folders.

    Returns the files found, sorted (list of Path; [] for a file source or a folder without any).
    """
    source = Path(source)
    if not source.is_dir():
        return []
    skip = Path(plate_map).resolve() if plate_map else None
    raw_dir = Path(raw).resolve() if raw else None
    tables = (*TABLE_SUFFIXES, *WORKBOOK_SUFFIXES)
    found = []
    for sub in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.resolve() == raw_dir:
            continue
        for folder, dirs, names in os.walk(sub):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() != raw_dir)
            found += [
                Path(folder) / n
                for n in sorted(names)
                if not n.startswith(".")
                and (Path(folder) / n).resolve() != skip
                and (
                    (Path(n).suffix.lower() in IMAGE_SUFFIXES and (not include or fnmatch.fnmatch(n, include)))
                    or Path(n).suffix.lower() in tables
                    or is_database_file(Path(folder) / n)
                )
            ]
    return found


def read_plate_map(path: str | Path) -> pd.DataFrame:
    """A plate map: index well ('B2'), columns among culture, concentration (str), replicate (int).

    Raises PlateError naming the file for a missing well column, no metadata column, a well listed
    twice, or a replicate that is not a whole number (with its line).
    """
    path = Path(path)
    try:
        table = read_delimited(path, what="plate map")
        table.columns = [c if c == LINE_COLUMN else column_name(c) for c in table.columns]
        check_look_alikes(path, [c for c in table.columns if c != LINE_COLUMN], ("well", *PLATE_MAP_COLUMNS))
        if "well" not in table.columns:
            header = [c for c in table.columns if c != LINE_COLUMN]
            grid = sum(str(c).strip().isdigit() for c in header) >= 2  # "", 1, 2, ... 12: a plate drawn as a grid
            hint = (
                " (it looks like a plate drawn as a grid, rows A-H by columns 1-12: write one row per well, "
                "well,culture,concentration,replicate)"
                if grid
                else ""
            )
            raise PlateError(
                path,
                f"plate map needs a 'well' column; {describe_header(table.columns, ('well', *PLATE_MAP_COLUMNS))}{hint}",
            )
        present = [c for c in PLATE_MAP_COLUMNS if c in table.columns]
        if not present:
            raise PlateError(path, f"plate map needs at least one of {list(PLATE_MAP_COLUMNS)} beside 'well'")
        table["well"] = table["well"].map(normalise_well)
        dup = table["well"][table["well"].duplicated()]
        if not dup.empty:
            raise PlateError(path, f"well {dup.iloc[0]} is listed more than once")
        if "culture" in present:
            check_one_spelling(path, table, "culture")
        if "concentration" in present:
            table["concentration"] = concentration_labels(table, "concentration")
        if "replicate" in present:
            table["replicate"] = parse_numbers(table, "replicate", kind=int, what="plate map")
    except InputError as exc:
        raise PlateError(path, exc.problem) from None
    return table.set_index("well")[present]


def plate_manifest(
    images: list[SourceImage],
    culture: str | None = None,
    concentration: str = "na",
    replicate: int = 1,
    plate_map: pd.DataFrame | None = None,
    plate_map_name: str = "plate map",
) -> pd.DataFrame:
    """The manifest of a plate to be, one row per image (MANIFEST_COLUMNS, then source and frame).

    Culture, concentration and replicate come from the arguments, overridden per well by the
    plate map (indexed by well, as read_plate_map returns it); frame is dropped when no image
    is a stack frame.

    Raises
    ------
    PlateError
        Naming the image when a plate map is given but its name has no well or the well is not in
        the map, or when no culture is known for it.
    """
    rows = []
    for im in images:
        meta = {"culture": culture, "concentration": concentration, "replicate": replicate}
        if plate_map is not None:
            if im.well == "na":
                raise PlateError(
                    im.source,
                    "no well in the file name, so the plate map cannot apply "
                    "(expected an instrument name like LINE_Phase_B2_1_02d04h30m.tif)",
                )
            if im.well not in plate_map.index:
                raise PlateError(im.source, f"well {im.well} is not in the {plate_map_name}")
            meta.update({k: v for k, v in plate_map.loc[im.well].items() if str(v) != ""})
        if not meta["culture"]:
            raise PlateError(im.source, "no culture: give --culture or a culture column in the plate map")
        rows.append(
            {
                "image": im.name,
                **meta,
                "timepoint_h": im.timepoint_h or 0.0,
                "well": im.well,
                "position": im.position,
                "source": im.source.name,
                "frame": "" if im.frame is None else im.frame,
            }
        )
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "source", "frame"])
    if (manifest["frame"] == "").all():
        manifest = manifest.drop(columns="frame")
    return manifest


def make_plate(
    source: str | Path,
    raw: str | Path,
    plate_id: str | None = None,
    culture: str | None = None,
    concentration: str = "na",
    replicate: int = 1,
    timepoint_pattern: str | None = None,
    link: bool = True,
    plate_map: str | Path | None = None,
    include: str | None = None,
    frame_interval_h: float | None = None,
) -> Path:
    """Turn a folder of images (or an instrument export, or a stack) into the plate raw/<plate_id>.

    Single images are linked (or copied with link=False); each frame of a stack is written as its
    own TIFF. plate_id defaults to a safe id derived from the folder name. timepoint_pattern: a
    regular expression with one group, read from each file name, giving the time point in hours
    (e.g. r"t(\\d+)"); without it, instrument stamps (DDdHHhMMm) are read, else time point 0.
    Returns the plate folder. Raises PlateError / ImageReadError naming the file and problem; then
    nothing is left under raw/. Sub-folders are not searched (`nested_inputs` lists what they hold).
    """
    source = Path(source)
    name = source.name.split(".")[0] if source.is_file() else source.name  # xy01.ome.tif -> xy01
    plate_id = check_plate_id(plate_id if plate_id is not None else safe_plate_id(name))
    raw = Path(raw)
    final = raw / plate_id
    if final.exists():
        raise PlateError(final, "a plate (or folder) of this id already exists; choose another --plate-id or remove it")
    tables = _source_tables(source, plate_map)
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        options = {"--plate-map": plate_map, "--timepoint-pattern": timepoint_pattern, "--include": include}
        images, manifest = _from_manifest(source, culture, concentration, replicate, frame_interval_h, options)
    else:
        images = source_images(source, timepoint_pattern, include, frame_interval_h)
        table = read_plate_map(plate_map) if plate_map else None
        manifest = plate_manifest(images, culture, concentration, replicate, table, str(plate_map))
    staging = raw / f".{plate_id}.adding-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        _fill(staging, images, link)
        for path in tables:
            shutil.copy2(path, staging / path.name)
        manifest.to_csv(staging / MANIFEST_NAME, index=False)
        try:
            validate_plate(staging, plate_id=plate_id)
            if tables:
                check_plate_tables(staging, read_manifest(staging))
        except InputError as exc:  # name the user's file, not the staging copy (gone when this is read)
            theirs = {str(staging / im.name): str(im.source) for im in images}
            folder = source if source.is_dir() else source.parent
            where = theirs.get(exc.where) or exc.where.replace(str(staging), str(folder), 1)
            raise type(exc)(where, exc.problem) from None
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _source_tables(source: Path, plate_map: str | Path | None) -> list[Path]:
    """The CellProfiler tables of an export folder, which the plate carries (never left behind:
    without them its cells would silently come from our segmentation instead)."""
    if not source.is_dir():
        return []
    skip = Path(plate_map).resolve() if plate_map else None
    return [p for p in table_files(source) if p.resolve() != skip]


def _fill(plate_dir: Path, images: list[SourceImage], link: bool) -> None:
    stacks: dict[Path, list[SourceImage]] = {}
    for im in images:
        if im.frame is not None:
            stacks.setdefault(im.source, []).append(im)
        else:
            (plate_dir / im.name).parent.mkdir(parents=True, exist_ok=True)  # a manifest may list sub/x.tif
            if link:
                (plate_dir / im.name).symlink_to(im.source.resolve())
            else:
                shutil.copy2(im.source, plate_dir / im.name)
    for path, frames in stacks.items():
        # Each frame keeps the stack's pixel size, as a standard TIFF resolution in pixels per centimetre.
        size = recorded_pixel_size(path)
        calibration = {"resolution": (1e4 / size.um,) * 2, "resolutionunit": "CENTIMETER"} if size else {}
        for im, pixels in zip(frames, read_frames(path), strict=False):
            tifffile.imwrite(plate_dir / im.name, pixels, photometric="minisblack", metadata=None, **calibration)


def _from_manifest(
    source: Path, culture: str | None, concentration: str, replicate: int, frame_interval_h: float | None, options: dict
) -> tuple[list[SourceImage], pd.DataFrame]:
    """The images and manifest of a plate made from a folder that has a manifest already (a plate
    whose folder name is not a safe id, say): its rows are kept as written, every column included,
    with a stack's frames each made an image at the row's time plus the frame interval.

    Raises PlateError naming the manifest when an option would replace what it says: a culture,
    concentration or replicate that differs from its values, or a plate map, time-point pattern
    or include pattern (which are for folders without a manifest).
    """
    path = source / MANIFEST_NAME
    given = [name for name, value in options.items() if value]
    if given:
        raise PlateError(
            path,
            f"{', '.join(given)} cannot apply: this folder's manifest already says what each image is "
            "(move the manifest out to build one from the file names and options)",
        )
    m = read_manifest(source)
    for name, value, column in (
        ("--culture", culture, "culture"),
        ("--concentration", None if concentration == "na" else concentration_label(concentration), "concentration"),
        ("--replicate", None if replicate == 1 else replicate, "replicate"),
    ):
        if value is not None and (m[column] != value).any():
            other = m[column][m[column] != value].iloc[0]
            raise PlateError(path, f"{name} {value!r} contradicts the manifest, which has {column} {other!r}")
    images, rows = [], []
    for row in m.to_dict("records"):
        image = SourceImage(source / row["image"], row["image"], row["timepoint_h"], row["well"], row["position"])
        for im in _expand_frames(image, frame_interval_h):
            if im.frame is not None:
                im = replace(im, name=str(PurePosixPath(row["image"]).with_name(im.name)))
            frame = "" if im.frame is None else im.frame
            rows.append(
                {
                    **row,
                    "image": im.name,
                    "timepoint_h": im.timepoint_h,
                    "source": row.get("source") or row["image"],
                    "frame": frame,
                }
            )
            images.append(im)
    manifest = pd.DataFrame(rows)
    if (manifest["frame"] == "").all():
        manifest = manifest.drop(columns="frame")
    return images, manifest
