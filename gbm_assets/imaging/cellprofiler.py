"""CellProfiler object tables: use a plate's own cell centres instead of our segmentation.

CellProfiler's ExportToSpreadsheet writes, into the plate folder here, some of:

- one table per object (``Cells.csv``, ``MyExpt_Nuclei.txt``...): ``ImageNumber``,
  ``ObjectNumber``, the centre (``Location_Center_X/Y`` or ``AreaShape_Center_X/Y``) and
  measurements (``AreaShape_Area``...);
- the Image table (``Image.csv``, ``<prefix>Image.csv``): one row per image set, mapping
  ``ImageNumber`` to ``FileName_<channel>`` (plus ``PathName_<channel>``, ``Count_<object>``,
  ``Height_/Width_<channel>``...);
- the "combined objects" table: every object's measurements in one table with two header rows,
  the object name (Image / Nuclei / Cells) over each block of columns, then the feature names;
- the Experiment table (``Key,Value``) and the object relationships table, which say nothing
  about where cells are and are ignored.

Files are comma-, tab- or semicolon-delimited, named ``.csv``, ``.txt`` or ``.tsv``, with or
without a file-name prefix; they are read by gbm_assets.tables.read_delimited.

Provenance is the point of this module: ``ImageNumber`` is CellProfiler's own numbering of its
image sets, unrelated to the order of our manifest, so it is mapped to a file only through a
``FileName_<channel>`` column (of the Image table, or of the object table itself). Files are
matched by name within the plate (``PathName_`` is ignored). CellProfiler's centres are 0-based
pixel positions (x = column, y = row) and are kept as floats.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from gbm_assets.errors import InputError, PlateError
from gbm_assets.imaging.io import image_size
from gbm_assets.tables import DELIMITERS, LINE_COLUMN, decode_text, parse_numbers, read_delimited

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
# Files of the plate format itself, never CellProfiler tables.
PLATE_FILES = ("manifest.csv", "ground_truth.csv")
TABLE_SUFFIXES = (".csv", ".txt", ".tsv")
# Tables saved as spreadsheet workbooks: never read, never silently ignored either.
WORKBOOK_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods")
# CellProfiler's other ways of saving measurements (ExportToDatabase's SQLite file; the HDF5 and
# MATLAB measurement files of its output settings): not read, and never silently ignored either,
# since the cells would then come from our segmentation while the user meant CellProfiler's.
DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".h5", ".hdf5", ".mat")
# Known by content, so that Windows' Thumbs.db (an OLE2 file) beside the images is no database.
DATABASE_MAGIC = (b"SQLite format 3\x00", b"\x89HDF\r\n\x1a\n", b"MATLAB")
# A column starting with one of these makes a table look like a CellProfiler export.
CP_PREFIXES = (
    "ImageNumber",
    "ObjectNumber",
    "Location_",
    "AreaShape_",
    "FileName_",
    "PathName_",
    "Metadata_",
    "Count_",
)
IMAGE_OBJECT, EXPERIMENT_OBJECT = "Image", "Experiment"
KINDS_UNDERSTOOD = (
    "CellProfiler ExportToSpreadsheet tables: per-object tables (ImageNumber, ObjectNumber, "
    "Location_Center_X/Y or AreaShape_Center_X/Y), the Image table (ImageNumber, FileName_<channel>), "
    "the combined objects table (two header rows: object names, then features), the Experiment table "
    "(Key, Value) and the object relationships table"
)


@dataclass(frozen=True)
class PlateObjects:
    """The cells of a plate as CellProfiler found them.

    table: columns image (a manifest image name), x, y (0-based pixels, floats) and any AreaShape
    measurements renamed as in AREASHAPE_COLUMNS (NaN where CellProfiler gave none), one row per
    object in the order of the file.
    """

    path: Path
    objects_name: str
    table: pd.DataFrame


@dataclass
class _ObjectSource:
    """One object's rows: a per-object table, or one block of the combined table."""

    path: Path
    name: str
    df: pd.DataFrame  # read_delimited output; feature columns named as CellProfiler names them
    combined: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} ({self.path.name}{', combined table' if self.combined else ''})"


def read_plate_objects(
    plate_dir: str | Path, manifest: pd.DataFrame, objects_name: str | None = None
) -> PlateObjects | None:
    """The CellProfiler objects of a plate, or None when its folder holds no table but its own.

    Every ``*.csv``, ``*.txt`` and ``*.tsv`` at the top of the plate folder, other than
    manifest.csv and ground_truth.csv (and hidden files), must be one of the tables
    ExportToSpreadsheet writes (see the module docstring), in any of its layouts: comma, tab or
    semicolon delimited, any file-name prefix, per-object tables beside the Image table, or the
    combined table with two header rows. ``objects_name`` (e.g. "Cells") chooses among several
    objects; with a single object it must match it when given.

    The object rows are mapped to manifest images by a ``FileName_<channel>`` column, of the
    object table or of the Image table through ``ImageNumber`` (when several FileName_ columns
    exist, the one naming only manifest images). Without either, only a plate of one image whose
    objects all have ImageNumber 1 is unambiguous.

    Raises PlateError naming the file (and, for a value, its line and column) for: a table that is
    not understood, or looks like CellProfiler's but lacks what is needed (centre columns, an image
    key, FileName_ in the Image table); several object tables and no (or no matching)
    ``objects_name``; several Image tables; ImageNumber not in the Image table, or objects keyed
    by ImageNumber with no Image table; an Image table naming files that are not in the manifest,
    or two image sets naming one file; a centre that is empty, not a number, NaN or infinite
    (CellProfiler writes NaN for an object without pixels: still an error), or outside its image
    (0 <= x < width, 0 <= y < height); Image table Height_/Width_ disagreeing with the file.
    AreaShape measurements may be empty, NaN or infinite (they become NaN).
    """
    plate_dir = Path(plate_dir)
    found = _plate_sources(plate_dir)
    if found is None:
        return None
    sources, image_table = found
    source = _choose(plate_dir, sources, objects_name)
    table = _objects_table(plate_dir, source, image_table, manifest)
    return PlateObjects(path=source.path, objects_name=source.name, table=table)


def check_plate_tables(plate_dir: str | Path, manifest: pd.DataFrame) -> list[str]:
    """Check every CellProfiler object table of a plate folder against its manifest, as
    read_plate_objects would use it; return the object names found ([] without tables).

    For `gbm-assets add-plate`, which carries the tables of an export folder into the plate: a
    table that cannot be used is found then, not when cell finding runs. Several object tables
    pass (the cell_coordinates config chooses one later) when each of them can be used.

    Raises PlateError as read_plate_objects does.
    """
    plate_dir = Path(plate_dir)
    found = _plate_sources(plate_dir)
    if found is None:
        return []
    sources, image_table = found
    for source in sources:
        _objects_table(plate_dir, source, image_table, manifest)
    return [source.name for source in sources]


def _plate_sources(plate_dir: Path) -> tuple[list[_ObjectSource], tuple[Path, pd.DataFrame] | None] | None:
    """The object sources of a plate folder, named, and its Image table; None without tables."""
    plate_dir = Path(plate_dir)
    if not plate_dir.is_dir():
        raise PlateError(plate_dir, "plate folder not found")
    sources: list[_ObjectSource] = []
    image_tables: list[tuple[Path, pd.DataFrame]] = []
    for path in _table_files(plate_dir):
        kind, df = _classify(path)
        if kind == "object":
            sources.append(_ObjectSource(path, "", df))
        elif kind == "image":
            image_tables.append((path, df))
        elif kind == "combined":
            sources.extend(_combined_sources(path, df))
        # "ignored": Experiment and relationships tables.
    if not sources and not image_tables:
        tables = [p.name for p in _table_files(plate_dir)]
        if not tables:
            return None
        raise PlateError(
            plate_dir,
            f"CellProfiler tables {tables} but no object table (Cells.csv, Nuclei.csv...) "
            "with the cells' centres; export the objects with ExportToSpreadsheet too",
        )
    if len(image_tables) > 1:
        raise PlateError(
            plate_dir,
            f"several CellProfiler Image tables: {[p.name for p, _ in image_tables]}; "
            "keep the one exported with the object table",
        )
    image_table = image_tables[0] if image_tables else None
    if not sources:
        raise PlateError(
            image_table[0],
            "a CellProfiler Image table but no object table (Cells.csv, Nuclei.csv...) "
            "with the cells' centres; export the objects with ExportToSpreadsheet too",
        )
    _name_sources(sources, image_table)
    return sources, image_table


def _check_coverage(
    image_table: tuple[Path, pd.DataFrame],
    set_images: pd.Series,
    manifest: pd.DataFrame,
    objects_name: str,
    object_images: pd.Series,
) -> None:
    """Every manifest image is an image set of the Image table, and each set's Count_<objects>
    equals its rows in the object table: otherwise images would get no cells without a word
    (CellProfiler did not process them, or the object table was cut short).

    set_images: the Image table's rows as manifest images; object_images: the object rows' images.
    """
    path, df = image_table
    missing = [i for i in manifest["image"] if i not in set(set_images)]
    if missing:
        raise PlateError(
            path,
            f"{len(missing)} manifest image(s) are not image sets of this table "
            f"({missing[:3]}): CellProfiler did not process them, so their cells are unknown; "
            "export all images or remove them from the manifest",
        )
    count_col = next((c for c in df.columns if c.lower() == f"count_{objects_name}".lower()), None)
    if count_col is None:
        return
    found = object_images.value_counts()
    for image, text, line in zip(set_images, df[count_col], df[LINE_COLUMN], strict=False):
        try:
            expected = int(float(text))
        except ValueError:
            continue  # a cross-check only
        if int(found.get(image, 0)) != expected:
            raise PlateError(
                path,
                f"line {line}, column {count_col!r}: {expected} objects for {image!r}, but the "
                f"object table has {int(found.get(image, 0))} (a truncated or mismatched export)",
            )


# ---------------------------------------------------------------- finding and classifying tables


def table_files(plate_dir: str | Path) -> list[Path]:
    """The files of a folder that read_plate_objects reads as tables (text tables, workbooks and
    database or measurement files, which it refuses), other than the plate's own manifest.csv and ground_truth.csv and hidden files), sorted."""
    return _table_files(Path(plate_dir))


def _table_files(plate_dir: Path) -> list[Path]:
    # Hidden files are skipped: macOS writes "._Cells.csv" (binary resource forks) beside every
    # file copied to a foreign disk, and editors keep dot-named lock and swap files.
    return sorted(
        p
        for p in plate_dir.iterdir()
        if p.is_file()
        and (p.suffix.lower() in (*TABLE_SUFFIXES, *WORKBOOK_SUFFIXES) or is_database_file(p))
        and p.name.lower() not in PLATE_FILES
        and not p.name.startswith(".")
    )


def is_database_file(path: Path) -> bool:
    """Whether a file is a database or measurements file (SQLite, HDF5, MATLAB) by its suffix
    (DATABASE_SUFFIXES) and its first bytes (DATABASE_MAGIC); an unreadable one counts, so that
    the table check names it instead of skipping it."""
    if path.suffix.lower() not in DATABASE_SUFFIXES:
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError:
        return True  # unreadable: let _classify name it rather than skip it
    return head.startswith(DATABASE_MAGIC)


def _looks_like_cellprofiler(columns) -> bool:
    return any(str(c).startswith(CP_PREFIXES) for c in columns)


def _has_centre(columns) -> bool:
    return any(x in columns and y in columns for x, y in CENTRE_COLUMNS)


def _read(path: Path, header_rows: int = 1) -> pd.DataFrame:
    try:
        return read_delimited(path, header_rows=header_rows, what="CellProfiler table")
    except InputError as exc:
        raise PlateError(exc.where, exc.problem) from None


def _first_fields(path: Path) -> list[str]:
    """The first non-empty line of a text file split on its first delimiter ([] if unreadable)."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
        text = decode_text(path, head[: len(head) & ~1])  # whole UTF-16 code units
    except (OSError, ValueError):
        return []
    line = next((s for s in text.splitlines() if s.strip()), "")
    delimiter = next((d for d in DELIMITERS if d in line), ",")
    return [f.strip().strip('"') for f in line.split(delimiter)]


def _classify(path: Path) -> tuple[str, pd.DataFrame | None]:
    """("object" | "image" | "combined" | "ignored", table) for one file; PlateError otherwise."""
    if path.suffix.lower() in WORKBOOK_SUFFIXES:
        raise PlateError(
            path,
            "a spreadsheet workbook in the plate folder is not read; save the table as CSV "
            "(comma or tab delimited), as CellProfiler's ExportToSpreadsheet writes it, or move it out",
        )
    if path.suffix.lower() in DATABASE_SUFFIXES:
        raise PlateError(
            path,
            "a CellProfiler database or measurements file (ExportToDatabase's SQLite, an .h5 or .mat "
            "output) in the plate folder is not read; export the objects and the Image table with "
            "ExportToSpreadsheet (CSV), or move the file out",
        )
    first = _first_fields(path)
    # The Experiment table holds the whole pipeline as one quoted value: recognised by its
    # header alone, never parsed.
    if [f.lower() for f in first] == ["key", "value"]:
        return "ignored", None
    if "Relationship" in first and "First Object Name" in first:
        return "ignored", None  # object relationships (parent/child links), not positions
    df = _read(path)
    columns = [c for c in df.columns if c != LINE_COLUMN]
    if _looks_like_cellprofiler(columns):
        is_object = "ObjectNumber" in columns or any(c.startswith(("Location_", "AreaShape_")) for c in columns)
        if path.stem.lower().endswith("image") and "ObjectNumber" not in columns:
            is_object = False
        if is_object:
            return "object", df
        if "ImageNumber" in columns or path.stem.lower().endswith("image"):
            return "image", df
        raise PlateError(
            path,
            "looks like a CellProfiler table but has neither ObjectNumber and centre columns "
            "(an object table) nor ImageNumber (the Image table); re-export it with ExportToSpreadsheet",
        )
    if len(df) >= 1:
        df2 = _read(path, header_rows=2)
        features = [c.split("|", 1)[1] for c in df2.columns if "|" in c]
        if _looks_like_cellprofiler(features) and all("|" in c for c in df2.columns if c != LINE_COLUMN):
            return "combined", df2
    # A table we do not understand is an error, not something to skip: which tables a plate
    # holds decides where its cells come from, so a file meant as a CellProfiler export but not
    # recognised must never leave cells silently to our segmentation (nor a stray file pass).
    raise PlateError(
        path,
        f"not a table gbm-assets understands. Besides manifest.csv and ground_truth.csv a "
        f"plate folder may hold only {KINDS_UNDERSTOOD}; move other files out of the plate folder",
    )


def _combined_sources(path: Path, df: pd.DataFrame) -> list[_ObjectSource]:
    """One source per object block of a combined table, columns renamed to the bare feature names."""
    blocks: dict[str, list[str]] = {}
    for col in df.columns:
        if col != LINE_COLUMN:
            obj, _ = col.split("|", 1)
            blocks.setdefault(obj, []).append(col)
    image_cols = blocks.get(IMAGE_OBJECT, [])
    key_cols = [c for cols in blocks.values() for c in cols if c.split("|", 1)[1] in ("ImageNumber", "ObjectNumber")]
    names = [o for o in blocks if o not in (IMAGE_OBJECT, EXPERIMENT_OBJECT)]
    several = len(names) > 1
    out = []
    for obj in names:
        cols = list(dict.fromkeys([*image_cols, *key_cols, *blocks[obj]]))
        sub = df[[*cols, LINE_COLUMN]].copy()
        sub.columns = [*(c.split("|", 1)[1] for c in cols), LINE_COLUMN]
        sub = sub.loc[:, ~sub.columns.duplicated()]
        if several:
            sub = _drop_padding(sub, [c.split("|", 1)[1] for c in blocks[obj] if not c.endswith("|ObjectNumber")])
        sub.attrs = dict(df.attrs)
        out.append(_ObjectSource(path, obj, sub, combined=True))
    if not out:
        raise PlateError(path, "combined CellProfiler table without any object block (only Image columns)")
    return out


def _drop_padding(df: pd.DataFrame, own: list[str]) -> pd.DataFrame:
    """The rows of one object of a combined table of several objects, without the padding.

    CellProfiler writes max(count over objects) rows per image and fills the columns of an
    object with fewer objects with NaN: such rows are the trailing rows of an image in which
    every column of this object is empty or NaN. Other NaN centres stay (and fail later).
    """
    if not own or "ImageNumber" not in df.columns:
        return df
    blank = df[own].apply(lambda s: s.str.strip().str.lower().isin(("", "nan"))).all(axis=1)
    # trailing: blank here and in every later row of the same image
    trailing = blank[::-1].astype(int).groupby(df["ImageNumber"][::-1]).cummin()[::-1].astype(bool)
    return df[~trailing]


# ---------------------------------------------------------------- object names


def _name_sources(sources: list[_ObjectSource], image_table: tuple[Path, pd.DataFrame] | None) -> None:
    """Name each per-object table's object from its file name (prefix, e.g. "MyExpt_", removed)."""
    counted = []
    prefix = ""
    if image_table is not None:
        path, df = image_table
        counted = sorted((c[len("Count_") :] for c in df.columns if c.startswith("Count_")), key=len, reverse=True)
        if path.stem.lower().endswith("image"):
            prefix = path.stem[: -len("image")]
    for s in sources:
        if s.combined:
            continue
        stem = s.path.stem
        match = next((n for n in counted if n and stem.endswith(n)), None)
        if match:
            s.name = match
        elif prefix and stem.startswith(prefix) and len(stem) > len(prefix):
            s.name = stem[len(prefix) :]
        else:
            s.name = stem.rsplit("_", 1)[-1] or stem


def _choose(plate_dir: Path, sources: list[_ObjectSource], objects_name: str | None) -> _ObjectSource:
    if objects_name is None:
        if len(sources) == 1:
            return sources[0]
        labels = ", ".join(s.label for s in sources)
        raise PlateError(
            plate_dir,
            f"several CellProfiler object tables: {labels}; set cellprofiler_objects in the "
            f"cell_coordinates config to the object to use (e.g. {sources[0].name!r})",
        )
    want = objects_name.strip().casefold()
    exact = [s for s in sources if s.name.casefold() == want]
    by_file = [
        s
        for s in sources
        if not s.combined and (s.path.stem.casefold() == want or s.path.stem.casefold().endswith("_" + want))
    ]
    found = exact or by_file
    if len(found) == 1:
        return found[0]
    labels = ", ".join(s.label for s in (found or sources))
    if not found:
        raise PlateError(
            plate_dir, f"cellprofiler_objects is {objects_name!r} but the plate's CellProfiler tables hold {labels}"
        )
    raise PlateError(
        plate_dir,
        f"cellprofiler_objects {objects_name!r} matches several tables: {labels}; keep one of them in the plate folder",
    )


# ---------------------------------------------------------------- mapping to images


def _name_lookup(manifest: pd.DataFrame) -> dict[str, str]:
    """File name (as CellProfiler writes it) -> manifest image: the exact name, or a base name
    that only one manifest image has."""
    images = [str(i) for i in manifest["image"]]
    lookup: dict[str, str] = {}
    bases: dict[str, list[str]] = {}
    for image in images:
        bases.setdefault(PurePosixPath(image).name, []).append(image)
    for base, owners in bases.items():
        if len(owners) == 1:
            lookup[_norm_name(base)] = owners[0]
    lookup.update({_norm_name(i): i for i in images})
    return lookup


def _norm_name(value: str) -> str:
    """A file name as CellProfiler wrote it, in the form the lookup uses: '/' separators, NFC."""
    return unicodedata.normalize("NFC", value.strip().replace("\\", "/"))


def _file_column(path: Path, df: pd.DataFrame, lookup: dict[str, str], what: str) -> tuple[str, pd.Series]:
    """The FileName_ column whose every value is a manifest image, mapped to manifest names."""
    cols = [c for c in df.columns if c.startswith("FileName_")]
    fitting = []
    first_miss = {}
    for col in cols:
        # A full path (CellProfiler run elsewhere, e.g. C:\\data\\t07.tif) matches by its base name.
        names = df[col].map(_norm_name).map(lambda n: n if n in lookup else PurePosixPath(n).name)
        missing = ~names.isin(lookup.keys())
        if missing.any():
            i = int(np.argmax(missing.to_numpy()))
            first_miss[col] = (int(df[LINE_COLUMN].iloc[i]), df[col].iloc[i])
        else:
            fitting.append((col, names.map(lookup)))
    # Columns with the same values (the same file loaded twice) are one choice.
    distinct = {tuple(s): (c, s) for c, s in fitting}
    if len(distinct) == 1:
        return next(iter(distinct.values()))
    if not fitting:
        misses = "; ".join(f"{c}: {v!r} (line {line})" for c, (line, v) in first_miss.items())
        raise PlateError(
            path,
            f"{what} names files that are not in the plate's manifest ({misses}); files are "
            "matched by name within the plate folder (PathName_ is ignored)",
        )
    raise PlateError(
        path,
        f"{what} has several FileName_ columns naming manifest images "
        f"({[c for c, _ in fitting]}): which channel's files the objects belong to is ambiguous",
    )


def _image_numbers(path: Path, df: pd.DataFrame) -> pd.Series:
    try:
        return parse_numbers(df, "ImageNumber", kind=int)
    except InputError as exc:
        raise PlateError(exc.where, exc.problem) from None


def _image_map(
    manifest: pd.DataFrame, image_table: tuple[Path, pd.DataFrame]
) -> tuple[dict[int, str], dict[str, tuple], pd.Series]:
    """ImageNumber -> manifest image, image -> (height, width, line) where the table says, and the
    table's rows as manifest images."""
    path, df = image_table
    if "ImageNumber" not in df.columns:
        raise PlateError(path, "CellProfiler Image table without an ImageNumber column")
    if not any(c.startswith("FileName_") for c in df.columns):
        raise PlateError(
            path,
            "CellProfiler Image table without a FileName_<channel> column: ImageNumber cannot be "
            "matched to the plate's images (export FileName_ with the Image measurements)",
        )
    numbers = _image_numbers(path, df)
    dup = numbers[numbers.duplicated()]
    if not dup.empty:
        line = int(df.loc[dup.index[0], LINE_COLUMN])
        raise PlateError(path, f"line {line}: ImageNumber {int(dup.iloc[0])} appears twice")
    col, images = _file_column(path, df, _name_lookup(manifest), "the Image table")
    twice = images[images.duplicated(keep=False)]
    if not twice.empty:
        lines = df.loc[twice.index, LINE_COLUMN].tolist()
        raise PlateError(
            path,
            f"lines {lines}: several image sets name {twice.iloc[0]!r} in {col} (files are matched "
            "by name within the plate; PathName_ is ignored), so their objects cannot be told apart",
        )
    mapping = dict(zip(numbers.tolist(), images.tolist(), strict=False))
    sizes: dict[str, tuple[int, int, int]] = {}
    channel = col[len("FileName_") :]
    hcol, wcol = f"Height_{channel}", f"Width_{channel}"
    if hcol in df.columns and wcol in df.columns:
        for image, h, w, line in zip(images, df[hcol], df[wcol], df[LINE_COLUMN], strict=False):
            try:
                sizes[image] = (int(float(h)), int(float(w)), int(line))
            except ValueError:
                continue  # a cross-check only; the file's own header decides
    return mapping, sizes, images


def _objects_images(plate_dir: Path, source: _ObjectSource, image_table, manifest: pd.DataFrame):
    """Each object row's manifest image, the Image table's sizes to cross-check, and the Image
    table's rows as manifest images (None without an Image table)."""
    df, path = source.df, source.path
    lookup = _name_lookup(manifest)
    has_files = any(c.startswith("FileName_") for c in df.columns)
    if "ImageNumber" not in df.columns and not has_files:
        raise PlateError(
            path,
            f"object table for {source.name} has neither ImageNumber nor a FileName_<channel> "
            "column: its objects cannot be matched to images",
        )
    mapping, sizes, set_images = _image_map(manifest, image_table) if image_table is not None else ({}, {}, None)

    numbers = _image_numbers(path, df) if "ImageNumber" in df.columns else None
    if has_files:
        _, images = _file_column(path, df, lookup, f"the object table for {source.name}")
        if numbers is not None:
            # One image set, one file: a contradiction here is a provenance mix-up.
            pairs = pd.DataFrame({"n": numbers, "image": images, "line": df[LINE_COLUMN]})
            for n, g in pairs.groupby("n", sort=False):
                if g["image"].nunique() > 1:
                    raise PlateError(
                        path,
                        f"line {int(g['line'].iloc[-1])}: ImageNumber {n} names several files "
                        f"{sorted(g['image'].unique())[:3]}",
                    )
                if mapping and n not in mapping:
                    raise PlateError(
                        path,
                        f"line {int(g['line'].iloc[0])}, column 'ImageNumber': {n} is not in "
                        f"the Image table {image_table[0].name}",
                    )
                if mapping and mapping[n] != g["image"].iloc[0]:
                    raise PlateError(
                        path,
                        f"line {int(g['line'].iloc[0])}: ImageNumber {n} is "
                        f"{g['image'].iloc[0]!r} here but {mapping[n]!r} in {image_table[0].name}",
                    )
        return images, sizes, set_images
    if image_table is not None:
        unknown = ~numbers.isin(mapping.keys())
        if unknown.any():
            i = int(np.argmax(unknown.to_numpy()))
            raise PlateError(
                path,
                f"line {int(df[LINE_COLUMN].iloc[i])}, column 'ImageNumber': {int(numbers.iloc[i])} "
                f"is not in the Image table {image_table[0].name}",
            )
        return numbers.map(mapping), sizes, set_images
    images = manifest["image"].tolist()
    if len(images) == 1 and (numbers == 1).all():
        return pd.Series(images[0], index=df.index), sizes, None
    raise PlateError(
        path,
        "objects are keyed by ImageNumber but the plate folder has no CellProfiler Image table "
        "(Image.csv or <prefix>Image.csv, with FileName_<channel>) to say which file each ImageNumber is; "
        "CellProfiler's numbering need not follow the manifest, so export the Image table beside it",
    )


# ---------------------------------------------------------------- the table


def _numbers(df: pd.DataFrame, column: str, finite: bool) -> pd.Series:
    try:
        return parse_numbers(df, column, kind=float, finite=finite)
    except InputError as exc:
        hint = ""
        if finite and re.search(r"'(nan|)'", exc.problem, flags=re.IGNORECASE):
            hint = " (CellProfiler writes an empty or NaN centre for an object without pixels; remove the object)"
        raise PlateError(exc.where, exc.problem + hint) from None


def _objects_table(plate_dir: Path, source: _ObjectSource, image_table, manifest: pd.DataFrame) -> pd.DataFrame:
    df, path = source.df, source.path
    centre = next(((x, y) for x, y in CENTRE_COLUMNS if x in df.columns and y in df.columns), None)
    if centre is None:
        raise PlateError(
            path, f"object table for {source.name} has no centre columns (Location_Center_X/Y or AreaShape_Center_X/Y)"
        )
    images, sizes, set_images = _objects_images(plate_dir, source, image_table, manifest)
    xcol, ycol = centre
    out = pd.DataFrame(
        {"image": images.to_numpy(), "x": _numbers(df, xcol, True).to_numpy(), "y": _numbers(df, ycol, True).to_numpy()}
    )
    for cp_name, name in AREASHAPE_COLUMNS.items():
        if cp_name in df.columns:
            text = df[[cp_name, LINE_COLUMN]].copy()
            text.attrs = dict(df.attrs)
            text[cp_name] = text[cp_name].where(text[cp_name].str.strip() != "", "nan")
            values = _numbers(text, cp_name, False).to_numpy()
            out[name] = np.where(np.isfinite(values), values, np.nan)
    _check_inside(plate_dir, path, out, df[LINE_COLUMN].to_numpy(), xcol, ycol, sizes, image_table)
    if image_table is not None:
        _check_coverage(image_table, set_images, manifest, source.name, out["image"])
    return out.reset_index(drop=True)


def _check_inside(plate_dir, path, out, lines, xcol, ycol, sizes, image_table) -> None:
    """Every centre inside its image; the Image table's Height_/Width_ (if any) equal to the file's."""
    shape = {}
    for image in out["image"].unique():
        h, w, _ = image_size(plate_dir / image)
        shape[image] = (h, w)
        if image in sizes and sizes[image][:2] != (h, w):
            th, tw, line = sizes[image]
            raise PlateError(
                image_table[0],
                f"line {line}: {image!r} is {tw}x{th} (width x height) here but the file "
                f"is {w}x{h}: is this the Image table of these files?",
            )
    height = out["image"].map(lambda i: shape[i][0]).to_numpy(float)
    width = out["image"].map(lambda i: shape[i][1]).to_numpy(float)
    for col, values, limit, what in (
        (xcol, out["x"].to_numpy(), width, "width"),
        (ycol, out["y"].to_numpy(), height, "height"),
    ):
        bad = (values < 0) | (values >= limit)
        if bad.any():
            i = int(np.argmax(bad))
            raise PlateError(
                path,
                f"line {int(lines[i])}, column {col!r}: {values[i]:g} is outside image "
                f"{out['image'].iloc[i]!r} (0 <= value < {what} {int(limit[i])}; CellProfiler's "
                "centres are 0-based pixels)",
            )
