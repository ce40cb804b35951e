"""cell_coordinates and cell_crops: per-plate cell finding and single-cell crops (wiring only).

One plate version per run: cell_coordinates works only on the plate version raw_plates validated
(data/plate_versions/<plate>.json) and records it in its Parquet files; cell_crops works only on
the version cell_coordinates used. Each checks again before its output replaces the previous one.

One pass when one run makes both: cell_coordinates then also crops each image while its worker
holds the image and its label mask (with the run's cell_crops config), and leaves the crops
beside the crops file, hidden and tied to its coordinates by a token (plate_cells.CROPS_PASS_KEY);
cell_crops adopts that file when it matches the coordinates and its own config, else crops as
before. Either materializes alone as before. The label masks carry the coordinates' token too, so
masks and coordinates of two different runs (one stopped between writing them) are never paired.
"""

import contextlib
import os
import secrets
import time
from dataclasses import asdict, fields

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.errors import PlateError
from gbm_assets.imaging.cell_quality import QC_LABELS, kept_candidates
from gbm_assets.imaging.cellprofiler import read_plate_objects
from gbm_assets.imaging.pixel_size import PIXEL_SIZE_COLUMN, plate_pixel_size
from gbm_assets.imaging.plate_cells import (
    CropFilters,
    CropRequest,
    crop_plate,
    crops_pass_metadata,
    crops_table,
    default_workers,
    pass_token,
    pending_crops_match,
    pending_crops_path,
)
from gbm_assets.imaging.plate_coordinates import (
    LEGACY_LABELS_COLUMN,
    coordinates_summary,
    magnification_summary,
    plate_coordinates,
)
from gbm_assets.imaging.plates import (
    PlateVersion,
    check_plate_id,
    check_plate_unchanged,
    parquet_plate_version,
    plate_version_schema_metadata,
    read_manifest,
    read_plate_version,
)
from gbm_assets.imaging.quality import CROP_CHECKS, check_crops, expected_crop_count
from gbm_assets.imaging.segmentation import SegmentationParams
from gbm_assets.paths import plate_file
from gbm_assets.schema import CROP_SCHEMA, MEASUREMENT_COLUMNS, PROVENANCE_COLUMNS
from gbm_assets.storage import AtomicParquetWriter, claim, remove_stale_temps, write_parquet_atomic

_SEG_DEFAULTS = SegmentationParams()


class CellFindingConfig(dg.Config):
    """Cell finding settings (see gbm_assets.imaging.segmentation.SegmentationParams).

    cell_diameter_px: the cells' typical diameter in pixels; None (the default) estimates it
    per plate from the images (gbm_assets.imaging.cell_size).
    """

    cell_diameter_px: float | None = None
    threshold_correction: float = _SEG_DEFAULTS.threshold_correction
    min_area_scale: float = _SEG_DEFAULTS.min_area_scale
    max_area_scale: float = _SEG_DEFAULTS.max_area_scale
    declump: bool = _SEG_DEFAULTS.declump
    use_cellprofiler_table: bool = True
    # Which CellProfiler objects to use when the plate holds several object tables (e.g. "Cells").
    cellprofiler_objects: str | None = None
    workers: int = 0  # 0 = all cores, at most 8 (plate_cells.default_workers)

    def params(self) -> SegmentationParams:
        names = {f.name for f in fields(SegmentationParams)}
        return SegmentationParams(**{k: v for k, v in self.model_dump().items() if k in names and v is not None})


class CropConfig(dg.Config):
    """Crop size, which candidates to crop (their qc labels) and the thesis' image filters (None = off)."""

    crop_size: int = 128
    keep_qc: list[str] = ["cell"]  # also "debris", "fragment", "edge" to crop those candidates
    max_cells_per_image: int | None = None
    min_timepoint_h: float | None = None
    max_timepoint_h: float | None = None
    workers: int = 0  # 0 = all cores, at most 8 (plate_cells.default_workers)

    @pydantic.field_validator("crop_size")
    @classmethod
    def _even_size(cls, value: int) -> int:
        if value <= 0 or value % 2:
            raise ValueError(f"crop_size must be a positive even number of pixels, got {value}")
        return value

    @pydantic.field_validator("keep_qc")
    @classmethod
    def _known_labels(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(QC_LABELS))
        if unknown or not value:
            raise ValueError(f"keep_qc must list qc labels among {list(QC_LABELS)}, got {value}")
        return value

    def request(self, manifest: pd.DataFrame) -> CropRequest:
        """These settings as a plate_cells.CropRequest for a plate of this manifest."""
        filters = CropFilters(self.max_cells_per_image, self.min_timepoint_h, self.max_timepoint_h)
        times = dict(zip(manifest["image"], manifest["timepoint_h"].astype(float), strict=True))
        return CropRequest(self.crop_size, tuple(self.keep_qc), filters, times)


def _crops_in_this_run(context: dg.AssetExecutionContext) -> CropConfig | None:
    """cell_crops' config when this run also materializes cell_crops (so cell finding crops in the
    same pass), else None (also when that config is not valid: cell_crops then says why)."""
    steps = context.run.step_keys_to_execute
    if steps is None:
        steps = [key.path[-1] for key in context.job_def.asset_layer.executable_asset_keys]
    if "cell_crops" not in steps:
        return None
    given = ((context.run_config or {}).get("ops") or {}).get("cell_crops") or {}
    try:
        return CropConfig(**(given.get("config") or {}))
    except (TypeError, ValueError):
        return None


PROGRESS_EVERY_S = 10.0  # least seconds between two progress lines of one step (the last always shows)


def _progress(context: dg.AssetExecutionContext, what: str, every_s: float = PROGRESS_EVERY_S):
    """progress(done, total) for the imaging functions: a log line at each 10% step reached at
    least every_s seconds after the previous line (or the start), and one when all are done if
    any came before. Each line is an event Dagster stores (a database write, in the step's time):
    a plate done within every_s gets none (its materialization says what was done)."""
    step = {"last": -1, "at": time.monotonic(), "lines": 0}

    def report(done: int, total: int) -> None:
        pct = int(100 * done / total)
        now = time.monotonic()
        if (done == total and step["lines"]) or (pct // 10 != step["last"] // 10 and now - step["at"] >= every_s):
            step["last"], step["at"], step["lines"] = pct, now, step["lines"] + 1
            context.log.info(f"{what}: {done}/{total} images ({pct}%)")

    return report


def masks_file(data: DataDirs, plate_id: str):
    return plate_file(data.masks, plate_id)


def _with_version(table: pa.Table, version: PlateVersion) -> pa.Table:
    return table.replace_schema_metadata(plate_version_schema_metadata(version, table.schema.metadata))


def _version_metadata(version: PlateVersion) -> dict:
    return {"manifest_sha256": version.manifest_sha256, "plate_version": dg.MetadataValue.json(version.as_dict())}


def _recorded_version(read, path, plate_id: str, by: str) -> PlateVersion:
    """read(path): the plate version `by` recorded there; PlateError naming the file if none."""
    try:
        found = read(path)
    except FileNotFoundError:
        found = None
    if found is None:
        raise PlateError(
            path,
            f"no plate version recorded for plate {plate_id!r}; materialize {by} for it first "
            "(or re-ingest the plate: raw_plates, cell_coordinates, cell_crops)",
        )
    return found


@dg.asset(
    partitions_def=plates,
    deps=[raw_plates],
    group_name="cells",
    kinds={"opencv", "parquet"},
    check_specs=[
        dg.AssetCheckSpec("cells_found", asset="cell_coordinates", description="The plate yields at least one cell.")
    ],
    description="Every cell's centre and CellProfiler-style shape measurements, plus label masks, per plate.",
)
def cell_coordinates(
    context: dg.AssetExecutionContext, config: CellFindingConfig, data: DataDirs
) -> dg.MaterializeResult:
    plate_id = check_plate_id(context.partition_key)
    plate_dir = data.plate_dir(plate_id)
    validated = _recorded_version(read_plate_version, data.plate_version_file(plate_id), plate_id, "raw_plates")
    manifest = read_manifest(plate_dir)
    version = check_plate_unchanged(plate_dir, plate_id, validated, "raw_plates validated it", manifest["image"])
    found = (
        read_plate_objects(plate_dir, manifest, config.cellprofiler_objects) if config.use_cellprofiler_table else None
    )
    source = f"CellProfiler table {found.path.name}, objects {found.objects_name}" if found else "segmentation"
    crop_config = _crops_in_this_run(context)
    request = crop_config.request(manifest) if crop_config is not None else None
    token = secrets.token_hex(8)  # ties these coordinates to their label masks and crops made in this pass
    pending = pending_crops_path(plate_file(data.crops, plate_id))
    remove_stale_temps(pending)  # pending crops of a killed pass, or claimed by a killed cell_crops
    with contextlib.ExitStack() as stack:
        on_crops = None
        if request is not None:
            rows = {row.image: row for row in manifest.itertuples(index=False)}
            schema = CROP_SCHEMA.with_metadata(
                plate_version_schema_metadata(version, CROP_SCHEMA.metadata) | crops_pass_metadata(token, request)
            )
            writer = stack.enter_context(AtomicParquetWriter(pending, schema))

            def on_crops(image):
                writer.write(crops_table(plate_id, rows[image.image], *image.crops, request.crop_size))

        plate = plate_coordinates(
            plate_id,
            plate_dir,
            manifest["image"],
            config.params(),
            config.cell_diameter_px is None,
            found.table if found else None,
            workers=config.workers or default_workers(),
            progress=_progress(context, f"cell finding {plate_id}"),
            crop=request,
            on_crops=on_crops,
        )
        check_plate_unchanged(plate_dir, plate_id, version, "cell_coordinates began", manifest["image"])
    # No log line: each is a database write of Dagster's in the step's time; the metadata says it all.
    masks = _with_version(plate.masks, version)
    write_parquet_atomic(
        masks.replace_schema_metadata(masks.schema.metadata | crops_pass_metadata(token)), masks_file(data, plate_id)
    )
    # raw_plates checked that every image has this size and the plate is unchanged since: its first
    # image's (and manifest row's) says it without opening every file again
    pixel_size = plate_pixel_size(plate_dir, manifest.iloc[:1])
    coords = plate.coordinates.assign(**{PIXEL_SIZE_COLUMN: pixel_size.um if pixel_size else float("nan")})
    table = _with_version(pa.Table.from_pandas(coords, preserve_index=False), version)
    out = write_parquet_atomic(
        table.replace_schema_metadata(table.schema.metadata | crops_pass_metadata(token)),
        plate_file(data.coordinates, plate_id),
    )
    if request is None:  # crops pending from earlier coordinates can no longer match
        pending.unlink(missing_ok=True)
    cells = kept_candidates(coords)
    magnified = magnification_summary(plate.size)
    if magnified["warning"]:
        context.log.warning(f"plate {plate_id!r}: {magnified['warning']}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            **_version_metadata(version),
            "source": source,
            **{
                k: dg.MetadataValue.json(v) if isinstance(v, dict) else v for k, v in coordinates_summary(plate).items()
            },
            "cell_diameter_px": float(coords["cell_diameter_px"].iloc[0]) if len(coords) else float("nan"),
            PIXEL_SIZE_COLUMN: pixel_size.um if pixel_size else float("nan"),
            "cell_size": plate.size.note() if plate.size is not None else "given in the run config",
            "magnification": dg.MetadataValue.json(magnified),
            "cells_found_at_px": float(plate.params.cell_diameter_px),
            "segmentation_params": dg.MetadataValue.json(asdict(plate.params)),
            "crops_made": "in this pass, for cell_crops" if request is not None else "no (cell_crops not in this run)",
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="cells_found",
                passed=len(cells) > 0,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"n_cells": len(cells)},
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
    used = _recorded_version(
        parquet_plate_version, plate_file(data.coordinates, plate_id), plate_id, "cell_coordinates"
    )
    if _recorded_version(parquet_plate_version, masks_file(data, plate_id), plate_id, "cell_coordinates") != used:
        raise PlateError(
            masks_file(data, plate_id),
            f"label masks of plate {plate_id!r} are of another plate version "
            "than its cell coordinates; materialize cell_coordinates again",
        )
    manifest = read_manifest(plate_dir)
    version = check_plate_unchanged(plate_dir, plate_id, used, "cell_coordinates found its cells", manifest["image"])
    coords_file = plate_file(data.coordinates, plate_id)
    coords_table = pq.read_table(coords_file)
    coords = coords_table.to_pandas()

    def read_masks(columns: list[str] | None = None) -> pa.Table:
        """The label masks, only if of the coordinates just read (their pass token; files read once
        each). Masks written before they carried a token cannot tell and are taken."""
        table = pq.read_table(masks_file(data, plate_id), columns=columns)
        token = pass_token(table.schema)
        if token is not None and token != pass_token(coords_table.schema):
            raise PlateError(
                masks_file(data, plate_id),
                f"label masks of plate {plate_id!r} are of another cell_coordinates run than its cell "
                "coordinates (a run stopped between writing them, or another run meanwhile); "
                "materialize cell_coordinates again",
            )
        return table

    request = config.request(manifest)
    filters = request.filters
    out = plate_file(data.crops, plate_id)
    pending = pending_crops_path(out)
    remove_stale_temps(pending)
    # Taken away first, so that what is checked is what is adopted, whatever another run writes meanwhile.
    claimed = claim(pending)
    try:
        made_in_pass = (
            claimed is not None
            and pending_crops_match(claimed, coords_table.schema, request)
            and parquet_plate_version(claimed) == version
        )
        if made_in_pass:  # crops cell_coordinates made in its pass over these very coordinates
            sizes = read_masks(["image", "height", "width"]).to_pandas()
            # Still the same plate: else the previous crops file stays.
            check_plate_unchanged(plate_dir, plate_id, version, "cell_crops began", manifest["image"])
            os.replace(claimed, out)
    finally:
        if claimed is not None:  # not adopted: made from other coordinates or settings
            claimed.unlink(missing_ok=True)
    if not made_in_pass:
        masks_tbl = read_masks()
        labels = "labels_zstd" if "labels_zstd" in masks_tbl.column_names else LEGACY_LABELS_COLUMN  # older: PNG
        masks = dict(zip(masks_tbl["image"].to_pylist(), masks_tbl[labels].to_pylist(), strict=False))
        with AtomicParquetWriter(
            out, CROP_SCHEMA.with_metadata(plate_version_schema_metadata(version, CROP_SCHEMA.metadata))
        ) as writer:
            for table in crop_plate(
                plate_id,
                plate_dir,
                manifest,
                coords,
                masks,
                config.crop_size,
                filters,
                workers=config.workers or default_workers(),
                progress=_progress(context, f"cropping {plate_id}"),
                keep_qc=config.keep_qc,
            ):
                writer.write(table)
            # Still the same plate: else the new file is dropped and the previous one stays.
            check_plate_unchanged(plate_dir, plate_id, version, "cell_crops began", manifest["image"])
        sizes = masks_tbl.select(["image", "height", "width"]).to_pandas()
    expected = expected_crop_count(coords, manifest, sizes, config.crop_size, filters, config.keep_qc)
    written = pq.read_table(out, columns=[*PROVENANCE_COLUMNS, *MEASUREMENT_COLUMNS]).to_pandas()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            **_version_metadata(version),
            "cropped_in": "cell_coordinates' pass (images read once)" if made_in_pass else "this step",
            "n_crops": len(written),
            "crop_size": config.crop_size,
            "n_coordinates": len(coords),
            "filters": dg.MetadataValue.json(
                {k: v for k, v in config.model_dump().items() if k not in ("workers", "crop_size")}
            ),
        },
        check_results=[
            dg.AssetCheckResult(check_name=name, passed=bool(ok), metadata=meta, severity=dg.AssetCheckSeverity.ERROR)
            for name, (ok, meta) in check_crops(written, expected).items()
        ],
    )
