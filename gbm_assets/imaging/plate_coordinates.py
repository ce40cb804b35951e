"""A plate's cell candidates as cell_coordinates stores them, and the tables made from them.

plate_coordinates runs cell finding over a plate (its cell size estimated first, see
cell_size) and gathers the candidates, their qc labels and each image's quality measures into
one table plus a label-mask table; the other functions summarise those tables for Dagster
metadata, the command line and the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gbm_assets.imaging import magnification
from gbm_assets.imaging.cell_quality import QC_LABELS, kept_candidates
from gbm_assets.imaging.cell_size import CellSizeEstimate
from gbm_assets.imaging.plate_cells import CropRequest, ImageCells, Progress, find_plate_cells, find_plate_cells_sized
from gbm_assets.imaging.segmentation import SegmentationParams

MASK_COLUMNS = ("image", "height", "width", "n_cells", "labels_zstd")
# Masks written before the label codec changed hold 16-bit PNG bytes in this column instead.
LEGACY_LABELS_COLUMN = "labels_png"


@dataclass
class PlateCoordinates:
    """A plate's cell candidates and label masks, as cell_coordinates stores them.

    coordinates: one row per candidate: plate, image, cell_id, x, y, measurements, the qc label
    and measures (cell_quality.QUALITY_COLUMNS), CellProfiler's neighbour measurements among the
    image's cells (neighbors.neighbor_columns(), float64, NaN on candidates
    that are not cells), the image's ImageQuality_* measures and
    cell_diameter_px (the plate's typical cell diameter, px). masks: one row per image
    (MASK_COLUMNS plus the ImageQuality_* measures; labels_zstd is plate_cells.encode_labels'
    bytes of the image's label mask, height x width). size: the plate's size estimate, None when
    the diameter was given. params: the settings cells were found with.
    """

    coordinates: pd.DataFrame
    masks: pa.Table
    size: CellSizeEstimate | None
    params: SegmentationParams


def plate_coordinates(
    plate_id: str,
    plate_dir: str | Path,
    images: Iterable[str],
    params: SegmentationParams = SegmentationParams(),
    estimate_size: bool = True,
    objects: pd.DataFrame | None = None,
    workers: int = 1,
    progress: Progress = None,
    crop: CropRequest | None = None,
    on_crops: Callable[[ImageCells], None] | None = None,
) -> PlateCoordinates:
    """Find (or place at CellProfiler's `objects`) every cell candidate of a plate.

    With estimate_size (and no objects) the plate's cell diameter is estimated first and cells
    are found at the scale it calls for (plate_cells.find_plate_cells_sized: the first pass's
    images are not redone when that is the scale they were found at); else at
    params.cell_diameter_px. Each image is read once, on `workers` processes; the result does
    not depend on their number. With `crop`, each image is also cropped in the same pass and
    on_crops(found) is called, in image order, for each image with crops (found.crops: cells,
    pixels, masks as plate_cells.crop_plate makes them). Each image's cells get CellProfiler's
    neighbour measurements (neighbors.with_neighbors, in the worker that found them, from its
    label mask), in found.cells and in found.crops' cells. Raises the image reader's errors,
    naming the file, and whatever on_crops raises.
    """
    images = list(images)
    size = None
    if estimate_size and objects is None:
        size, params, found_cells = find_plate_cells_sized(
            plate_dir, images, params, workers=workers, progress=progress, crop=crop
        )
    else:
        found_cells = find_plate_cells(
            plate_dir, images, params, objects, workers=workers, progress=progress, crop=crop
        )
    diameter = size.diameter_px if size is not None and size.diameter_px else params.cell_diameter_px
    frames, names, measures, mask_rows = [], [], [], []
    for found in found_cells:
        if found.crops is not None:
            cells, pixels, masks = found.crops
            found.crops = (cells.assign(cell_diameter_px=float(diameter)), pixels, masks)
        if found.crops is not None and on_crops is not None:
            on_crops(found)
        frames.append(found.cells)
        names.append(found.image)
        measures.append(found.measures)
        mask_rows.append(
            {
                "image": found.image,
                "height": found.height,
                "width": found.width,
                "n_cells": int((found.cells["qc"] == "cell").sum()),
                "labels_zstd": found.labels,
                **found.measures,
            }
        )
    coords = _with_image_columns(plate_id, frames, names, measures, float(diameter))
    coords["cell_id"] = coords["cell_id"].astype(np.int32)
    return PlateCoordinates(coords, pa.Table.from_pylist(mask_rows), size, params)


def _with_image_columns(
    plate_id: str, frames: list[pd.DataFrame], names: list[str], measures: list[dict], diameter: float
) -> pd.DataFrame:
    """The images' candidate tables as one, with plate and image first and each image's
    measures and the cell diameter last (one value per image, repeated over its rows).

    The columns are added once to the plate's table, not per image: pandas inserts a column
    into a frame at a cost that does not shrink with its rows, and an image's table is small. A
    measure some image lacks is NaN on its rows.
    """
    coords = pd.concat(frames, ignore_index=True)
    lengths = [len(f) for f in frames]
    per_image = pd.DataFrame.from_records(measures, index=range(len(frames)))
    extra = {key: np.repeat(per_image[key].to_numpy(), lengths) for key in per_image.columns}
    coords = coords.assign(**extra, cell_diameter_px=diameter)
    image = [name for name, n in zip(names, lengths, strict=True) for _ in range(n)]
    coords.insert(0, "image", pd.array(image, dtype="str"))
    coords.insert(0, "plate", plate_id)
    return coords


# Sampled images' fine scales further apart than this ratio: two set-ups in one plate? Within one
# set-up they span at most 1.2x (24 Usiigaci fields), 1.06x (6 T98G frames), 1.32x (3 probes of each
# of 15 hard synthetic plates); T98G frames at 1x and 2x in one plate: 2.0x.
MIXED_FINE_SCALES = 1.5


def magnification_summary(size: CellSizeEstimate | None) -> dict:
    """How a plate's magnification was found, for Dagster metadata (JSON-ready).

    Returns relative (the plate's magnification, None when not measured), fine_scale_px (each
    sampled image's magnification.fine_scale, px, None where it gave none), used (what cell
    finding did about it) and warning: "" unless the sampled images' fine scales lie more than
    MIXED_FINE_SCALES apart (two set-ups, or out-of-focus fields, in one plate: their median is
    used for every image), naming the images. size None: the diameter was given, nothing measured.
    """
    if size is None:
        return {
            "relative": None,
            "fine_scale_px": {},
            "used": "not measured (cell_diameter_px given, or CellProfiler objects used)",
            "warning": "",
        }
    scales = {name: round(float(px), 2) if np.isfinite(px) else None for name, px in size.fine_scales}
    if size.magnification is None:
        used = (
            f"not measured: no sampled image gave a fine scale (images under {magnification.MIN_SIDE_PX} px on a "
            "side, blank, saturated or without textured cells); the reference set-up is assumed"
        )
    elif not magnification.rescales(size.magnification):
        used = f"{size.magnification}x the reference set-up: inside {magnification.MAGNIFICATION_BAND}, default scale"
    else:
        used = f"{size.magnification}x the reference set-up: the default scale is multiplied by it"
    measured = {name: px for name, px in scales.items() if px is not None}
    warning = ""
    if measured and max(measured.values()) > MIXED_FINE_SCALES * min(measured.values()):
        low, high = min(measured, key=measured.get), max(measured, key=measured.get)
        warning = (
            f"sampled images disagree on the magnification: fine scale {measured[low]} px in {low!r}, "
            f"{measured[high]} px in {high!r} (more than {MIXED_FINE_SCALES}x apart): two set-ups (objective, "
            "binning) or out-of-focus fields in one plate? Their median is used for every image"
        )
    return {"relative": size.magnification, "fine_scale_px": scales, "used": used, "warning": warning}


def qc_counts_per_image(coordinates: pd.DataFrame, images: Iterable[str]) -> pd.DataFrame:
    """Candidates per image and qc label: index images (in the given order), one int column
    per label of cell_quality.QC_LABELS (0 where none)."""
    qc = coordinates["qc"] if "qc" in coordinates else pd.Series("cell", index=coordinates.index)
    table = pd.crosstab(coordinates["image"], qc) if len(coordinates) else pd.DataFrame()
    return table.reindex(index=list(images), columns=list(QC_LABELS), fill_value=0).fillna(0).astype(int)


def coordinates_summary(plate: PlateCoordinates) -> dict[str, float | int | dict]:
    """Plate-level figures of a plate's coordinates: counts per qc label, cells per image, the
    median cell area (px) and the image quality measures (mean usable fraction, its minimum,
    the median focus score, fragments merged)."""
    coordinates = plate.coordinates
    per_image = plate.masks.drop_columns(
        [c for c in ("labels_zstd", LEGACY_LABELS_COLUMN) if c in plate.masks.column_names]
    )
    per_image = per_image.to_pandas()
    images = per_image["image"].tolist()
    counts = qc_counts_per_image(coordinates, images)
    cells = kept_candidates(coordinates)
    out: dict[str, float | int | dict] = {
        "n_cells": int(counts["cell"].sum()),
        "n_candidates": len(coordinates),
        "qc_counts": {label: int(counts[label].sum()) for label in QC_LABELS},
        "cells_per_image_mean": float(counts["cell"].mean()) if images else 0.0,
        "images_without_cells": int((counts["cell"] == 0).sum()),
        "median_area_px": float(cells["area"].median()) if len(cells) else 0.0,
    }
    for column, name, how in (
        ("ImageQuality_UsableFraction", "usable_fraction_mean", "mean"),
        ("ImageQuality_UsableFraction", "usable_fraction_min", "min"),
        ("ImageQuality_FocusScore", "focus_score_median", "median"),
        ("ImageQuality_FragmentsMerged", "fragments_merged", "sum"),
    ):
        if column in per_image:
            out[name] = float(getattr(per_image[column], how)())
    return out


QUALITY_TABLE_MEASURES = ("ImageQuality_UsableFraction", "ImageQuality_FocusScore", "ImageQuality_FragmentsMerged")


def cell_finding_quality(coordinates_dir: str | Path, masks_dir: str | Path) -> pd.DataFrame:
    """One row per image of every plate cell_coordinates has written: plate, image, the count of
    candidates per qc label (QC_LABELS columns), the image's quality measures
    (QUALITY_TABLE_MEASURES, NaN for plates written before they existed) and the plate's
    cell_diameter_px. Reads one plate at a time, and only the columns it needs.
    """
    frames = []
    for masks_file in sorted(Path(masks_dir).glob("plate=*/part-0.parquet")):
        plate_id = masks_file.parent.name.removeprefix("plate=")
        names = pq.ParquetFile(masks_file).schema_arrow.names
        images = pq.read_table(
            masks_file, columns=[c for c in ("image", *QUALITY_TABLE_MEASURES) if c in names]
        ).to_pandas()
        coords_file = Path(coordinates_dir) / masks_file.parent.name / "part-0.parquet"
        wanted = [c for c in ("image", "qc", "cell_diameter_px") if c in pq.ParquetFile(coords_file).schema_arrow.names]
        coords = pq.read_table(coords_file, columns=wanted).to_pandas()
        counts = qc_counts_per_image(coords, images["image"])
        table = images.set_index("image").reindex(columns=list(QUALITY_TABLE_MEASURES)).join(counts)
        diameter = coords["cell_diameter_px"].iloc[0] if "cell_diameter_px" in coords and len(coords) else np.nan
        frames.append(table.reset_index().assign(plate=plate_id, cell_diameter_px=diameter))
    columns = ["plate", "image", *QC_LABELS, *QUALITY_TABLE_MEASURES, "cell_diameter_px"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
