"""raw_plates: validate one plate folder and record what it holds."""


import dagster as dg

from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.plates import check_plate_id, validate_plate


@dg.asset(
    partitions_def=plates,
    group_name="ingest",
    kinds={"python", "tiff"},
    description="A plate folder under data/raw/<plate>/ (images + manifest.csv), validated.",
)
def raw_plates(context: dg.AssetExecutionContext, data: DataDirs) -> dg.MaterializeResult:
    plate_id = check_plate_id(context.partition_key)
    context.log.info(f"validating plate {plate_id} at {data.plate_dir(plate_id)}")
    summary = validate_plate(data.plate_dir(plate_id))
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(summary.path)),
            "n_images": summary.n_images,
            "image_size": f"{summary.width}x{summary.height}",
            "bit_depth": summary.bits,
            "cultures": ", ".join(summary.cultures),
            "concentrations": ", ".join(summary.concentrations),
            "replicates": ", ".join(str(r) for r in sorted(summary.manifest["replicate"].unique())),
            "timepoints_h": ", ".join(f"{t:g}" for t in sorted(summary.manifest["timepoint_h"].unique())),
            "wells": ", ".join(sorted(set(summary.manifest["well"]) - {"na"})) or "na",
        }
    )
