"""The pixel size: read from the file's header, supplied or checked by the manifest, one per plate,
carried into cell_coordinates and used by the report for areas in µm²."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from gbm_assets.analysis.cell_types import area_unit, cell_pixel_sizes, cluster_profiles
from gbm_assets.errors import ImageReadError, PlateError
from gbm_assets.imaging.pixel_size import coordinates_pixel_sizes, recorded_pixel_size
from gbm_assets.imaging.plate_import import make_plate
from gbm_assets.imaging.plates import read_manifest, validate_plate
from gbm_assets.paths import plate_file

IMAGE = np.random.default_rng(0).integers(0, 1000, (40, 48)).astype(np.uint16)


def _imagej(path, um, unit="micron"):
    tifffile.imwrite(path, IMAGE, imagej=True, resolution=(1 / um, 1 / um), metadata={"unit": unit})
    return path


def _ome(path, x, y=None, unit="nm"):
    meta = {"PhysicalSizeX": x, "PhysicalSizeXUnit": unit, "PhysicalSizeY": x if y is None else y}
    tifffile.imwrite(path, IMAGE, ome=True, metadata={**meta, "PhysicalSizeYUnit": unit})
    return path


def test_imagej_tiff_in_microns(tmp_path):
    """ImageJ's XResolution is pixels per `unit`; every spelling of micrometre gives the same µm."""
    for unit in ("micron", "um", "\\u00B5m"):
        size = recorded_pixel_size(_imagej(tmp_path / f"{len(unit)}.tif", 0.65, unit))
        assert size.um == pytest.approx(0.65, rel=1e-6) and "ImageJ" in size.source
    assert recorded_pixel_size(_imagej(tmp_path / "nm.tif", 325, "nm")).um == pytest.approx(0.325, rel=1e-6)
    assert recorded_pixel_size(_imagej(tmp_path / "px.tif", 1, "pixel")) is None  # uncalibrated ImageJ


def _metaseries(path, state: str, x: float, y: float, units: str = "um"):
    """A TIFF as MetaMorph / MetaXpress (ImageXpress) write it: MetaSeries XML, no resolution tags."""
    props = {"spatial-calibration-state": ("bool", state), "spatial-calibration-x": ("float", x)}
    props |= {"spatial-calibration-y": ("float", y), "spatial-calibration-units": ("string", units)}
    plane = "".join(f'<prop id="{k}" type="{t}" value="{v}"/>' for k, (t, v) in props.items())
    description = f"<MetaData><PlaneInfo>{plane}</PlaneInfo><SetInfo></SetInfo></MetaData>"
    tifffile.imwrite(path, IMAGE, description=description, software="MetaSeries", metadata=None)
    return path


def test_metamorph_metaxpress_tiff_spatial_calibration(tmp_path):
    size = recorded_pixel_size(_metaseries(tmp_path / "a.tif", "on", 0.65, 0.65))
    assert size.um == pytest.approx(0.65) and "MetaSeries" in size.source
    assert recorded_pixel_size(_metaseries(tmp_path / "b.tif", "on", 650, 650, "nm")).um == pytest.approx(0.65)
    assert recorded_pixel_size(_metaseries(tmp_path / "c.tif", "off", 1, 1, "pixels")) is None  # uncalibrated
    with pytest.raises(ImageReadError, match=r"d\.tif: non-square pixels"):
        recorded_pixel_size(_metaseries(tmp_path / "d.tif", "on", 0.65, 1.3))


def test_pixel_size_of_a_tiff_with_a_thumbnail_first_is_the_images(tmp_path):
    path = tmp_path / "preview_first.tif"
    with tifffile.TiffWriter(path) as tif:  # the preview's own resolution is 4x coarser
        tif.write(IMAGE[::4, ::4], subfiletype=1, resolution=(1e4 / 2.6, 1e4 / 2.6), resolutionunit="CENTIMETER")
        tif.write(IMAGE, resolution=(1e4 / 0.65, 1e4 / 0.65), resolutionunit="CENTIMETER")
    assert recorded_pixel_size(path).um == pytest.approx(0.65)


def test_ome_tiff_physical_size_in_nm_is_the_same_as_other_encodings(tmp_path):
    """650 nm in OME, 0.65 micron in ImageJ and 15,384.6 px/cm in a plain TIFF are one pixel size."""
    ome = recorded_pixel_size(_ome(tmp_path / "a.ome.tif", 650, unit="nm"))
    assert ome.um == pytest.approx(0.65) and ome.source == "OME PhysicalSizeX"
    tifffile.imwrite(tmp_path / "cm.tif", IMAGE, resolution=(1e4 / 0.65,) * 2, resolutionunit="CENTIMETER")
    plain = recorded_pixel_size(tmp_path / "cm.tif")
    imagej = recorded_pixel_size(_imagej(tmp_path / "ij.tif", 0.65))
    assert plain.um == pytest.approx(ome.um, rel=1e-6) and imagej.um == pytest.approx(ome.um, rel=1e-6)
    # OME's default unit is µm; mm converts too.
    tifffile.imwrite(tmp_path / "d.ome.tif", IMAGE, ome=True, metadata={"PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    assert recorded_pixel_size(tmp_path / "d.ome.tif").um == pytest.approx(0.65)
    assert recorded_pixel_size(_ome(tmp_path / "mm.ome.tif", 0.00065, unit="mm")).um == pytest.approx(0.65)


def test_plain_tiff_at_72_dpi_or_without_unit_is_not_recorded(tmp_path):
    """A document default (72 or 300 dpi) or 1 pixel per unit without a unit is no pixel size."""
    tifffile.imwrite(tmp_path / "dpi72.tif", IMAGE, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "dpi300.tif", IMAGE, resolution=(300, 300), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "none.tif", IMAGE)  # (1, 1), ResolutionUnit NONE
    tifffile.imwrite(tmp_path / "ratio.tif", IMAGE, resolution=(3, 3), resolutionunit="NONE")
    for name in ("dpi72", "dpi300", "none", "ratio"):
        assert recorded_pixel_size(tmp_path / f"{name}.tif") is None, name
    # Print defaults that differ between the axes are no pixel size either, not "non-square pixels".
    tifffile.imwrite(tmp_path / "dpi72x96.tif", IMAGE, resolution=(72, 96), resolutionunit="INCH")
    assert recorded_pixel_size(tmp_path / "dpi72x96.tif") is None
    # A calibration written in inches (25,400 / 0.65 dpi) is one.
    tifffile.imwrite(tmp_path / "cal.tif", IMAGE, resolution=(25_400 / 0.65,) * 2, resolutionunit="INCH")
    assert recorded_pixel_size(tmp_path / "cal.tif").um == pytest.approx(0.65, rel=1e-6)


def test_non_square_pixels_and_unknown_units_are_refused(tmp_path):
    with pytest.raises(ImageReadError, match=r"ns\.ome\.tif.*non-square pixels"):
        recorded_pixel_size(_ome(tmp_path / "ns.ome.tif", 650, 1300))
    with pytest.raises(ImageReadError, match=r"odd\.tif.*'furlong'"):
        recorded_pixel_size(_imagej(tmp_path / "odd.tif", 0.65, "furlong"))


def _plate(folder, sizes, files=None):
    """A plate of len(sizes) images; sizes[i] None: no calibration, else ImageJ microns; manifest from files."""
    folder.mkdir(parents=True)
    names = []
    for i, um in enumerate(sizes):
        name = f"img{i}.tif"
        if um is None:
            tifffile.imwrite(folder / name, IMAGE)
        else:
            _imagej(folder / name, um)
        names.append(name)
    manifest = pd.DataFrame({"image": names, "culture": "A"})
    if files is not None:
        manifest["Pixel size (µm)"] = files
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


def test_manifest_pixel_size_supplies_the_size_and_is_validated(tmp_path):
    plate = _plate(tmp_path / "p1", [None, None], files=["0.8708", "0.8708"])
    assert read_manifest(plate)["pixel_size_um"].tolist() == [0.8708, 0.8708]
    summary = validate_plate(plate)
    assert summary.pixel_size.um == pytest.approx(0.8708) and summary.pixel_size.source == "manifest"
    # An empty cell takes the file's size; the file's and the manifest's agree here.
    agreed = _plate(tmp_path / "p2", [0.65, 0.65], files=["0.65", ""])
    assert validate_plate(agreed).pixel_size.um == pytest.approx(0.65)
    for bad, what in (
        ("-1", "not a pixel size"),
        ("0", "not a pixel size"),
        ("abc", "not a number"),
        ("inf", "finite"),
    ):
        plate = _plate(tmp_path / f"bad{bad}", [None, None], files=["0.65", bad])
        with pytest.raises(PlateError, match=rf"manifest\.csv.*line 3, column 'pixel_size_um'.*{what}"):
            read_manifest(plate)


def test_manifest_header_that_only_looks_like_the_pixel_size_is_refused(tmp_path):
    """'Pixel size' without a unit would be an extra column beside the file's size: refused."""
    plate = _plate(tmp_path / "p", [None, None])
    pd.DataFrame({"image": ["img0.tif", "img1.tif"], "culture": "A", "Pixel size": [0.65, 0.65]}).to_csv(
        plate / "manifest.csv", index=False
    )
    with pytest.raises(PlateError, match=r"'pixel size' looks like 'pixel_size_um'.*µm per pixel"):
        read_manifest(plate)


def test_manifest_pixel_size_disagreeing_with_the_file_is_an_error(tmp_path):
    plate = _plate(tmp_path / "p", [0.325, 0.325], files=["0.65", "0.65"])
    with pytest.raises(PlateError, match=r"manifest\.csv.*'img0\.tif'.*pixel_size_um 0\.65 µm.*img0\.tif.*0\.325 µm"):
        validate_plate(plate)


def test_plate_of_mixed_or_partly_known_pixel_sizes_is_an_error(tmp_path):
    with pytest.raises(PlateError, match=r"different pixel sizes.*'img0\.tif' 0\.65 µm.*'img1\.tif' 1\.3 µm"):
        validate_plate(_plate(tmp_path / "mixed", [0.65, 1.3]))
    with pytest.raises(PlateError, match=r"known for 'img0\.tif'.*not for 'img1\.tif'"):
        validate_plate(_plate(tmp_path / "partial", [0.65, None]))
    assert validate_plate(_plate(tmp_path / "unknown", [None, None])).pixel_size is None


def test_add_plate_frames_keep_the_stacks_pixel_size(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    stack = np.stack([IMAGE, IMAGE + 1, IMAGE + 2])
    tifffile.imwrite(
        source / "xy01.tif", stack, imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"axes": "TYX", "unit": "um"}
    )
    plate = make_plate(source, tmp_path / "raw", "stack", culture="A", frame_interval_h=1)
    assert validate_plate(plate).pixel_size.um == pytest.approx(0.65, rel=1e-6)


def test_report_areas_in_um2_per_plate_and_px2_unless_every_plate_is_known(tmp_path):
    """Two plates at 0.5 and 1 µm per pixel: the same cell (100 µm²) is 400 px in one, 100 px in the other."""
    cells = pd.DataFrame(
        {
            "plate": ["fine"] * 4 + ["coarse"] * 4,
            "hdbscan": [0] * 8,
            "area": [400.0] * 4 + [100.0] * 4,
            "major_axis_length": 2.0,
            "minor_axis_length": 1.0,
        }
    )
    sizes = cell_pixel_sizes(cells["plate"], {"fine": 0.5, "coarse": 1.0})
    profiles = cluster_profiles(cells, "hdbscan", sizes)
    assert area_unit(sizes) == "µm²" and profiles.loc[0, "median_area"] == pytest.approx(100.0)
    unknown = cell_pixel_sizes(cells["plate"], {"fine": 0.5, "coarse": float("nan")})
    assert unknown is None and area_unit(unknown) == "px²"
    assert cluster_profiles(cells, "hdbscan", unknown).loc[0, "median_area"] == pytest.approx(250.0)
    # The sizes the report uses come from cell_coordinates' column, per plate.
    for plate, um in (("fine", 0.5), ("coarse", np.nan)):
        path = plate_file(tmp_path / "coords", plate)
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"x": [1, 2], "pixel_size_um": [um, um]}), path)
    recorded = coordinates_pixel_sizes(tmp_path / "coords")
    assert recorded["fine"] == 0.5 and np.isnan(recorded["coarse"])


def test_raw_plates_and_cell_coordinates_record_the_plates_pixel_size(data_root):
    """raw_plates' metadata gives the plate's size and its source; cell_coordinates has a column of it
    beside cell_diameter_px (NaN for a plate without one)."""
    import dagster as dg

    from gbm_assets.assets.cells import cell_coordinates
    from gbm_assets.assets.partitions import plates
    from gbm_assets.assets.raw_plates import raw_plates
    from gbm_assets.assets.resources import DataDirs
    from gbm_assets.imaging.plates import find_ready_plates
    from gbm_assets_tests.conftest import materialize_ingest

    known, unknown = find_ready_plates(data_root / "raw")[:2]
    manifest = pd.read_csv(data_root / "raw" / known / "manifest.csv")
    manifest.assign(pixel_size_um=0.8708).to_csv(data_root / "raw" / known / "manifest.csv", index=False)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [known, unknown])
    for plate, um in ((known, 0.8708), (unknown, None)):
        result = materialize_ingest(data_root, plate, instance, [raw_plates, cell_coordinates])
        meta = result.asset_materializations_for_node("raw_plates")[0].metadata
        coords = pd.read_parquet(plate_file(DataDirs(root=str(data_root)).coordinates, plate))
        assert list(coords.columns[-2:]) == ["cell_diameter_px", "pixel_size_um"]
        if um is None:
            assert np.isnan(meta["pixel_size_um"].value) and "not recorded" in meta["pixel_size_source"].value
            assert coords["pixel_size_um"].isna().all()
        else:
            assert meta["pixel_size_um"].value == um and meta["pixel_size_source"].value == "manifest"
            assert (coords["pixel_size_um"] == um).all() and len(coords)


def test_manifest_pixel_size_overrides_a_header_that_cannot_be_read_as_one(tmp_path):
    """A header in a unit not known here refuses the plate only where the manifest gives no size."""
    plate = _plate(tmp_path / "p", [None, None])
    _imagej(plate / "img0.tif", 0.65, "furlong")
    with pytest.raises(ImageReadError, match=r"img0\.tif.*'furlong'"):
        validate_plate(plate)
    pd.DataFrame({"image": ["img0.tif", "img1.tif"], "culture": "A", "pixel_size_um": [0.65, 0.65]}).to_csv(
        plate / "manifest.csv", index=False
    )
    assert validate_plate(plate).pixel_size.um == pytest.approx(0.65)
