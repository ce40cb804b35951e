"""cell_coordinates and cell_crops: per-plate cell finding and single-cell crops (wiring only)."""


from dataclasses import asdict, fields

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.cellprofiler import read_plate_objects
from gbm_assets.imaging.plate_cells import CropFilters, crop_plate, default_workers, find_plate_cells
from gbm_assets.imaging.plates import check_plate_id, read_manifest
from gbm_assets.imaging.quality import CROP_CHECKS, check_crops, expected_crop_count
from gbm_assets.imaging.segmentation import SegmentationParams
from gbm_assets.paths import plate_file
from gbm_assets.schema import CROP_SCHEMA, MEASUREMENT_COLUMNS, PROVENANCE_COLUMNS
from gbm_assets.storage import AtomicParquetWriter, write_parquet_atomic

_SEG_DEFAULTS = SegmentationParams()


class CellFindingConfig(dg.Config):
    """Cell finding settings (see gbm_assets.imaging.segmentation.SegmentationParams)."""

    cell_diameter_px: float = _SEG_DEFAULTS.cell_diameter_px
    threshold_correction: float = _SEG_DEFAULTS.threshold_correction
    min_area_scale: float = _SEG_DEFAULTS.min_area_scale
    max_area_scale: float = _SEG_DEFAULTS.max_area_scale
    declump: bool = _SEG_DEFAULTS.declump
    use_cellprofiler_table: bool = True
    # Which CellProfiler objects to use when the plate holds several object tables (e.g. "Cells").
    cellprofiler_objects: str | None = None
    workers: int = 0  # 0 = all cores

    def params(self) -> SegmentationParams:
        names = {f.name for f in fields(SegmentationParams)}
        return SegmentationParams(**{k: v for k, v in self.model_dump().items() if k in names})


class CropConfig(dg.Config):
    """Crop size and the thesis' image filters (None = off)."""

    crop_size: int = 128
    max_cells_per_image: int | None = None
    min_timepoint_h: float | None = None
    max_timepoint_h: float | None = None
    workers: int = 0  # 0 = all cores


def _progress(context: dg.AssetExecutionContext, what: str):
    step = {"last": -1}

    def report(done: int, total: int) -> None:
        pct = int(100 * done / total)
        if pct // 10 != step["last"] // 10 or done == total:
            step["last"] = pct
            context.log.info(f"{what}: {done}/{total} images ({pct}%)")

    return report


def masks_file(data: DataDirs, plate_id: str):
    return plate_file(data.masks, plate_id)


@dg.asset(
    partitions_def=plates,
    deps=[raw_plates],
    group_name="cells",
    kinds={"opencv", "parquet"},
    check_specs=[dg.AssetCheckSpec("cells_found", asset="cell_coordinates", description="The plate yields at least one cell.")],
    description="Every cell's centre and CellProfiler-style shape measurements, plus label masks, per plate.",
)
def cell_coordinates(context: dg.AssetExecutionContext, config: CellFindingConfig, data: DataDirs) -> dg.MaterializeResult:
    plate_id = check_plate_id(context.partition_key)
    plate_dir = data.plate_dir(plate_id)
    manifest = read_manifest(plate_dir)
    found = read_plate_objects(plate_dir, manifest, config.cellprofiler_objects) if config.use_cellprofiler_table else None
    objects = found.table if found else None
    source = f"CellProfiler table {found.path.name}, objects {found.objects_name}" if found else "segmentation"
    context.log.info(f"plate {plate_id}: {len(manifest)} images, cells from {source}")

    frames, mask_rows = [], []
    for found in find_plate_cells(
        plate_dir, manifest["image"], config.params(), objects,
        workers=config.workers or default_workers(), progress=_progress(context, f"cell finding {plate_id}"),
    ):
        cells = found.cells.copy()
        cells.insert(0, "image", found.image)
        cells.insert(0, "plate", plate_id)
        frames.append(cells)
        mask_rows.append((found.image, found.height, found.width, len(cells), found.labels_png))
    coords = pd.concat(frames, ignore_index=True)
    coords["cell_id"] = coords["cell_id"].astype(np.int32)
    masks = pa.table(
        {k: list(v) for k, v in zip(("image", "height", "width", "n_cells", "labels_png"), zip(*mask_rows))}
    )
    write_parquet_atomic(masks, masks_file(data, plate_id))
    out = write_parquet_atomic(pa.Table.from_pandas(coords, preserve_index=False), plate_file(data.coordinates, plate_id))

    per_image = coords.groupby("image").size().reindex(manifest["image"], fill_value=0)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "source": source,
            "n_cells": len(coords),
            "cells_per_image_mean": float(per_image.mean()),
            "images_without_cells": int((per_image == 0).sum()),
            "median_area_px": float(coords["area"].median()) if len(coords) else 0.0,
            "segmentation_params": dg.MetadataValue.json(asdict(config.params())),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="cells_found",
                passed=len(coords) > 0,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"n_cells": len(coords)},
            )
        ],
    )


@dg.asset(
    partitions_def=plates,
    deps=[cell_coordinates],
    group_name="cells",
    kinds={"parquet"},
    check_specs=[dg.AssetCheckSpec(name, asset="cell_crops", description=d) for name, d in CROP_CHECKS.items()],
    description="128x128 (configurable) single-cell crops with masks and full provenance; one Parquet file per plate.",
)
def cell_crops(context: dg.AssetExecutionContext, config: CropConfig, data: DataDirs) -> dg.MaterializeResult:
    plate_id = check_plate_id(context.partition_key)
    plate_dir = data.plate_dir(plate_id)
    manifest = read_manifest(plate_dir)
    coords = pd.read_parquet(plate_file(data.coordinates, plate_id))
    masks_tbl = pq.read_table(masks_file(data, plate_id), columns=["image", "labels_png"])
    masks = dict(zip(masks_tbl["image"].to_pylist(), masks_tbl["labels_png"].to_pylist()))
    filters = CropFilters(config.max_cells_per_image, config.min_timepoint_h, config.max_timepoint_h)

    out = plate_file(data.crops, plate_id)
    with AtomicParquetWriter(out, CROP_SCHEMA) as writer:
        for table in crop_plate(
            plate_id, plate_dir, manifest, coords, masks, config.crop_size, filters,
            workers=config.workers or default_workers(), progress=_progress(context, f"cropping {plate_id}"),
        ):
            writer.write(table)
    sizes = pq.read_table(masks_file(data, plate_id), columns=["image", "height", "width"]).to_pandas()
    expected = expected_crop_count(coords, manifest, sizes, config.crop_size, filters)
    written = pq.read_table(out, columns=[*PROVENANCE_COLUMNS, *MEASUREMENT_COLUMNS]).to_pandas()
    checks = [
        dg.AssetCheckResult(check_name=name, passed=bool(ok), metadata=meta, severity=dg.AssetCheckSeverity.ERROR)
        for name, (ok, meta) in check_crops(written, expected).items()
    ]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "n_crops": writer.rows,
            "crop_size": config.crop_size,
            "n_coordinates": len(coords),
            "filters": dg.MetadataValue.json(
                {k: v for k, v in config.model_dump().items() if k not in ("workers", "crop_size")}
            ),
        },
        check_results=checks,
    )
