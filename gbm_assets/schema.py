"""Column contracts between stages, so that provenance travels unchanged end to end."""

from __future__ import annotations

import pyarrow as pa

# Every crop, embedding and cluster label carries these, in this order.
PROVENANCE_COLUMNS = (
    "crop_id",  # "<plate>:<image>:<cell_id>", stable and unique across the data set
    "plate",
    "image",  # file name relative to the plate folder
    "x",  # crop centre, pixel column in the source image
    "y",  # crop centre, pixel row in the source image
    "culture",
    "concentration",  # label as written in the manifest (e.g. "1000")
    "replicate",
    "timepoint_h",
    "well",  # plate well as an instrument names it ("B2"), "na" when not known
    "position",  # field (image position) within the well, "na" when not known
)

# CellProfiler-style shape measurements (AreaShape_* names, lower-cased).
MEASUREMENT_COLUMNS = (
    "area",
    "perimeter",
    "major_axis_length",
    "minor_axis_length",
    "eccentricity",
    "solidity",
    "form_factor",
)

# CellProfiler's MeasureObjectNeighbors ("Within a specified distance", its default 5 px) among
# an image's cells: Neighbors_<Feature>_<distance> (imaging.neighbors computes them).
NEIGHBOR_DISTANCE_PX = 5
NEIGHBOR_FEATURES = (
    "NumberOfNeighbors",
    "PercentTouching",
    "FirstClosestObjectNumber",
    "FirstClosestDistance",
    "SecondClosestObjectNumber",
    "SecondClosestDistance",
    "AngleBetweenNeighbors",
)
NEIGHBOR_COLUMNS = tuple(f"Neighbors_{feature}_{NEIGHBOR_DISTANCE_PX}" for feature in NEIGHBOR_FEATURES)
# what a crop carries of its cell's surroundings: the neighbour measurements and the plate's
# typical cell diameter (px), their scale (float64 in crops, NaN where not measured)
CONTEXT_COLUMNS = (*NEIGHBOR_COLUMNS, "cell_diameter_px")

PROVENANCE_SCHEMA = pa.schema(
    [
        ("crop_id", pa.string()),
        ("plate", pa.string()),
        ("image", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("culture", pa.string()),
        ("concentration", pa.string()),
        ("replicate", pa.int32()),
        ("timepoint_h", pa.float64()),
        ("well", pa.string()),
        ("position", pa.string()),
    ]
)

MEASUREMENT_SCHEMA = pa.schema([(name, pa.float64()) for name in MEASUREMENT_COLUMNS])
# float64 in crops: NaN where a crop's cell was not measured (crops of other qc labels).
CONTEXT_SCHEMA = pa.schema([(name, pa.float64()) for name in CONTEXT_COLUMNS])

# cell_crops rows: provenance, cell id, measurements, neighbour measurements, the candidate's qc label (cell_quality:
# "cell" unless keep_qc kept others), then the crop itself.
# pixels: crop_size*crop_size uint8 bytes, row-major, per-crop normalised (see imaging.crops).
# mask: crop_size*crop_size uint8 bytes, 1 inside the connected cell component at the centre.
CROP_SCHEMA = pa.schema(
    list(PROVENANCE_SCHEMA)
    + [("cell_id", pa.int32())]
    + list(MEASUREMENT_SCHEMA)
    + list(CONTEXT_SCHEMA)  # neighbour measurements, then the plate's typical cell diameter (px)
    + [("qc", pa.string()), ("crop_size", pa.int16()), ("pixels", pa.binary()), ("mask", pa.binary())]
)


def make_crop_id(plate: str, image: str, cell_id: int) -> str:
    return f"{plate}:{image}:{int(cell_id)}"
