"""Making plates from instrument exports, plate maps, stacks and folders: values right, failures clean."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile

from gbm_assets.errors import ImageReadError, PlateError
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.plate_import import elapsed_hours, make_plate, parse_instrument_name, read_plate_map
from gbm_assets.imaging.plates import find_ready_plates, read_manifest, safe_plate_id, validate_plate


def _export(folder, wells, positions=(1,), stamps=("00d00h00m",), vessel="GBM03", channel="Phase", size=(48, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for well in wells:
        for pos in positions:
            for stamp in stamps:
                tifffile.imwrite(
                    folder / f"{vessel}_{channel}_{well}_{pos}_{stamp}.tif",
                    rng.integers(0, 4000, size=size).astype(np.uint16),
                )
    return folder


@pytest.mark.parametrize(
    "name, hours",
    [
        ("GBM03_Phase_B2_1_00d04h00m.tif", 4.0),
        ("GBM03_Phase_B2_1_01d04h00m.tif", 28.0),
        ("GBM03_Phase_B2_1_02d04h30m.tif", 52.5),
        ("x_05d23h59m.jpg", 5 * 24 + 23 + 59 / 60),
        ("t07.tif", None),
    ],
)
def test_elapsed_time_in_names(name, hours):
    assert elapsed_hours(name) == pytest.approx(hours) if hours is not None else elapsed_hours(name) is None


@pytest.mark.parametrize(
    "name, well, position, group, hours",
    [
        ("My_Vessel_2_Phase_B02_3_02d04h30m.tif", "B2", "3", "My_Vessel_2_Phase", 52.5),  # Incucyte S3
        ("VID193_A1_1_2016y06m23d_11h41m.tif", "A1", "1", "VID193", None),  # Incucyte Zoom, absolute time
        ("A172_Phase_C7_1_01d00h00m_2.tif", "C7", "1_2", "A172_Phase", 24.0),  # LIVECell tile 2 of a field
    ],
)
def test_instrument_name_parts(name, well, position, group, hours):
    parsed = parse_instrument_name(name)
    assert (parsed.well, parsed.position, parsed.group) == (well, position, group)
    if hours is not None:
        assert parsed.timepoint_h == pytest.approx(hours)


def test_other_names_are_not_instrument_names():
    assert parse_instrument_name("t07.tif") is None
    assert parse_instrument_name("GBM Zürich 01 t07.tif") is None


def test_thesis_plate_from_export_and_plate_map(tmp_path):
    """One culture at one concentration, 8 replicate wells, hourly: one command makes the plate."""
    wells = ["B2", "B3", "B4", "B5", "C2", "C3", "C4", "C5"]
    export = _export(tmp_path / "export", wells, positions=(1, 2), stamps=("00d00h00m", "00d01h00m", "00d02h00m"))
    # As a European-locale spreadsheet saves it: BOM, semicolons, CRLF, zero-padded wells, a trailing empty row.
    lines = ["Well;Culture;Concentration;Replicate"] + [f"{w[0]}0{w[1]};GBM03;0,5;{i + 1}" for i, w in enumerate(wells)]
    (tmp_path / "map.csv").write_bytes(("\ufeff" + "\r\n".join(lines + [";;;", ""])).encode("utf-8"))
    plate = make_plate(export, tmp_path / "raw", "gbm03-c05", plate_map=tmp_path / "map.csv")
    m = read_manifest(plate)
    assert len(m) == 8 * 2 * 3
    assert sorted(m["timepoint_h"].unique()) == [0.0, 1.0, 2.0]
    assert sorted(m["replicate"].unique()) == list(range(1, 9))
    assert set(m["culture"]) == {"GBM03"} and set(m["concentration"]) == {"0.5"}
    row = m[m["image"] == "GBM03_Phase_C4_2_00d02h00m.tif"].iloc[0]
    assert (row.well, row.position, row.replicate, row.timepoint_h) == ("C4", "2", 7, 2.0)
    assert validate_plate(plate).n_images == 48


def test_plate_map_must_cover_every_well(tmp_path):
    export = _export(tmp_path / "export", ["B2", "D7"])
    (tmp_path / "map.csv").write_text("well,culture\nB2,GBM03\n")
    with pytest.raises(PlateError, match=r"D7.*well D7 is not in"):
        make_plate(export, tmp_path / "raw", "p", plate_map=tmp_path / "map.csv")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


@pytest.mark.parametrize(
    "content, message",
    [
        ("culture\nGBM03\n", "needs a 'well' column"),
        ("well\nB2\n", "at least one of"),
        ("well,culture\nB2,A\nb02,B\n", "B2 is listed more than once"),
        ("well,replicate\nB2,1.5\n", r"line 2, column 'replicate'.*not a whole number"),
        # a column named otherwise would be dropped, leaving the default for every well
        ("Well,Culture,Conc\nB2,A,1000\n", r"column 'conc' looks like 'concentration'"),
        ("well,culture,Rep.\nB2,A,1\n", r"column 'rep.' looks like 'replicate'"),
        # a plate drawn as a grid (rows A-H, columns 1-12), as labs keep plate maps in spreadsheets
        (",1,2,3\nA,GBM03,GBM03,GBM05\nB,GBM03,GBM05,GBM05\n", r"needs a 'well' column.*a plate drawn as a grid"),
    ],
)
def test_bad_plate_maps(tmp_path, content, message):
    (tmp_path / "map.csv").write_text(content)
    with pytest.raises(PlateError, match=message):
        read_plate_map(tmp_path / "map.csv")


@pytest.mark.parametrize("name", ["map.xlsx", "map.csv"])
def test_a_plate_map_saved_as_a_workbook_says_save_it_as_csv(tmp_path, name):
    """An .xlsx (a ZIP archive), whatever its name, is named as a workbook, not as unreadable."""
    import zipfile

    with zipfile.ZipFile(tmp_path / name, "w") as workbook:
        workbook.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(PlateError, match=rf"{re.escape(name)}: is a spreadsheet workbook .* save it as CSV"):
        read_plate_map(tmp_path / name)


def test_plate_map_wells_written_with_a_separator_are_the_wells_of_the_names(tmp_path):
    export = _export(tmp_path / "export", ["B2", "D7"])
    (tmp_path / "map.csv").write_text("well,culture\nB-02,GBM03\nd_07,GBM05\n")
    m = read_manifest(make_plate(export, tmp_path / "raw", "p", plate_map=tmp_path / "map.csv"))
    assert dict(zip(m["well"], m["culture"], strict=True)) == {"B2": "GBM03", "D7": "GBM05"}


def test_plate_map_needs_wells_in_names(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    tifffile.imwrite(source / "t07.tif", np.zeros((32, 32), np.uint16))
    (tmp_path / "map.csv").write_text("well,culture\nB2,A\n")
    with pytest.raises(PlateError, match="no well in the file name"):
        make_plate(source, tmp_path / "raw", "p", plate_map=tmp_path / "map.csv")


def test_mixed_vessels_or_channels_are_refused(tmp_path):
    export = _export(tmp_path / "export", ["B2"])
    _export(tmp_path / "export", ["B2"], channel="Green")
    with pytest.raises(PlateError, match=r"2 vessels or channels.*--include"):
        make_plate(export, tmp_path / "raw", "p", culture="A")
    plate = make_plate(export, tmp_path / "raw", "p", culture="A", include="GBM03_Phase_*")
    assert read_manifest(plate)["image"].tolist() == ["GBM03_Phase_B2_1_00d00h00m.tif"]


def test_absolute_time_stamps_count_from_the_first_scan(tmp_path):
    export = _export(tmp_path / "export", ["A1"], stamps=("2024y03m31d_22h00m", "2024y04m01d_01h30m"))
    m = read_manifest(make_plate(export, tmp_path / "raw", "p", culture="A"))
    assert m["timepoint_h"].tolist() == [0.0, 3.5]


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"(\d+)d(\d+)h", "has 2 groups; it needs exactly one"),
        (r"_B(\d)_", "gives all 3 images the same time point"),
        (r"(GBM)03", r"group matched 'GBM', not a number"),
        (r"t(\d+", "not a regular expression"),
    ],
)
def test_timepoint_pattern_errors(tmp_path, pattern, message):
    export = _export(tmp_path / "export", ["B2"], stamps=("00d04h00m", "01d04h00m", "02d04h30m"))
    with pytest.raises(PlateError, match=message):
        make_plate(export, tmp_path / "raw", "p", culture="A", timepoint_pattern=pattern)


def test_stack_becomes_one_image_per_frame(tmp_path):
    frames = np.stack([np.full((40, 50), 100 * (k + 1), np.uint16) for k in range(3)])
    frames[:, 5, 5] = 7
    source = tmp_path / "src"
    source.mkdir()
    tifffile.imwrite(source / "xy01.tif", frames, imagej=True, metadata={"axes": "TYX"})
    plate = make_plate(source, tmp_path / "raw", "stack", culture="A", frame_interval_h=0.5)
    m = read_manifest(plate)
    assert m["image"].tolist() == [f"xy01_frame{k:03d}.tif" for k in range(3)]
    assert m["frame"].tolist() == ["0", "1", "2"] and m["source"].tolist() == ["xy01.tif"] * 3
    assert m["timepoint_h"].tolist() == [0.0, 0.5, 1.0]
    for k, name in enumerate(m["image"]):
        assert np.array_equal(read_image(plate / name), frames[k])


@pytest.mark.parametrize("broken", ["header", "pixels"])
def test_failed_add_plate_leaves_no_plate(tmp_path, broken):
    """A file still being copied: its header (found while planning) or its pixels (found while
    validating the staged plate) are bad; either way no plate and no staging folder is left."""
    source = tmp_path / "src"
    source.mkdir()
    tifffile.imwrite(source / "a.tif", np.zeros((32, 32), np.uint16))
    if broken == "header":
        (source / "b.tif").write_bytes(b"II*\x00 still copying")
    else:
        tifffile.imwrite(source / "b.tif", np.arange(256 * 256, dtype=np.uint16).reshape(256, 256))
        data = (source / "b.tif").read_bytes()
        (source / "b.tif").write_bytes(data[: len(data) // 2])
    raw = tmp_path / "raw"
    with pytest.raises(ImageReadError, match=r"b\.tif"):
        make_plate(source, raw, "p", culture="A")
    assert not raw.exists() or list(raw.iterdir()) == []  # no plate, no staging folder
    assert find_ready_plates(raw) == []


def test_existing_plate_is_not_overwritten(tmp_path):
    export = _export(tmp_path / "export", ["B2"])
    plate = make_plate(export, tmp_path / "raw", "p", culture="A")
    before = (plate / "manifest.csv").read_bytes()
    with pytest.raises(PlateError, match="already exists"):
        make_plate(export, tmp_path / "raw", "p", culture="B")
    assert (plate / "manifest.csv").read_bytes() == before


def test_plate_id_derived_from_folder_name(tmp_path):
    source = _export(tmp_path / "GBM03 plate 1 (Zürich)", ["B2"])
    plate = make_plate(source, tmp_path / "raw", culture="A")
    assert plate.name == safe_plate_id("GBM03 plate 1 (Zürich)") == "GBM03-plate-1-Zurich"
    with pytest.raises(PlateError, match=r"not a safe name.*'GBM03-plate-1'"):
        make_plate(source, tmp_path / "raw", "GBM03 plate 1", culture="A")


def test_stack_frame_interval_from_ome_metadata(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    frames = np.stack([np.full((32, 40), k, np.uint16) for k in range(4)])
    tifffile.imwrite(
        source / "pos1.ome.tif",
        frames,
        ome=True,
        metadata={"axes": "TYX", "TimeIncrement": 30, "TimeIncrementUnit": "min"},
    )
    m = read_manifest(make_plate(source, tmp_path / "raw", "ome", culture="A"))
    assert m["image"].tolist() == [f"pos1_frame{k:03d}.tif" for k in range(4)]
    assert m["timepoint_h"].tolist() == [0.0, 0.5, 1.0, 1.5]


def test_irregular_ome_time_lapse_keeps_each_planes_recorded_time(tmp_path):
    # An OME-TIFF time-lapse records each plane's time (Plane DeltaT) but no regular TimeIncrement
    # (a pause overnight, a microscope that waits for autofocus): frames are at those times, never
    # at a guessed one-hour step. Frame 0's DeltaT (acquisition started 2 min in) is the origin.
    source = tmp_path / "src"
    source.mkdir()
    frames = np.stack([np.full((32, 40), k, np.uint16) for k in range(4)])
    delta_min = [2, 32, 92, 272]  # 0, 0.5, 1.5 and 4.5 h after the first frame
    tifffile.imwrite(
        source / "pos1.ome.tif",
        frames,
        ome=True,
        metadata={"axes": "TYX", "Plane": {"DeltaT": delta_min, "DeltaTUnit": ["min"] * 4}},
    )
    m = read_manifest(make_plate(source, tmp_path / "raw", "ome", culture="A"))
    assert m["timepoint_h"].tolist() == [0.0, 0.5, 1.5, 4.5]
    # An interval given by hand still wins.
    m = read_manifest(make_plate(source, tmp_path / "raw", "by-hand", culture="A", frame_interval_h=2))
    assert m["timepoint_h"].tolist() == [0.0, 2.0, 4.0, 6.0]


def test_imagej_time_lapse_interval_in_days(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    frames = np.stack([np.full((32, 40), k, np.uint16) for k in range(3)])
    tifffile.imwrite(
        source / "daily.tif", frames, imagej=True, metadata={"axes": "TYX", "finterval": 1, "tunit": "day"}
    )
    m = read_manifest(make_plate(source, tmp_path / "raw", "daily", culture="A"))
    assert m["timepoint_h"].tolist() == [0.0, 24.0, 48.0]


def test_stack_frames_may_not_collide_with_another_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    tifffile.imwrite(
        export / "GBM03_Phase_B2_1_00d04h00m.tif",
        np.zeros((3, 32, 40), np.uint16),
        imagej=True,
        metadata={"axes": "TYX", "finterval": 1800},
    )
    tifffile.imwrite(export / "GBM03_Phase_B2_1_00d05h00m.tif", np.zeros((32, 40), np.uint16))
    with pytest.raises(
        PlateError, match=r"00d05h00m\.tif' has the same well B2, position 1 and time \(5 h\) as .*_frame002\.tif"
    ):
        make_plate(export, tmp_path / "raw", "p", culture="A")


def test_plate_id_of_one_ome_file_drops_its_double_suffix(tmp_path):
    tifffile.imwrite(tmp_path / "pos1.ome.tif", np.zeros((2, 16, 16), np.uint16), ome=True, metadata={"axes": "TYX"})
    assert make_plate(tmp_path / "pos1.ome.tif", tmp_path / "raw", culture="A").name == "pos1"


def test_plate_map_linked_to_a_private_file_is_not_quoted(tmp_path):
    secret = tmp_path / "private.txt"
    secret.write_text("SECRET-TOKEN-abc123\n")
    (tmp_path / "map.csv").symlink_to(secret)
    with pytest.raises(PlateError, match="needs a 'well' column; its header has 1 column") as err:
        read_plate_map(tmp_path / "map.csv")
    assert "abc123" not in str(err.value).lower()


# ---------------------------------------------------------------- what an export folder holds besides images


def test_time_by_z_hyperstack_is_refused_not_given_a_time_point_per_plane(tmp_path):
    """3 time points x 2 focal planes: frame k is not at k hours, and two planes of one time point
    would count the same cells twice; the file is refused, naming both axes, and no plate is left."""
    source = tmp_path / "src"
    source.mkdir()
    data = np.zeros((3, 2, 32, 40), np.uint16)
    tifffile.imwrite(source / "xy01.tif", data, imagej=True, metadata={"axes": "TZYX", "finterval": 3600})
    with pytest.raises(PlateError, match=r"xy01\.tif: is a stack of 3 time points x 2 focal planes \(Z\)"):
        make_plate(source, tmp_path / "raw", "tz", culture="A")
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


@pytest.mark.parametrize(
    "name, options", [("zstack.ome.tif", {"ome": True, "metadata": {"axes": "ZYX", "PhysicalSizeZ": 2.0}})]
)
def test_a_stack_of_focal_planes_is_refused_not_read_as_a_time_lapse(tmp_path, name, options):
    """An OME Z series, or an ImageJ stack with a z-step, is 3 planes of one moment: frame k at k
    hours would be invented, and the same cells would be counted three times."""
    source = tmp_path / "src"
    source.mkdir()
    tifffile.imwrite(source / name, np.zeros((3, 32, 40), np.uint16), **options)
    with pytest.raises(PlateError, match=rf"{re.escape(name)}: is a stack of 3 focal planes \(Z\) of one time point"):
        make_plate(source, tmp_path / "raw", "z", culture="A")
    assert not (tmp_path / "raw" / "z").exists()


@pytest.mark.parametrize(
    "metadata", [{"axes": "ZYX"}, {"axes": "ZYX", "spacing": 0.65, "unit": "micron"}], ids=["plain", "calibrated"]
)
def test_an_imagej_stack_of_slices_is_still_a_time_lapse(tmp_path, metadata):
    """ImageJ calls every plain stack (a time-lapse opened as an image sequence) "slices", and writes
    a z-step (spacing, the pixel width) for any calibrated image: neither makes it focal planes."""
    source = tmp_path / "src"
    source.mkdir()
    tifffile.imwrite(source / "seq.tif", np.zeros((3, 32, 40), np.uint16), imagej=True, metadata=metadata)
    m = read_manifest(make_plate(source, tmp_path / "raw", "seq", culture="A"))
    assert m["timepoint_h"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("nested", ["B2/GBM03_Phase_B2_1_00d04h00m.tif", "cp_output/MyExpt_Cells.csv"])
def test_images_or_tables_in_a_sub_folder_are_named_in_a_note_not_left_out_unsaid(tmp_path, nested, capsys):
    """An export written one sub-folder per well, or CellProfiler's tables in an output folder: the
    plate of the top-level files lacks them, and add-plate says so naming them (thumbnails and
    metadata folders are common in ordinary exports, so it is a note, not a refusal)."""
    from gbm_assets.cli import main

    source = _export(tmp_path / "export", ["B3"], stamps=("00d04h00m",))
    (source / nested).parent.mkdir()
    if nested.endswith(".tif"):
        tifffile.imwrite(source / nested, np.zeros((48, 64), np.uint16))
    else:
        (source / nested).write_text("ImageNumber,ObjectNumber,Location_Center_X,Location_Center_Y\n1,1,3,3\n")
    (source / "maps").mkdir()
    (source / "maps" / "map.csv").write_text("well,culture\nB2,A\nB3,A\n")
    args = ["add-plate", str(source), "--raw", str(tmp_path / "raw"), "--plate-map", str(source / "maps" / "map.csv")]
    assert main([*args, "--plate-id", "p"]) == 0
    err = capsys.readouterr().err
    assert f"1 image(s) or table(s) in sub-folders of {source} are not part of the plate" in err, err
    assert str(source / nested) in err and "map.csv" not in err
    assert read_manifest(tmp_path / "raw" / "p")["well"].tolist() == ["B3"]
    # Files the --include pattern leaves out, the plate map and hidden folders are not named.
    if nested.endswith(".tif"):
        assert main([*args, "--plate-id", "q", "--include", "*_B3_*"]) == 0
        assert "not part of the plate" not in capsys.readouterr().err


def test_add_plate_says_when_a_stack_records_no_frame_interval(tmp_path, capsys):
    from gbm_assets.cli import main

    source = tmp_path / "src"
    source.mkdir()
    tifffile.imwrite(source / "plain.tif", np.zeros((3, 32, 40), np.uint16), photometric="minisblack")  # 3 pages
    tifffile.imwrite(
        source / "timed.tif", np.zeros((2, 32, 40), np.uint16), imagej=True, metadata={"axes": "TYX", "finterval": 60}
    )
    assert main(["add-plate", str(source), "--culture", "A", "--raw", str(tmp_path / "raw"), "--plate-id", "p"]) == 0
    err = capsys.readouterr().err
    assert "plain.tif records no time between its frames, so they are 1 h apart" in err and "timed.tif" not in err
    args = ["add-plate", str(source), "--culture", "A", "--raw", str(tmp_path / "raw"), "--plate-id", "q"]
    assert main([*args, "--frame-interval-h", "0.5"]) == 0
    assert "records no time" not in capsys.readouterr().err


def _cellprofiler_export(folder):
    """Two fields and CellProfiler's tables beside them, ImageNumber 1 = b.tif (not the name order)."""
    folder.mkdir(parents=True)
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(folder / name, np.zeros((48, 64), np.uint16))
    (folder / "MyExpt_Image.csv").write_text("ImageNumber,FileName_Phase,Count_Cells\n1,b.tif,2\n2,a.tif,1\n")
    (folder / "MyExpt_Cells.csv").write_text(
        "ImageNumber,ObjectNumber,Location_Center_X,Location_Center_Y\n1,1,10.5,20\n1,2,30,40\n2,1,5,6\n"
    )
    return folder


def test_add_plate_carries_the_cellprofiler_tables_of_the_folder(tmp_path):
    """Left behind, the tables' cells would silently give way to our segmentation."""
    from gbm_assets.imaging.cellprofiler import read_plate_objects

    plate = make_plate(_cellprofiler_export(tmp_path / "export"), tmp_path / "raw", "cp", culture="A")
    objects = read_plate_objects(plate, read_manifest(plate))
    assert objects is not None and objects.objects_name == "Cells"
    assert objects.table[["image", "x", "y"]].values.tolist() == [
        ["b.tif", 10.5, 20.0],
        ["b.tif", 30.0, 40.0],
        ["a.tif", 5.0, 6.0],
    ]


def test_add_plate_checks_the_tables_it_carries_and_names_the_users_file(tmp_path):
    export = _cellprofiler_export(tmp_path / "export")
    with pytest.raises(PlateError, match=r"export/MyExpt_Image\.csv: the Image table names files that are not"):
        make_plate(export, tmp_path / "raw", "cp", culture="A", include="a*")
    (export / "notes.csv").write_text("what,when\nsplit,monday\n")
    with pytest.raises(PlateError, match=r"export/notes\.csv: not a table gbm-assets understands"):
        make_plate(export, tmp_path / "raw", "cp", culture="A")
    assert [p.name for p in (tmp_path / "raw").iterdir()] == []


def test_add_plate_of_a_folder_with_a_manifest_keeps_what_it_says(tmp_path):
    """A plate folder whose name is no safe id: its manifest's concentration, time points and
    extra columns are kept (not replaced by defaults), a stack it lists becomes frames at the
    row's time plus the recorded interval, and an option contradicting it is an error."""
    source = tmp_path / "GBM03 plate 1"
    source.mkdir()
    tifffile.imwrite(source / "t07.tif", np.zeros((32, 40), np.uint16))
    tifffile.imwrite(
        source / "xy02.tif", np.zeros((2, 32, 40), np.uint16), imagej=True, metadata={"axes": "TYX", "finterval": 1800}
    )
    (source / "manifest.csv").write_text(
        "image,culture,concentration,timepoint_h,operator\nt07.tif,GBM03,1000,7,ana\nxy02.tif,GBM03,500,3,ben\n"
    )
    m = read_manifest(make_plate(source, tmp_path / "raw", culture="GBM03"))
    assert m["image"].tolist() == ["t07.tif", "xy02_frame000.tif", "xy02_frame001.tif"]
    assert m["concentration"].tolist() == ["1000", "500", "500"]
    assert m["timepoint_h"].tolist() == [7.0, 3.0, 3.5]
    assert m["operator"].tolist() == ["ana", "ben", "ben"]
    assert m["source"].tolist() == ["t07.tif", "xy02.tif", "xy02.tif"]
    with pytest.raises(PlateError, match=r"manifest\.csv: --culture 'GBM04' contradicts the manifest"):
        make_plate(source, tmp_path / "raw", "other", culture="GBM04")
    with pytest.raises(PlateError, match=r"--timepoint-pattern cannot apply"):
        make_plate(source, tmp_path / "raw", "other", timepoint_pattern=r"t(\d+)")


def test_instrument_names_of_ome_tiffs_keep_their_well(tmp_path):
    """bfconvert and Fiji write <name>.ome.tif: the well, position and time are still in the name."""
    parsed = parse_instrument_name("GBM03_Phase_B2_3_01d02h30m.ome.tif")
    assert (parsed.group, parsed.well, parsed.position, parsed.timepoint_h) == ("GBM03_Phase", "B2", "3", 26.5)


def test_a_file_named_unlike_the_export_beside_it_is_an_error(tmp_path):
    """A stray 'copy (1)' would otherwise join the plate with well and position 'na' and time 0."""
    export = _export(tmp_path / "export", ["B2"], stamps=("00d00h00m", "00d01h00m"))
    tifffile.imwrite(export / "GBM03_Phase_B2_1_00d01h00m (1).tif", np.zeros((48, 64), np.uint16))
    with pytest.raises(PlateError, match=r"00d01h00m \(1\)\.tif: is not named like the instrument export beside it"):
        make_plate(export, tmp_path / "raw", "p", culture="A")


def test_a_concentration_option_written_otherwise_agrees_with_the_manifests_number(tmp_path):
    """`--concentration 1e3` (or 1000.0, "1 000") is the manifest's 1000, as in the manifest itself:
    it was refused as contradicting it; a different number still is."""
    source = tmp_path / "exp 12"
    source.mkdir()
    tifffile.imwrite(source / "t07.tif", np.zeros((32, 40), np.uint16))
    (source / "manifest.csv").write_text("image,culture,concentration\nt07.tif,GBM03,1000\n")
    for i, given in enumerate(["1e3", "1000.0", "1 000"]):
        m = read_manifest(make_plate(source, tmp_path / "raw", f"p{i}", culture="GBM03", concentration=given))
        assert m["concentration"].tolist() == ["1000"]
    with pytest.raises(
        PlateError, match=r"--concentration '500' contradicts the manifest, which has concentration '1000'"
    ):
        make_plate(source, tmp_path / "raw", "other", culture="GBM03", concentration="500")


def test_add_plate_errors_name_the_users_files_not_the_staging_copy(tmp_path):
    """Errors found while the plate is assembled name the file the user gave (the staging copy is
    gone when the message is read), and a time-point pattern that reads a date names the pattern."""
    source = tmp_path / "src"
    source.mkdir()
    tifffile.imwrite(source / "rgb3.tif", np.stack([np.full((32, 40), v, np.uint8) for v in (10, 90, 200)]))
    with pytest.raises(ImageReadError, match=rf"^{re.escape(str(source / 'rgb3.tif'))}: "):
        make_plate(source, tmp_path / "raw", "p", culture="A")
    (source / "rgb3.tif").unlink()
    for stamp in ("20230101", "20230102"):
        tifffile.imwrite(source / f"img_t{stamp}.tif", np.zeros((32, 40), np.uint16))
    with pytest.raises(
        PlateError, match=r"img_t20230101\.tif: the time-point pattern .+ reads '20230101' from its name"
    ):
        make_plate(source, tmp_path / "raw", "q", culture="A", timepoint_pattern=r"t(\d+)")
    assert not list((tmp_path / "raw").iterdir())
