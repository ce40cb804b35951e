"""The plate format: reading images, manifests, and every kind of bad input named clearly."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from gbm_assets.errors import ImageReadError, PlateError
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.plate_import import make_plate, read_plate_map
from gbm_assets.imaging.plates import MANIFEST_COLUMNS, check_plate_id, find_ready_plates, read_manifest, validate_plate
from gbm_assets_tests.conftest import write_tiny_plate


def test_valid_plate_defaults_optional_columns(tmp_path):
    plate = write_tiny_plate(tmp_path / "p1", n=3)
    summary = validate_plate(plate)
    assert summary.plate_id == "p1" and summary.n_images == 3
    assert (summary.height, summary.width, summary.bits) == (64, 64, 16)
    m = summary.manifest
    assert list(m["concentration"].unique()) == ["na"]
    assert m["replicate"].tolist() == [1, 1, 1] and m["timepoint_h"].tolist() == [0.0] * 3


def test_reads_8bit_tiff_and_png(tmp_path):
    img = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251
    tifffile.imwrite(tmp_path / "a.tif", img.astype(np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), (img * 200).astype(np.uint16))
    rgb = np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)
    cv2.imwrite(str(tmp_path / "c.png"), rgb)
    assert read_image(tmp_path / "a.tif").dtype == np.uint8
    assert np.array_equal(read_image(tmp_path / "b.png"), (img * 200).astype(np.uint16))
    assert np.array_equal(read_image(tmp_path / "c.png"), img.astype(np.uint8))


def test_corrupt_image_is_named(tmp_path):
    plate = write_tiny_plate(tmp_path / "p", n=3)
    (plate / "img1.tif").write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(ImageReadError, match=r"img1\.tif.*(unreadable|corrupt)"):
        validate_plate(plate)


def test_manifest_missing(tmp_path):
    plate = write_tiny_plate(tmp_path / "p")
    (plate / "manifest.csv").unlink()
    with pytest.raises(PlateError, match=r"manifest\.csv.*missing"):
        validate_plate(plate)


@pytest.mark.parametrize("column", ["image", "culture"])
def test_manifest_missing_required_column(tmp_path, column):
    plate = write_tiny_plate(tmp_path / "p")
    m = pd.read_csv(plate / "manifest.csv").drop(columns=[column])
    m.to_csv(plate / "manifest.csv", index=False)
    with pytest.raises(PlateError, match=rf"manifest\.csv.*required column.*{column}"):
        validate_plate(plate)


def test_manifest_row_without_file(tmp_path):
    plate = write_tiny_plate(tmp_path / "p")
    m = pd.read_csv(plate / "manifest.csv")
    m.loc[len(m)] = ["ghost.tif", "A"]
    m.to_csv(plate / "manifest.csv", index=False)
    with pytest.raises(PlateError, match=r"ghost\.tif.*does not exist"):
        validate_plate(plate)


def test_mixed_image_sizes(tmp_path):
    plate = write_tiny_plate(tmp_path / "p", n=2)
    tifffile.imwrite(plate / "img1.tif", np.zeros((32, 48), np.uint16))
    with pytest.raises(PlateError, match=r"img1\.tif.*mixed image sizes"):
        validate_plate(plate)


def test_empty_plate(tmp_path):
    plate = tmp_path / "p"
    plate.mkdir()
    (plate / "manifest.csv").write_text("image,culture\n")
    with pytest.raises(PlateError, match="empty plate"):
        validate_plate(plate)


@pytest.mark.parametrize("bad", ["..", "a/b", "a\\b", "x\x07y", "", ".hidden", "a..b", "sp ace"])
def test_unsafe_plate_ids(bad):
    with pytest.raises(PlateError, match="plate id"):
        check_plate_id(bad)


@pytest.mark.parametrize("name", ["../escape.tif", "/etc/passwd.tif", "sub/../../x.tif"])
def test_path_traversal_image_name(tmp_path, name):
    plate = write_tiny_plate(tmp_path / "p")
    pd.DataFrame({"image": [name], "culture": ["A"]}).to_csv(plate / "manifest.csv", index=False)
    with pytest.raises(PlateError, match="escapes the plate folder"):
        read_manifest(plate)


def test_non_numeric_replicate(tmp_path):
    plate = write_tiny_plate(tmp_path / "p")
    m = pd.read_csv(plate / "manifest.csv")
    m["replicate"] = ["one", "two"]
    m.to_csv(plate / "manifest.csv", index=False)
    with pytest.raises(PlateError, match=r"manifest\.csv: line 2, column 'replicate': 'one' is not a number"):
        read_manifest(plate)


def test_find_ready_plates_needs_manifest_and_safe_name(tmp_path):
    write_tiny_plate(tmp_path / "ready")
    (tmp_path / "not_ready").mkdir()
    write_tiny_plate(tmp_path / "bad name")
    assert find_ready_plates(tmp_path) == ["ready"]


def test_t98g_frames_load_as_a_plate(tmp_path, t98g):
    """The real frames, linked (not copied) into a plate folder, validate as one plate."""
    plate = make_plate(t98g / "images", tmp_path, "t98g", "T98G", timepoint_pattern=r"t(\d+)\.tif")
    assert all((plate / n).is_symlink() for n in read_manifest(plate)["image"])
    summary = validate_plate(plate)
    assert summary.n_images == 6
    assert summary.manifest["timepoint_h"].tolist() == [7.0, 13.0, 19.0, 25.0, 31.0, 37.0]
    assert (summary.width, summary.height, summary.bits) == (1024, 1022, 16)
    assert summary.cultures == ["T98G"]


def _manifest_bytes(plate, text: str, encoding: str = "utf-8") -> None:
    (plate / "manifest.csv").write_bytes(text.encode(encoding))


@pytest.mark.parametrize(
    "text, encoding",
    [
        ("\ufeffImage,CULTURE , Timepoint_H\r\nimg0.tif,Zürich,1\r\nimg1.tif,Zürich,2\r\n,,\r\n,,\r\n", "utf-8"),
        ("image\tculture\ttimepoint_h\nimg0.tif\tZürich\t1,0\nimg1.tif\tZürich\t2\n\n", "utf-8"),
        ("image;culture;timepoint_h\r\nimg0.tif;Zürich;1,0\r\nimg1.tif;Zürich;2,0\r\n", "cp1252"),
        ("image\tculture\ttimepoint_h\r\nimg0.tif\tZürich\t1\r\nimg1.tif\tZürich\t2\r\n", "utf-16"),
        ('"image","culture","timepoint_h"\nimg0.tif,"Zürich",1\n"img1.tif",Zürich,2.0\n', "utf-8"),
        ("image,culture,timepoint_h,,\nimg0.tif,Zürich,1,,\nimg1.tif,Zürich,2,,\n", "utf-8"),
        ("sep=;\r\nimage;culture;timepoint_h\r\nimg0.tif;Zürich;1\r\nimg1.tif;Zürich;2\r\n", "utf-8"),
        # UTF-16 without a byte-order mark, as some instruments and scripts write it
        ("image\tculture\ttimepoint_h\r\nimg0.tif\tZürich\t1\r\nimg1.tif\tZürich\t2\r\n", "utf-16-le"),
        ("image\tculture\ttimepoint_h\nimg0.tif\tZürich\t1\nimg1.tif\tZürich\t2\n", "utf-16-be"),
        # the column names spelled otherwise, or with the unit in brackets
        ("Image;Culture;Time point (h)\nimg0.tif;Zürich;1\nimg1.tif;Zürich;2\n", "utf-8"),
        ("IMAGE,culture,TimePoint_Hours\nimg0.tif,Zürich,1\nimg1.tif,Zürich,2\n", "utf-8"),
    ],
)
def test_manifests_as_spreadsheets_save_them(tmp_path, text, encoding):
    plate = write_tiny_plate(tmp_path / "p")
    _manifest_bytes(plate, text, encoding)
    m = read_manifest(plate)
    assert m["image"].tolist() == ["img0.tif", "img1.tif"]
    assert m["culture"].tolist() == ["Zürich", "Zürich"] and m["timepoint_h"].tolist() == [1.0, 2.0]
    assert list(m.columns) == list(MANIFEST_COLUMNS)  # no nameless columns from trailing delimiters


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "image,culture,replicate\nimg0.tif,A,1\nimg1.tif,A,1.5\n",
            r"line 3, column 'replicate': '1.5' is not a whole number",
        ),
        (
            "image,culture,timepoint_h\nimg0.tif,A,inf\nimg1.tif,A,1\n",
            r"line 2, column 'timepoint_h': 'inf' is not a finite",
        ),
        (
            "image,culture,timepoint_h\nimg0.tif,A,nan\nimg1.tif,A,1\n",
            r"line 2, column 'timepoint_h': 'nan' is not a finite",
        ),
        (
            'image,culture,timepoint_h\nimg0.tif,A,"0,5"\nimg1.tif,A,1\n',
            r"line 2, column 'timepoint_h': '0,5' is not a number \(a decimal comma\?",
        ),
        ("image,culture\nimg0.tif,A\nimg1.tif,\n", r"line 3: empty culture"),
        ("image,culture,Culture\nimg0.tif,A,B\n", r"manifest repeats a column name"),
        ("image,culture\nimg0.tif,A,extra\n", r"line 2: 3 fields but the header has 2"),
        ("sep=,\nimage,culture,replicate\nimg0.tif,A,x\n", r"line 3, column 'replicate': 'x' is not a number"),
    ],
)
def test_manifest_value_errors_name_line_and_column(tmp_path, text, message):
    plate = write_tiny_plate(tmp_path / "p")
    _manifest_bytes(plate, text)
    with pytest.raises(PlateError, match=rf"manifest\.csv: {message}"):
        read_manifest(plate)


def test_manifest_names_match_files_in_any_unicode_normalisation(tmp_path):
    """macOS writes file names decomposed (NFD); spreadsheets write them composed (NFC)."""
    import unicodedata

    plate = write_tiny_plate(tmp_path / "p", n=1)
    nfd = unicodedata.normalize("NFD", "Zürich.tif")
    (plate / "img0.tif").rename(plate / nfd)
    _manifest_bytes(plate, "image,culture\nZürich.tif,A\n")
    summary = validate_plate(plate)
    assert summary.manifest["image"].tolist() == [nfd]


def test_manifest_names_match_a_file_differing_only_in_letter_case(tmp_path):
    """A manifest typed on Windows or macOS (file systems that ignore case) says T07.TIF for t07.tif:
    the one file of that name is used; with two such files, the name must be exact."""
    plate = write_tiny_plate(tmp_path / "p", n=2)
    (plate / "img0.tif").rename(plate / "t07.tif")
    (plate / "img1.tif").rename(plate / "sub.tif")
    _manifest_bytes(plate, "image,culture\nT07.TIF,A\nSub.tif,A\n")
    assert validate_plate(plate).manifest["image"].tolist() == ["t07.tif", "sub.tif"]
    (plate / "T07.tif").write_bytes((plate / "t07.tif").read_bytes())
    with pytest.raises(PlateError, match=r"lists 'T07\.TIF' but .* does not exist"):
        validate_plate(plate)


def test_a_time_point_that_is_a_spreadsheet_date_serial_or_in_seconds_is_refused(tmp_path):
    """Excel turns a date into its serial number (44927 = 1 January 2023) when the column is
    reformatted; read as hours it would put the image 5 years after plating, without a word."""
    plate = write_tiny_plate(tmp_path / "p", n=2)
    _manifest_bytes(plate, "image,culture,timepoint_h\nimg0.tif,A,144\nimg1.tif,A,44927\n")
    with pytest.raises(PlateError, match=r"line 3, column 'timepoint_h': 44927 h is more than a year after plating"):
        read_manifest(plate)
    _manifest_bytes(plate, "image,culture,timepoint_h\nimg0.tif,A,144\nimg1.tif,A,8760\n")  # a year: still hours
    assert read_manifest(plate)["timepoint_h"].tolist() == [144.0, 8760.0]


def test_one_culture_typed_two_ways_is_an_error_and_unicode_forms_are_one(tmp_path):
    """'GBM03' and 'gbm 03' in one manifest (or plate map) would silently be two cultures; 'Zürich'
    composed (Windows) and decomposed (macOS) is one culture, never two."""
    import unicodedata

    plate = write_tiny_plate(tmp_path / "p", n=3)
    _manifest_bytes(plate, "image,culture\nimg0.tif,GBM03\nimg1.tif,GBM03\nimg2.tif,gbm 03\n")
    with pytest.raises(PlateError, match=r"culture 'GBM03' \(line 2\) and 'gbm 03' \(line 4\) differ only in case"):
        read_manifest(plate)
    nfd = unicodedata.normalize("NFD", "GBM Zürich")
    _manifest_bytes(plate, f"image,culture\nimg0.tif,GBM Zürich\nimg1.tif,{nfd}\nimg2.tif,GBM Zug\n")
    assert read_manifest(plate)["culture"].tolist() == ["GBM Zürich", "GBM Zürich", "GBM Zug"]
    (tmp_path / "map.csv").write_text("well,culture\nB2,U87\nB3,u87\n")
    with pytest.raises(PlateError, match=r"map\.csv: culture 'U87' \(line 2\) and 'u87' \(line 3\)"):
        read_plate_map(tmp_path / "map.csv")
    # punctuation tells sorted subpopulations and lines apart: never taken for one culture
    (tmp_path / "map.csv").write_text("well,culture\nB2,CD133+\nB3,CD133-\nB4,GBM1.2\nB5,GBM12\n")
    assert read_plate_map(tmp_path / "map.csv")["culture"].tolist() == ["CD133+", "CD133-", "GBM1.2", "GBM12"]


def test_a_culture_spelled_two_ways_across_plates_is_named_in_a_warning(tmp_path):
    """'GBM03' in one plate and 'gbm 03' in another are each valid, but the report would count two
    cultures without a word: the clash is named, with the plates, for run and raw_plates to warn."""
    from gbm_assets.imaging.plates import culture_spelling_clashes

    raw = tmp_path / "raw"
    write_tiny_plate(raw / "p1", culture="GBM03")
    write_tiny_plate(raw / "p2", culture="gbm 03")
    write_tiny_plate(raw / "p3", culture="CD133+")
    write_tiny_plate(raw / "p4", culture="CD133-")
    clashes = culture_spelling_clashes(raw)
    assert clashes == [
        "culture spelled 2 ways ('GBM03' in p1; 'gbm 03' in p2): each counts as a culture of its own; "
        "write it one way in every plate's manifest if they are one culture"
    ]
    assert culture_spelling_clashes(raw, "p2") == clashes and culture_spelling_clashes(raw, "p3") == []
    _manifest_bytes(raw / "p2", "image,culture\nimg0.tif,GBM03\nimg1.tif,GBM03\n")
    assert culture_spelling_clashes(raw) == []


def test_manifest_linked_to_a_private_file_is_not_quoted(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN-hunter2\nrecovery=swordfish\n")
    plate = write_tiny_plate(tmp_path / "p")
    (plate / "manifest.csv").unlink()
    (plate / "manifest.csv").symlink_to(secret)
    with pytest.raises(PlateError, match="lacks required column") as err:
        read_manifest(plate)
    assert "hunter2" not in str(err.value) and "swordfish" not in str(err.value)


def test_one_concentration_written_several_ways_is_one_label(tmp_path):
    """A script writes 1000.0, a spreadsheet 1e3 or "1 000": one plated concentration, not four
    classes; a comma-decimal table's "1.000" may be a thousand and is kept as written."""
    plate = write_tiny_plate(tmp_path / "p", n=6)
    _manifest_bytes(
        plate,
        "image,culture,concentration\nimg0.tif,A,1000.0\nimg1.tif,A,1e3\nimg2.tif,A,1 000\n"
        "img3.tif,A,1000\nimg4.tif,A,0.50\nimg5.tif,A,1000 cells/well\n",
    )
    assert read_manifest(plate)["concentration"].tolist() == ["1000"] * 4 + ["0.5", "1000 cells/well"]
    _manifest_bytes(plate, "image;culture;concentration\nimg0.tif;A;0,50\nimg1.tif;A;1.000\nimg2.tif;A;1\u00a0000\n")
    assert read_manifest(plate)["concentration"].tolist()[:3] == ["0.5", "1.000", "1000"]


@pytest.mark.parametrize(
    "header, column",
    [
        ("image,culture,Time", "timepoint_h"),
        ("image,culture,time (min)", "timepoint_h"),
        ("image,culture,Elapsed", "timepoint_h"),
        ("image,culture,Rep", "replicate"),
        ("image,culture,Conc", "concentration"),
        ("image,culture,Site", "position"),
        ("image,culture,Well ID", "well"),
        ("File name,culture,timepoint_h", "image"),
    ],
)
def test_manifest_column_under_another_name_is_an_error_not_a_default(tmp_path, header, column):
    """Kept as an extra column, it would leave every image at the default (time 0, replicate 1...)."""
    plate = write_tiny_plate(tmp_path / "p", n=2)
    _manifest_bytes(plate, f"{header}\nimg0.tif,A,1\nimg1.tif,A,2\n")
    name = header.split(",")[2 if column != "image" else 0].strip().lower()
    with pytest.raises(PlateError, match=rf"manifest\.csv: column '{re.escape(name)}' looks like '{column}'"):
        read_manifest(plate)
