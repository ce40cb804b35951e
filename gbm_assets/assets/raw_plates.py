"""raw_plates: validate one plate folder and record what it holds, and which version of it.

The plate's version (manifest hash and image fingerprint, see gbm_assets.imaging.plates.PlateVersion)
goes in the materialization metadata and in data/plate_versions/<plate>.json, which
cell_coordinates reads to refuse a plate that changed after it was validated.
"""

import dagster as dg

from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.errors import PlateError
from gbm_assets.imaging.plate_cells import check_image_size
from gbm_assets.imaging.plates import (
    check_plate_id,
    check_plate_unchanged,
    culture_spelling_clashes,
    plate_version,
    validate_plate,
    write_plate_version,
)


@dg.asset(
    partitions_def=plates,
    group_name="ingest",
    kinds={"python", "tiff"},
    description="A plate folder under data/raw/<plate>/ (images + manifest.csv), validated.",
)
def raw_plates(context: dg.AssetExecutionContext, data: DataDirs) -> dg.MaterializeResult:
    plate_id = check_plate_id(context.partition_key)  # no log line: each is a database write; errors name the file
    try:
        before = plate_version(data.plate_dir(plate_id))
    except PlateError:
        before = None  # validate_plate says what is wrong with the plate
    summary = validate_plate(data.plate_dir(plate_id))
    check_image_size((summary.height, summary.width), summary.path / summary.manifest["image"].iloc[0])
    # The version validated is the one seen before and after validation (a plate being copied fails).
    version = check_plate_unchanged(
        summary.path,
        plate_id,
        before or plate_version(summary.path),
        "raw_plates began validating it",
        summary.manifest["image"],
    )
    record = write_plate_version(data.plate_version_file(plate_id), plate_id, version, run_id=context.run_id)
    for clash in culture_spelling_clashes(data.raw, plate_id):
        context.log.warning(clash)
    return dg.MaterializeResult(
        metadata={
            "manifest_sha256": version.manifest_sha256,
            "plate_version": dg.MetadataValue.json(version.as_dict()),
            "plate_version_file": dg.MetadataValue.path(str(record)),
            "path": dg.MetadataValue.path(str(summary.path)),
            "n_images": summary.n_images,
            "image_size": f"{summary.width}x{summary.height}",
            "bit_depth": summary.bits,
            "cultures": ", ".join(summary.cultures),
            "concentrations": ", ".join(summary.concentrations),
            "replicates": ", ".join(str(r) for r in sorted(summary.manifest["replicate"].unique())),
            "timepoints_h": ", ".join(f"{t:g}" for t in sorted(summary.manifest["timepoint_h"].unique())),
            "wells": ", ".join(sorted(set(summary.manifest["well"]) - {"na"})) or "na",
            "pixel_size_um": summary.pixel_size.um if summary.pixel_size else float("nan"),
            "pixel_size_source": summary.pixel_size.source if summary.pixel_size else "not recorded (areas in px²)",
        }
    )
