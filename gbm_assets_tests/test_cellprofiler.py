"""CellProfiler object tables in every layout ExportToSpreadsheet writes, mapped to the right image."""

from __future__ import annotations

import csv
import math
import re
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from gbm_assets.errors import PlateError
from gbm_assets.imaging.cellprofiler import PlateObjects, read_plate_objects
from gbm_assets.imaging.plates import read_manifest
from gbm_assets_tests.conftest import write_tiny_plate

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
CASE_TAB = CASES / "11-cellprofiler-tab-delimited" / "raw" / "cp-tab"
CASE_ORDER = CASES / "13-cellprofiler-imagenumber-order" / "raw" / "cp-imagenumber"


def _case(folder: Path) -> Path:
    if not (folder / "manifest.csv").is_file():
        pytest.skip(f"shared case not found at {folder}")
    return folder


def _write(path: Path, rows: list[list], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return path


def _rows_of(path: Path) -> list[dict]:
    """The rows of a CellProfiler table read independently (csv module, delimiter sniffed by hand)."""
    text = path.read_text()
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    return list(csv.DictReader(text.splitlines(), delimiter=delimiter))


def _read(plate: Path, objects_name: str | None = None) -> PlateObjects | None:
    return read_plate_objects(plate, read_manifest(plate), objects_name)


# A tiny plate: img0.tif, img1.tif (64x64). CellProfiler numbered them the other way round.
CELLS = [
    ["ImageNumber", "ObjectNumber", "AreaShape_Area", "Location_Center_X", "Location_Center_Y"],
    [1, 1, 120, 10.25, 20.5],
    [1, 2, 80, 30.0, 40.75],
    [2, 1, 95, 5.5, 6.0],
]
IMAGE = [
    ["ImageNumber", "Count_Cells", "FileName_Phase", "PathName_Phase", "Height_Phase", "Width_Phase"],
    [1, 2, "img1.tif", "/elsewhere/exp1", 64, 64],
    [2, 1, "img0.tif", "/elsewhere/exp1", 64, 64],
]
EXPECTED = pd.DataFrame(
    {
        "image": ["img1.tif", "img1.tif", "img0.tif"],
        "x": [10.25, 30.0, 5.5],
        "y": [20.5, 40.75, 6.0],
        "area": [120.0, 80.0, 95.0],
    }
)


@pytest.fixture
def plate(tmp_path) -> Path:
    return write_tiny_plate(tmp_path / "p1", n=2, size=(64, 64))


# ---------------------------------------------------------------- the shared cases


def test_case_11_tab_delimited_table_is_used(tmp_path):
    folder = _case(CASE_TAB)
    found = _read(folder)
    assert found.path.name == "MyExpt_Cells.csv" and found.objects_name == "Cells"
    assert found.table.groupby("image").size().to_dict() == {"t07.tif": 15, "t13.tif": 20}
    rows = _rows_of(folder / "MyExpt_Cells.csv")
    assert found.table["image"].tolist() == [r["FileName_Phase"] for r in rows]
    assert found.table["x"].tolist() == [float(r["Location_Center_X"]) for r in rows]
    assert found.table["y"].tolist() == [float(r["Location_Center_Y"]) for r in rows]
    assert found.table["area"].tolist() == [float(r["AreaShape_Area"]) for r in rows]


def _case_13(tmp_path) -> Path:
    plate = tmp_path / "cp-imagenumber"
    shutil.copytree(_case(CASE_ORDER), plate)
    for name in ("t07.tif", "t13.tif"):
        if not (plate / name).exists():
            shutil.copy(_case(CASE_TAB) / name, plate / name)
    for p in plate.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # the shared copy is read-only
    return plate


def test_case_13_imagenumber_is_mapped_through_the_image_table(tmp_path):
    plate = _case_13(tmp_path)
    manifest = read_manifest(plate)
    assert manifest["image"].tolist()[0] == "t13.tif"  # the manifest order is not CellProfiler's
    found = read_plate_objects(plate, manifest)
    assert found.path.name == "Cells.csv" and found.objects_name == "Cells"
    rows = _rows_of(plate / "Cells.csv")
    for number, image in (("1", "t07.tif"), ("2", "t13.tif")):
        mine = [r for r in rows if r["ImageNumber"] == number]
        got = found.table[found.table["image"] == image]
        assert got["x"].tolist() == [float(r["Location_Center_X"]) for r in mine]
        assert got["y"].tolist() == [float(r["Location_Center_Y"]) for r in mine]
    assert found.table.groupby("image").size().to_dict() == {"t07.tif": 15, "t13.tif": 20}


def test_case_13_without_the_image_table_fails(tmp_path):
    plate = _case_13(tmp_path)
    (plate / "Image.csv").unlink()
    with pytest.raises(PlateError, match=r"Cells\.csv.*ImageNumber.*no CellProfiler Image table"):
        _read(plate)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "delimiter, suffix, prefix",
    [
        (",", ".csv", ""),
        ("\t", ".txt", "MyExpt_"),
        ("\t", ".csv", "MyExpt_"),
        (";", ".csv", ""),
        ("\t", ".tsv", "Run2"),
    ],
)
def test_layouts_map_imagenumber_through_the_image_table(plate, delimiter, suffix, prefix):
    _write(plate / f"{prefix}Cells{suffix}", CELLS, delimiter)
    _write(plate / f"{prefix}Image{suffix}", IMAGE, delimiter)
    _write(plate / f"{prefix}Experiment{suffix}", [["Key", "Value"], ["CellProfiler_Version", "4.2.6"]], delimiter)
    found = _read(plate)
    assert found.path.name == f"{prefix}Cells{suffix}" and found.objects_name == "Cells"
    pd.testing.assert_frame_equal(found.table, EXPECTED)


def test_object_table_with_its_own_filename_column_needs_no_image_table(plate):
    rows = [
        ["ImageNumber", "ObjectNumber", "FileName_Phase", "AreaShape_Center_X", "AreaShape_Center_Y"],
        [1, 1, "img1.tif", 3.0, 4.0],
        [2, 1, "img0.tif", 63.5, 0.0],
    ]
    _write(plate / "MyExpt_Nuclei.csv", rows)
    found = _read(plate)
    assert found.objects_name == "Nuclei"
    assert found.table.to_dict("list") == {"image": ["img1.tif", "img0.tif"], "x": [3.0, 63.5], "y": [4.0, 0.0]}


def test_location_centre_preferred_over_areashape_centre(plate):
    rows = [
        [
            "ImageNumber",
            "ObjectNumber",
            "AreaShape_Center_X",
            "AreaShape_Center_Y",
            "Location_Center_X",
            "Location_Center_Y",
            "AreaShape_Perimeter",
        ],
        [2, 1, 1, 2, 11.5, 12.5, "nan"],
    ]
    _write(plate / "Cells.csv", rows)
    _write(plate / "Image.csv", [row[:1] + row[2:] for row in IMAGE])  # without Count_Cells
    table = _read(plate).table
    assert table[["image", "x", "y"]].values.tolist() == [["img0.tif", 11.5, 12.5]]
    assert math.isnan(table["perimeter"].iloc[0])


def test_combined_layout_with_two_header_rows(plate):
    # ExportToSpreadsheet's "combined" table: object names over each block, then feature names.
    # Nuclei has 3 objects in image 1 and Cells 2: CellProfiler pads Cells' third row with NaN.
    objects = ["Image", "Image", "Nuclei", "Nuclei", "Nuclei", "Nuclei", "Cells", "Cells", "Cells"]
    features = [
        "ImageNumber",
        "Metadata_Well",
        "ObjectNumber",
        "Location_Center_X",
        "Location_Center_Y",
        "AreaShape_Area",
        "Location_Center_X",
        "Location_Center_Y",
        "AreaShape_Area",
    ]
    rows = [
        objects,
        features,
        [1, "B2", 1, 1.0, 2.0, 10, 11.0, 12.0, 100],
        [1, "B2", 2, 3.0, 4.0, 20, 13.0, 14.0, "nan"],
        [1, "B2", 3, 5.0, 6.0, 30, "nan", "nan", "nan"],
        [2, "B3", 1, 7.0, 8.0, 40, 17.0, 18.0, 400],
    ]
    _write(plate / "MyExpt_Object.csv", rows, "\t")
    _write(plate / "MyExpt_Image.csv", IMAGE, "\t")
    with pytest.raises(PlateError, match=r"several CellProfiler object tables.*Nuclei.*Cells.*cellprofiler_objects"):
        _read(plate)
    cells = _read(plate, "Cells")
    assert cells.objects_name == "Cells" and cells.path.name == "MyExpt_Object.csv"
    assert cells.table[["image", "x", "y"]].values.tolist() == [
        ["img1.tif", 11.0, 12.0],
        ["img1.tif", 13.0, 14.0],
        ["img0.tif", 17.0, 18.0],
    ]
    assert cells.table["area"].tolist()[0::2] == [100.0, 400.0] and math.isnan(cells.table["area"].iloc[1])
    nuclei = _read(plate, "nuclei").table
    assert nuclei["x"].tolist() == [1.0, 3.0, 5.0, 7.0]
    assert nuclei["image"].tolist() == ["img1.tif"] * 3 + ["img0.tif"]


def test_combined_layout_nan_centre_inside_an_image_is_still_an_error(plate):
    rows = [
        ["Image", "Nuclei", "Nuclei", "Nuclei", "Cells", "Cells"],
        [
            "ImageNumber",
            "ObjectNumber",
            "Location_Center_X",
            "Location_Center_Y",
            "Location_Center_X",
            "Location_Center_Y",
        ],
        [1, 1, 1.0, 2.0, "nan", "nan"],
        [1, 2, 3.0, 4.0, 13.0, 14.0],
    ]
    _write(plate / "Object.csv", rows)
    _write(plate / "Image.csv", IMAGE)
    with pytest.raises(PlateError, match=r"Object\.csv: line 3, column 'Location_Center_X'.*nan"):
        _read(plate, "Cells")


def test_image_table_order_differs_from_manifest_and_extra_filename_columns(plate):
    # The Image table also lists a mask channel whose files are not plate images: the Phase column is the one.
    image = [
        ["ImageNumber", "FileName_Mask", "FileName_Phase"],
        [1, "mask1.png", "img1.tif"],
        [2, "mask0.png", "img0.tif"],
    ]
    _write(plate / "Image.csv", image)
    _write(plate / "Cells.csv", CELLS)
    pd.testing.assert_frame_equal(_read(plate).table, EXPECTED)


def test_single_image_plate_needs_no_image_table_only_when_unambiguous(tmp_path):
    plate = write_tiny_plate(tmp_path / "one", n=1, size=(64, 64))
    _write(
        plate / "Cells.csv",
        [["ImageNumber", "ObjectNumber", "Location_Center_X", "Location_Center_Y"], [1, 1, 1.5, 2.5], [1, 2, 3.5, 4.5]],
    )
    assert _read(plate).table.to_dict("list") == {"image": ["img0.tif"] * 2, "x": [1.5, 3.5], "y": [2.5, 4.5]}
    _write(
        plate / "Cells.csv",
        [["ImageNumber", "ObjectNumber", "Location_Center_X", "Location_Center_Y"], [1, 1, 1.5, 2.5], [2, 1, 3.5, 4.5]],
    )
    with pytest.raises(PlateError, match="no CellProfiler Image table"):
        _read(plate)


def test_no_tables_gives_none_and_plate_files_are_not_tables(plate):
    assert _read(plate) is None
    pd.DataFrame({"image": ["img0.tif"], "x": [1.0], "y": [1.0]}).to_csv(plate / "ground_truth.csv", index=False)
    (plate / "._Cells.csv").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    assert _read(plate) is None


# ---------------------------------------------------------------- errors in values


@pytest.mark.parametrize(
    "column, value, problem",
    [
        ("Location_Center_X", "nan", "not a finite number"),
        ("Location_Center_Y", "NaN", "not a finite number"),
        ("Location_Center_X", "inf", "not a finite number"),
        ("Location_Center_Y", "", "not a number"),
        ("Location_Center_X", "12,5px", "not a number"),
        ("Location_Center_X", "64", "outside image 'img0.tif'"),
        ("Location_Center_Y", "64.0", "outside image 'img0.tif'"),
        ("Location_Center_X", "-0.5", "outside image 'img0.tif'"),
    ],
)
def test_bad_centre_names_file_line_and_column(plate, column, value, problem):
    rows = [list(r) for r in CELLS]
    rows[3][rows[0].index(column)] = value  # line 4: ImageNumber 2 = img0.tif
    _write(plate / "Cells.csv", rows)
    _write(plate / "Image.csv", IMAGE)
    with pytest.raises(PlateError, match=rf"Cells\.csv: line 4, column '{column}'.*{problem}"):
        _read(plate)


def test_measurements_may_be_nan_inf_or_empty(plate):
    rows = [
        [
            "ImageNumber",
            "ObjectNumber",
            "Location_Center_X",
            "Location_Center_Y",
            "AreaShape_Area",
            "AreaShape_Solidity",
            "AreaShape_FormFactor",
        ],
        [1, 1, 1.0, 2.0, "nan", "inf", ""],
        [1, 2, 5.0, 6.0, 1, 1, 1],
        [2, 1, 3.0, 4.0, 50, 0.9, 0.5],
    ]
    _write(plate / "Cells.csv", rows)
    _write(plate / "Image.csv", IMAGE)
    table = _read(plate).table
    assert table[["area", "solidity", "form_factor"]].iloc[0].isna().all()
    assert table[["area", "solidity", "form_factor"]].iloc[2].tolist() == [50.0, 0.9, 0.5]


def test_imagenumber_missing_from_the_image_table(plate):
    rows = [list(r) for r in CELLS] + [[3, 1, 10, 1.0, 1.0]]
    _write(plate / "Cells.csv", rows)
    _write(plate / "Image.csv", IMAGE)
    with pytest.raises(PlateError, match=r"Cells\.csv: line 5, column 'ImageNumber': 3 is not in the Image table"):
        _read(plate)


def test_image_table_naming_files_not_in_the_manifest(plate):
    image = [list(r) for r in IMAGE]
    image[2][2] = "other.tif"
    _write(plate / "Cells.csv", CELLS)
    _write(plate / "Image.csv", image)
    with pytest.raises(PlateError, match=r"Image\.csv: .*not in the plate's manifest.*'other\.tif' \(line 3\)"):
        _read(plate)


def test_image_table_problems(plate):
    _write(plate / "Cells.csv", CELLS)
    _write(plate / "Image.csv", [["ImageNumber", "PathName_Phase"], [1, "/a"], [2, "/a"]])
    with pytest.raises(PlateError, match=r"Image\.csv: .*without a FileName_"):
        _read(plate)
    _write(
        plate / "Image.csv",
        [["ImageNumber", "FileName_A", "FileName_B"], [1, "img1.tif", "img0.tif"], [2, "img0.tif", "img1.tif"]],
    )
    with pytest.raises(PlateError, match=r"Image\.csv: .*several FileName_ columns"):
        _read(plate)
    _write(plate / "Image.csv", [["ImageNumber", "FileName_Phase"], [1, "img1.tif"], [2, "img1.tif"]])
    with pytest.raises(PlateError, match=r"Image\.csv: lines \[2, 3\]: several image sets name 'img1\.tif'"):
        _read(plate)
    image = [list(r) for r in IMAGE]
    image[1][4] = 512  # Height_Phase of img1.tif
    _write(plate / "Image.csv", image)
    with pytest.raises(PlateError, match=r"Image\.csv: line 2: 'img1\.tif' is 64x512 .* the file is 64x64"):
        _read(plate)
    _write(plate / "Image.csv", IMAGE)
    _write(plate / "MyExpt_Image.csv", IMAGE)
    with pytest.raises(PlateError, match="several CellProfiler Image tables"):
        _read(plate)


# ---------------------------------------------------------------- which tables


def test_unknown_table_is_an_error_never_a_silent_fallback(plate):
    _write(plate / "notes.txt", [["sample", "comment"], ["A", "looked fine"]])
    with pytest.raises(PlateError, match=r"notes\.txt: not a table gbm-assets understands.*CellProfiler"):
        _read(plate)


def test_unknown_table_beside_a_good_one_is_still_an_error(plate):
    _write(plate / "Cells.csv", CELLS)
    _write(plate / "Image.csv", IMAGE)
    _write(plate / "plate_map.tsv", [["well", "culture"], ["B2", "U87"]], "\t")
    with pytest.raises(PlateError, match=r"plate_map\.tsv: not a table"):
        _read(plate)


def test_cellprofiler_like_table_that_cannot_be_used(plate):
    _write(plate / "Wells.csv", [["Metadata_Well", "Metadata_Culture"], ["B2", "U87"]])
    with pytest.raises(PlateError, match=r"Wells\.csv: looks like a CellProfiler table.*neither ObjectNumber"):
        _read(plate)
    (plate / "Wells.csv").unlink()
    _write(plate / "Cells.csv", [["ImageNumber", "ObjectNumber", "AreaShape_Area"], [1, 1, 5]])
    _write(plate / "Image.csv", IMAGE)
    with pytest.raises(PlateError, match=r"Cells\.csv: .*no centre columns"):
        _read(plate)


def test_several_object_tables_need_a_choice(plate):
    nuclei = [list(r) for r in CELLS]
    for r in nuclei[1:]:
        r[3], r[4] = r[3] + 1, r[4] + 1
    _write(plate / "MyExpt_Cells.csv", CELLS)
    _write(plate / "MyExpt_Nuclei.csv", nuclei)
    _write(plate / "MyExpt_Image.csv", IMAGE)
    with pytest.raises(
        PlateError,
        match=r"several CellProfiler object tables: Cells \(MyExpt_Cells\.csv\), "
        r"Nuclei \(MyExpt_Nuclei\.csv\); set cellprofiler_objects",
    ):
        _read(plate)
    pd.testing.assert_frame_equal(_read(plate, "Cells").table, EXPECTED)
    found = _read(plate, "Nuclei")
    assert found.path.name == "MyExpt_Nuclei.csv" and found.table["x"].tolist() == [11.25, 31.0, 6.5]
    with pytest.raises(PlateError, match=r"cellprofiler_objects is 'Cytoplasm' but .* hold Cells"):
        _read(plate, "Cytoplasm")


def test_experiment_and_relationship_tables_are_ignored(plate):
    _write(plate / "Cells.csv", CELLS)
    _write(plate / "Image.csv", IMAGE)
    # The Experiment table holds the pipeline text (commas, tabs, new lines) as one quoted value.
    _write(
        plate / "Experiment.csv", [["Key", "Value"], ["Pipeline_Pipeline", 'a,b\tc\n"d"; e'], ["Run_Timestamp", "x"]]
    )
    _write(
        plate / "Object relationships.csv",
        [
            [
                "Module",
                "Module Number",
                "Relationship",
                "First Object Name",
                "First Image Number",
                "First Object Number",
                "Second Object Name",
                "Second Image Number",
                "Second Object Number",
            ],
            ["IdentifySecondaryObjects", 3, "Parent", "Nuclei", 1, 1, "Cells", 1, 1],
        ],
    )
    pd.testing.assert_frame_equal(_read(plate).table, EXPECTED)


def test_only_an_experiment_table_is_an_error_not_none(plate):
    _write(plate / "Experiment.csv", [["Key", "Value"], ["CellProfiler_Version", "4.2.6"]])
    with pytest.raises(PlateError, match="no object table"):
        _read(plate)


# ---------------------------------------------------------------- the asset


def test_cell_coordinates_asset_uses_the_tab_delimited_case(tmp_path):
    from gbm_assets.assets.cells import cell_coordinates
    from gbm_assets.assets.partitions import plates
    from gbm_assets.assets.raw_plates import raw_plates
    from gbm_assets.assets.resources import DataDirs
    from gbm_assets.paths import plate_file

    data_root = tmp_path / "data"
    shutil.copytree(_case(CASE_TAB), data_root / "raw" / "cp-tab")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, ["cp-tab"])
    result = dg.materialize(
        [raw_plates, cell_coordinates],
        partition_key="cp-tab",
        instance=instance,
        resources={"data": DataDirs(root=str(data_root))},
        run_config={"ops": {"cell_coordinates": {"config": {"workers": 1}}}},
    )
    assert result.success
    meta = result.asset_materializations_for_node("cell_coordinates")[0].metadata
    assert meta["source"].value == "CellProfiler table MyExpt_Cells.csv, objects Cells"
    coords = pd.read_parquet(plate_file(data_root / "cell_coordinates.parquet", "cp-tab"))
    assert coords.groupby("image").size().to_dict() == {"t07.tif": 15, "t13.tif": 20}
    rows = _rows_of(CASE_TAB / "MyExpt_Cells.csv")
    assert np.array_equal(coords["x"].to_numpy(), [float(r["Location_Center_X"]) for r in rows])


def test_manifest_images_missing_from_the_image_table_are_an_error(plate):
    """CellProfiler did not process img0.tif: its cells are unknown, not zero."""
    _write(
        plate / "Cells.csv", [["ImageNumber", "ObjectNumber", "Location_Center_X", "Location_Center_Y"], [1, 1, 3, 4]]
    )
    _write(plate / "Image.csv", IMAGE[:2])
    with pytest.raises(
        PlateError, match=r"Image\.csv: 1 manifest image\(s\) are not image sets of this table \(\['img0\.tif'\]\)"
    ):
        _read(plate)


def test_count_column_disagreeing_with_the_object_rows_is_an_error(plate):
    """A truncated object table: Image.csv counts 2 cells in img1.tif, the object table has 1."""
    rows = [["ImageNumber", "ObjectNumber", "Location_Center_X", "Location_Center_Y"], [1, 1, 3, 4], [2, 1, 5, 6]]
    _write(plate / "Cells.csv", rows)
    _write(plate / "Image.csv", IMAGE)
    with pytest.raises(
        PlateError,
        match=r"Image\.csv: line 2, column 'Count_Cells': 2 objects for 'img1\.tif', but the object table has 1",
    ):
        _read(plate)


@pytest.mark.parametrize("written", ["C:\\data\\exp12\\img1.tif", "/data/exp12/img1.tif"])
def test_file_names_written_with_a_folder_match_by_base_name(plate, written):
    rows = [
        ["ImageNumber", "ObjectNumber", "Location_Center_X", "Location_Center_Y"],
        [1, 1, 3, 4],
        [1, 2, 5, 6],
        [2, 1, 7, 8],
    ]
    _write(plate / "Cells.csv", rows)
    _write(plate / "Image.csv", [IMAGE[0], [1, 2, written, "x", 64, 64], IMAGE[2]])
    assert _read(plate).table["image"].tolist() == ["img1.tif", "img1.tif", "img0.tif"]


@pytest.mark.parametrize("suffix", [".xlsx", ".ods"])
def test_a_workbook_in_the_plate_folder_is_an_error_not_ignored(plate, suffix):
    (plate / f"Cells{suffix}").write_bytes(b"PK\x03\x04 workbook")
    with pytest.raises(PlateError, match=rf"Cells\{suffix}: a spreadsheet workbook .* save the table as CSV"):
        _read(plate)


def _export_to_database(path: Path) -> Path:
    """A SQLite file as CellProfiler's ExportToDatabase writes it (Per_Image, Per_Object)."""
    import sqlite3

    with sqlite3.connect(path) as db:
        pd.DataFrame({"ImageNumber": [1, 2], "Image_FileName_Phase": ["img1.tif", "img0.tif"]}).to_sql(
            "Per_Image", db, index=False
        )
        pd.DataFrame(
            {
                "ImageNumber": [1, 1, 2],
                "ObjectNumber": [1, 2, 1],
                "Cells_Location_Center_X": [10.25, 30.0, 5.5],
                "Cells_Location_Center_Y": [20.5, 40.75, 6.0],
            }
        ).to_sql("Per_Object", db, index=False)
    return path


@pytest.mark.parametrize("name", ["DefaultDB.db", "MyExpt.sqlite", "DefaultOUT.h5", "DefaultOUT.mat"])
def test_a_cellprofiler_database_in_the_plate_folder_is_an_error_not_ignored(plate, name):
    # Our segmentation must not silently replace the cells of a CellProfiler run saved as a database.
    if name.endswith(".db"):
        _export_to_database(plate / name)
    else:
        (plate / name).write_bytes(b"\x89HDF\r\n\x1a\n measurements")
    with pytest.raises(PlateError, match=rf"{re.escape(name)}: a CellProfiler database .* ExportToSpreadsheet"):
        _read(plate)


def test_windows_thumbs_db_beside_the_images_is_no_database(plate):
    (plate / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1 thumbnail cache")
    assert _read(plate) is None


def test_add_plate_refuses_a_cellprofiler_database_naming_the_users_file(tmp_path):
    from gbm_assets.imaging.plate_import import make_plate

    source = write_tiny_plate(tmp_path / "export", n=2, size=(64, 64))
    (source / "manifest.csv").unlink()
    _export_to_database(source / "DefaultDB.db")
    with pytest.raises(PlateError, match=r"export/DefaultDB\.db: a CellProfiler database"):
        make_plate(source, tmp_path / "raw", "p", culture="A")
    assert not (tmp_path / "raw" / "p").exists()
