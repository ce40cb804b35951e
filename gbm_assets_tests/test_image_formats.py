"""Reading every image format a lab has: TIFF compressions and layouts, stacks never blended, PNG/JPEG/BMP,
pixel types, vendor formats through the optional bioio extra, the pixel budget, and error texts."""

from __future__ import annotations

import io as _io
import struct
import sys
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from gbm_assets.errors import ImageReadError
from gbm_assets.imaging.io import IMAGE_SUFFIXES, count_frames, image_size, max_image_pixels, read_frames, read_image
from gbm_assets.imaging.segmentation import SegmentationParams, find_cells
from gbm_assets_tests.servers import unavailable

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
SECRET = "root:x:0:0:secret-line-7f3a9c:/root:/bin/bash"


def case(*parts: str) -> Path:
    path = CASES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test case not found at {path}")
    return path


def grey16(shape=(48, 64), seed=0, high=4096) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(np.uint16)


def grey8(shape=(48, 64), seed=0) -> np.ndarray:
    # Smooth enough that JPEG keeps it close.
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 100 + 60 * np.sin(xx / 7.0) * np.cos(yy / 9.0)
    return np.clip(base + np.random.default_rng(seed).normal(0, 2, shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ TIFF codecs


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compression": "lzw"},
        {"compression": "lzw", "predictor": True},
        {"compression": "zlib"},
        {"compression": "adobe_deflate"},
        {"compression": "packbits"},
        {"compression": "zstd"},
        {"tile": (16, 16)},
        {"tile": (16, 16), "compression": "lzw"},
        {"bigtiff": True},
        {"bigtiff": True, "compression": "zlib", "tile": (32, 32)},
        {"byteorder": ">"},
        {"byteorder": ">", "compression": "lzw", "predictor": True},
        {"rowsperstrip": 5, "compression": "lzw"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "uncompressed",
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_lossless_tiff_codecs_read_exactly(tmp_path, options, dtype):
    original = grey16(high=256 if dtype == np.uint8 else 65536).astype(dtype)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, original, metadata=None, **options)
    image = read_image(path)
    assert image.dtype == dtype and image.shape == original.shape
    assert np.array_equal(image, original)
    assert image_size(path) == (48, 64, 8 * np.dtype(dtype).itemsize)
    assert count_frames(path) == 1


def test_jpeg_in_tiff_is_close_to_the_original(tmp_path):
    original = grey8()
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, original, compression="jpeg", compressionargs={"level": 95}, metadata=None)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == original.shape
    assert np.abs(image.astype(int) - original.astype(int)).mean() < 2.0
    assert image_size(path) == (48, 64, 8)


def test_rgb_jpeg_in_tiff_of_grey_data_reads_as_grey(tmp_path):
    original = grey8()
    path = tmp_path / "jpeg-rgb.tif"
    tifffile.imwrite(path, np.repeat(original[..., None], 3, axis=2), photometric="rgb", compression="jpeg")
    image = read_image(path)
    assert image.shape == original.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - original.astype(int)).mean() < 3.0


# --------------------------------------------------------------------------- stacks: never blended


def _write_plain_pages(path: Path, frames) -> None:
    with tifffile.TiffWriter(path) as tif:
        for frame in frames:
            tif.write(frame, metadata=None, compression="lzw")


def test_plain_multipage_tiff_is_frames_not_rgb(tmp_path):
    frames = [grey16(seed=s) for s in range(3)]
    path = tmp_path / "stack.tif"
    _write_plain_pages(path, frames)
    assert count_frames(path) == 3
    with pytest.raises(ImageReadError, match=r"stack\.tif.*holds 3 frames"):
        read_image(path)
    with pytest.raises(ImageReadError, match=r"3 frames"):
        image_size(path)
    got = list(read_frames(path))
    assert len(got) == 3
    for a, b in zip(got, frames, strict=False):
        assert a.dtype == np.uint16 and np.array_equal(a, b)


def test_read_frames_decodes_one_frame_at_a_time(tmp_path, monkeypatch):
    frames = [grey16(seed=s) for s in range(5)]
    path = tmp_path / "stack.tif"
    _write_plain_pages(path, frames)
    calls = []
    original = tifffile.TiffPage.asarray

    def counting(self, *args, **kwargs):
        calls.append(self.index)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", counting)
    iterator = read_frames(path)
    assert isinstance(iterator, Iterator)
    assert calls == []  # nothing decoded before it is asked for
    assert np.array_equal(next(iterator), frames[0])
    assert len(calls) == 1
    assert np.array_equal(next(iterator), frames[1])
    assert len(calls) == 2
    assert len(list(iterator)) == 3


@pytest.mark.parametrize("axes", ["TYX", "ZYX"])
def test_imagej_stack_frames(tmp_path, axes):
    data = np.stack([grey16(seed=s) for s in range(4)])
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": axes})
    assert count_frames(path) == 4
    assert np.array_equal(np.stack(list(read_frames(path))), data)
    with pytest.raises(ImageReadError, match="4 frames"):
        read_image(path)


def test_imagej_hyperstack_t_by_z(tmp_path):
    data = np.stack([grey16(seed=s) for s in range(6)]).reshape(3, 2, 48, 64).astype(np.uint8)
    path = tmp_path / "tz.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZYX"})
    assert count_frames(path) == 6
    got = list(read_frames(path))
    assert [np.array_equal(g, e) for g, e in zip(got, data.reshape(6, 48, 64), strict=False)] == [True] * 6


def test_imagej_contiguous_stack_with_one_ifd(tmp_path):
    """ImageJ writes stacks over 4 GB with one IFD and the frames after it: read frame by frame."""
    data = np.stack([grey16(seed=s) for s in range(3)])
    path = tmp_path / "virtual.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TYX"}, truncate=True)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1  # really a one-IFD file
    assert count_frames(path) == 3
    assert np.array_equal(np.stack(list(read_frames(path))), data)


def test_volumetric_tiff_page_holding_several_frames(tmp_path):
    data = np.stack([grey16(seed=s) for s in range(3)])
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, data, volumetric=True, tile=(1, 16, 16), photometric="minisblack", metadata=None)
    assert count_frames(path) == 3
    assert np.array_equal(np.stack(list(read_frames(path))), data)


def test_multichannel_files_are_refused(tmp_path):
    data = np.stack([grey16(seed=1), grey16(seed=2)])
    ij = tmp_path / "phase+gfp.tif"
    tifffile.imwrite(ij, data, imagej=True, metadata={"axes": "CYX"})
    ome = tmp_path / "phase+gfp.ome.tif"
    tifffile.imwrite(ome, data, ome=True, metadata={"axes": "CYX"})
    for path in (ij, ome):
        for reader in (count_frames, read_image, image_size, read_frames):
            with pytest.raises(ImageReadError, match=r"phase\+gfp.*2 channels"):
                reader(path)
    # The channels' names, where the file records them, tell the user which one to save.
    named = tmp_path / "named.ome.tif"
    tifffile.imwrite(named, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["Phase", "GFP"]}})
    with pytest.raises(ImageReadError, match=r"named\.ome\.tif: holds 2 channels \('Phase', 'GFP'\)"):
        read_image(named)


def test_tiff_with_two_series_is_refused(tmp_path):
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(grey16(shape=(32, 32)))
        tif.write(grey16(shape=(48, 64)))
    with pytest.raises(ImageReadError, match=r"two\.tif.*2 image series \(32x32, 64x48"):
        count_frames(path)


# ----------------------------------------------------------------------------------------- OME-TIFF


def test_ome_tiff_single_plane_without_bioio(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bioio", None)  # OME-TIFF needs no extra
    original = grey16()
    path = tmp_path / "field.ome.tif"
    tifffile.imwrite(path, original, ome=True, compression="zlib")
    assert path.suffix in IMAGE_SUFFIXES
    assert count_frames(path) == 1
    assert np.array_equal(read_image(path), original)
    assert image_size(path) == (48, 64, 16)


def test_ome_tiff_time_lapse_gives_frames(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bioio", None)
    data = np.stack([grey16(seed=s) for s in range(3)])
    path = tmp_path / "timelapse.ome.tiff"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TYX"})
    assert count_frames(path) == 3
    got = list(read_frames(path))
    assert len(got) == 3 and all(np.array_equal(g, d) for g, d in zip(got, data, strict=False))
    with pytest.raises(ImageReadError, match="3 frames"):
        read_image(path)


# ------------------------------------------------------------------------------ RGB(A), colour models


def test_rgb_tiffs(tmp_path):
    grey = grey16()
    rgb = np.stack([grey] * 3, axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 65535, np.uint16)], axis=-1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    for name in ("rgb.tif", "planar.tif", "rgba.tif"):
        assert count_frames(tmp_path / name) == 1, name  # samples are not frames
        assert np.array_equal(read_image(tmp_path / name), grey), name
        assert image_size(tmp_path / name) == (48, 64, 16)
    coloured = np.stack([grey16(seed=1), grey16(seed=2), grey16(seed=3)], axis=-1)
    tifffile.imwrite(tmp_path / "colour.tif", coloured, photometric="rgb")
    expected = np.round(coloured[..., 0] * 0.299 + coloured[..., 1] * 0.587 + coloured[..., 2] * 0.114)
    assert np.array_equal(read_image(tmp_path / "colour.tif"), expected.astype(np.uint16))


@pytest.mark.parametrize("n", [3, 4])
def test_a_script_saved_stack_of_3_or_4_frames_is_not_blended_as_colour(tmp_path, n):
    """tifffile.imwrite(path, frames) and skimage.io.imsave store a (3, H, W) or (4, H, W) stack as
    one planar RGB(A) page: its frames were blended into one "luminance" image (and a 4th dropped as
    alpha). Now refused, naming the file; the same planes saved as pages are frames; one grey saved
    as planar RGB (identical planes) still reads as that grey."""
    frames = np.stack([grey16(seed=s) for s in range(n)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # tifffile: a future default changes this
        tifffile.imwrite(tmp_path / "stack.tif", frames)
        tifffile.imwrite(tmp_path / "grey.tif", np.stack([frames[0]] * 3))
    with pytest.raises(ImageReadError, match=rf"stack\.tif: holds {n} different planes stored as one planar RGB"):
        read_image(tmp_path / "stack.tif")
    assert np.array_equal(read_image(tmp_path / "grey.tif"), frames[0])
    tifffile.imwrite(tmp_path / "pages.tif", frames, photometric="minisblack")
    assert np.array_equal(np.stack(list(read_frames(tmp_path / "pages.tif"))), frames)


@pytest.mark.parametrize("thumbnail_first", [False, True])
def test_a_thumbnail_page_flagged_as_reduced_resolution_is_skipped(tmp_path, thumbnail_first):
    """Acquisition programs write a small RGB preview beside the image, flagged in NewSubfileType as
    a reduced-resolution copy: it is no second image (the file was refused as holding 2 series)."""
    image = grey16(shape=(64, 96))
    preview = np.stack([(image[::4, ::4] >> 4).astype(np.uint8)] * 3, axis=-1)
    with tifffile.TiffWriter(tmp_path / "with_preview.tif") as tif:
        if thumbnail_first:
            tif.write(preview, photometric="rgb", subfiletype=1)
        tif.write(image)
        if not thumbnail_first:
            tif.write(preview, photometric="rgb", subfiletype=1)
    assert count_frames(tmp_path / "with_preview.tif") == 1
    assert np.array_equal(read_image(tmp_path / "with_preview.tif"), image)
    # Without the flag, a second image of another size is still refused, never chosen between.
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:
        tif.write(image)
        tif.write(image[::4, ::4])
    with pytest.raises(ImageReadError, match=r"two\.tif: holds 2 image series"):
        read_image(tmp_path / "two.tif")


def test_min_is_white_and_palette_tiffs(tmp_path):
    original = grey8()
    tifffile.imwrite(tmp_path / "white.tif", 255 - original, photometric="miniswhite")
    assert np.array_equal(read_image(tmp_path / "white.tif"), original)
    ramp = np.arange(256, dtype=np.uint16) * 257
    tifffile.imwrite(tmp_path / "palette.tif", original, photometric="palette", colormap=np.stack([ramp] * 3))
    assert np.array_equal(read_image(tmp_path / "palette.tif"), original)
    assert image_size(tmp_path / "palette.tif")[2] == 8


def test_imagej_min_is_white_keeps_its_pixel_values(tmp_path):
    """ImageJ saves an image shown with an inverting LUT as min-is-white but leaves its pixel values
    as they were (and reads them back so): inverting them would turn the halos of a phase-contrast
    image dark and its cells bright."""
    for original in (grey8(), grey16(high=4096)):
        name = f"ij_{original.dtype}.tif"
        tifffile.imwrite(tmp_path / name, original, imagej=True, photometric="miniswhite")
        assert np.array_equal(read_image(tmp_path / name), original), name
    stack = np.stack([grey8(), 255 - grey8()])
    tifffile.imwrite(tmp_path / "ij_stack.tif", stack, imagej=True, photometric="miniswhite", metadata={"axes": "TYX"})
    assert all(np.array_equal(a, b) for a, b in zip(read_frames(tmp_path / "ij_stack.tif"), stack, strict=True))


# ------------------------------------------------------------------------------------ PNG, JPEG, BMP


def test_png_grey_rgb_rgba_and_16bit(tmp_path):
    g8, g16 = grey8(), grey16(high=65536)
    cv2.imwrite(str(tmp_path / "g8.png"), g8)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), np.stack([g16] * 3, axis=-1))
    Image.fromarray(np.stack([g8] * 3 + [np.full_like(g8, 128)], axis=-1), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.stack([g8, np.full_like(g8, 9)], axis=-1), "LA").save(tmp_path / "la.png")
    for name, expected in [("g8.png", g8), ("g16.png", g16), ("rgb16.png", g16), ("rgba.png", g8), ("la.png", g8)]:
        image = read_image(tmp_path / name)
        assert image.dtype == expected.dtype and np.array_equal(image, expected), name
        assert image_size(tmp_path / name) == (48, 64, 8 * expected.dtype.itemsize), name


def test_coloured_png_becomes_luminance(tmp_path):
    rgb = np.stack([grey8(seed=1), np.roll(grey8(seed=2), 5, axis=1), grey8(seed=3)[::-1]], axis=-1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    expected = np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "c.png"), expected)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_grey_and_rgb(tmp_path, suffix):
    original = grey8()
    cv2.imwrite(str(tmp_path / f"grey{suffix}"), original, [cv2.IMWRITE_JPEG_QUALITY, 95])
    cv2.imwrite(str(tmp_path / f"rgb{suffix}"), np.stack([original] * 3, -1), [cv2.IMWRITE_JPEG_QUALITY, 95])
    for name in (f"grey{suffix}", f"rgb{suffix}"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.shape == original.shape
        assert np.abs(image.astype(int) - original.astype(int)).mean() < 2.0, name
        assert image_size(tmp_path / name) == (48, 64, 8)
        assert count_frames(tmp_path / name) == 1


def test_bmp_grey_and_rgb(tmp_path):
    original = grey8()
    cv2.imwrite(str(tmp_path / "grey.bmp"), original)
    cv2.imwrite(str(tmp_path / "rgb.bmp"), np.stack([original] * 3, -1))
    for name in ("grey.bmp", "rgb.bmp"):
        assert np.array_equal(read_image(tmp_path / name), original), name
        assert image_size(tmp_path / name) == (48, 64, 8)


def test_content_decides_between_tiff_png_jpeg(tmp_path):
    original = grey8()
    cv2.imwrite(str(tmp_path / "really-png.png"), original)
    (tmp_path / "really-png.tif").write_bytes((tmp_path / "really-png.png").read_bytes())
    assert np.array_equal(read_image(tmp_path / "really-png.tif"), original)


# ---------------------------------------------------------------------------------------- pixel types


def test_12bit_in_16bit_container_is_unchanged_and_finds_the_same_cells(tmp_path):
    lzw = CASES / "01-lzw-tiff" / "raw" / "t98g-lzw" / "t07_lzw.tif"
    if lzw.is_file():
        field = read_image(lzw)
    else:  # without the shared cases, a synthetic field
        from gbm_assets.imaging.synthetic import CULTURE_MIXTURES, CULTURES, synthesize_image

        field = synthesize_image(np.random.default_rng(5), CULTURE_MIXTURES[CULTURES[0]], 20, size=384).image
    twelve = (field.astype(np.uint32) * 4095 // max(int(field.max()), 1)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "12bit.tif", twelve, compression="lzw")
    tifffile.imwrite(tmp_path / "x16.tif", twelve * 16, compression="lzw")
    a, b = read_image(tmp_path / "12bit.tif"), read_image(tmp_path / "x16.tif")
    assert a.dtype == np.uint16 and int(a.max()) <= 4095 and np.array_equal(a, twelve)
    assert np.array_equal(b, twelve * 16)
    cells_a, labels_a = find_cells(a, SegmentationParams())
    cells_b, labels_b = find_cells(b, SegmentationParams())
    assert len(cells_a) > 0
    assert len(cells_a) == len(cells_b)
    assert np.array_equal(labels_a > 0, labels_b > 0)


def test_float32_tiff_rescaled_to_uint16(tmp_path):
    values = (np.random.default_rng(0).normal(0.5, 0.2, (48, 64))).astype(np.float32)
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, values, imagej=True)
    lo, hi = float(values.min()), float(values.max())
    expected = np.rint((values - np.float32(lo)) * np.float32(65535.0 / (hi - lo)))
    image = read_image(path)
    assert image.dtype == np.uint16
    assert image.min() == 0 and image.max() == 65535
    assert np.abs(image.astype(np.int64) - expected.astype(np.int64)).max() <= 1
    assert image_size(path) == (48, 64, 16)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full((8, 8), 3.5, np.float32))
    assert np.array_equal(read_image(flat), np.zeros((8, 8), np.uint16))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_with_nan_or_inf_is_refused(tmp_path, bad):
    values = np.ones((16, 16), np.float32)
    values[3, 4] = bad
    tifffile.imwrite(tmp_path / "bad.tif", values)
    with pytest.raises(ImageReadError, match=r"bad\.tif.*NaN or infinite"):
        read_image(tmp_path / "bad.tif")


def test_signed_integers(tmp_path):
    positive = grey16().astype(np.int16)
    tifffile.imwrite(tmp_path / "pos.tif", positive)
    image = read_image(tmp_path / "pos.tif")
    assert image.dtype == np.uint16 and np.array_equal(image, positive.astype(np.uint16))
    negative = positive - 1000
    tifffile.imwrite(tmp_path / "neg.tif", negative)
    image = read_image(tmp_path / "neg.tif")
    assert image.dtype == np.uint16 and np.array_equal(image.astype(np.int64), negative - negative.min())
    wide = np.zeros((8, 8), np.int32)
    wide[0, 0], wide[0, 1] = -40000, 40000
    tifffile.imwrite(tmp_path / "wide.tif", wide)
    with pytest.raises(ImageReadError, match=r"wide\.tif.*16 bits"):
        read_image(tmp_path / "wide.tif")


# ------------------------------------------------------------------------------------- pixel budget


def _tiff_bomb(path: Path) -> Path:
    """A few-kB TIFF whose header claims 50000 x 50000 pixels."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), tile=(16, 16), compression="zlib", metadata=None)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(50000)
        tif.pages[0].tags["ImageLength"].overwrite(50000)
    return path


def _png_bomb(path: Path) -> Path:
    buffer = _io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 50000, 50000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _jpeg_bomb(path: Path) -> Path:
    ok, encoded = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 50000, 50000)
    path.write_bytes(bytes(data))
    return path


def _bmp_bomb(path: Path) -> Path:
    ok, encoded = cv2.imencode(".bmp", np.zeros((8, 8), np.uint8))
    data = bytearray(encoded.tobytes())
    data[18:26] = struct.pack("<ii", 50000, 50000)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "make, name", [(_tiff_bomb, "bomb.tif"), (_png_bomb, "bomb.png"), (_jpeg_bomb, "bomb.jpg"), (_bmp_bomb, "bomb.bmp")]
)
def test_header_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, make, name):
    path = make(tmp_path / name)
    assert path.stat().st_size < 20_000
    for reader in (read_image, image_size, count_frames, read_frames):
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ImageReadError) as info:
            reader(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        message = str(info.value)
        assert name in message and "50000x50000" in message and "100 megapixels" in message
        assert "GBM_MAX_IMAGE_MEGAPIXELS" in message
        assert elapsed < 0.5, f"{reader.__name__} took {elapsed:.2f} s"
        assert peak < 20e6, f"{reader.__name__} allocated {peak / 1e6:.0f} MB"


def test_pixel_budget_from_environment_and_keyword(tmp_path, monkeypatch):
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, grey16(shape=(100, 100)))
    monkeypatch.setenv("GBM_MAX_IMAGE_MEGAPIXELS", "0.005")  # 5000 pixels < 100 x 100
    assert max_image_pixels() == 5000
    with pytest.raises(ImageReadError, match=r"small\.tif.*100x100.*0\.005 megapixels"):
        read_image(path)
    assert read_image(path, max_pixels=10_000).shape == (100, 100)  # the keyword wins
    assert count_frames(path, max_pixels=10_000) == 1
    monkeypatch.setenv("GBM_MAX_IMAGE_MEGAPIXELS", "0.01")
    assert read_image(path).shape == (100, 100)
    with pytest.raises(ImageReadError, match="limit"):
        image_size(path, max_pixels=9_999)
    monkeypatch.setenv("GBM_MAX_IMAGE_MEGAPIXELS", "lots")
    with pytest.raises(ImageReadError, match="GBM_MAX_IMAGE_MEGAPIXELS"):
        read_image(path)
    monkeypatch.delenv("GBM_MAX_IMAGE_MEGAPIXELS")
    assert max_image_pixels() == 100_000_000


# ------------------------------------------------------------------------------------- error texts


@pytest.mark.parametrize("name", ["private.tif", "private.tiff", "private.png", "private.jpg", "private.bmp"])
def test_errors_never_echo_file_content(tmp_path, name):
    path = tmp_path / name
    path.write_text(f"{SECRET}\nmore private text\n")
    for reader in (read_image, image_size, count_frames, read_frames):
        with pytest.raises(ImageReadError) as info:
            reader(path)
        message = str(info.value)
        assert name in message
        assert "secret-line" not in message and "root:x" not in message
        assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "name, magic",
    [
        ("fake.tif", b"II*\x00"),
        ("fake.tif", b"MM\x00*"),
        ("fake.png", b"\x89PNG\r\n\x1a\n"),
        ("fake.jpg", b"\xff\xd8\xff\xe0"),
        ("fake.bmp", b"BM"),
    ],
)
def test_corrupt_files_with_right_magic_do_not_leak_content(tmp_path, name, magic):
    path = tmp_path / name
    path.write_bytes(magic + (SECRET * 4).encode())
    with pytest.raises(ImageReadError, match=r"(unreadable|corrupt)") as info:
        read_image(path)
    message = str(info.value)
    assert name in message and "secret-line" not in message and "root:x" not in message


def test_truncated_tiff_data_is_named_and_wrapped(tmp_path):
    path = tmp_path / "truncated.tif"
    tifffile.imwrite(path, grey16(shape=(256, 256)), compression="lzw", metadata=None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match=r"truncated\.tif.*(unreadable|corrupt)"):
        read_image(path)


def test_missing_unsupported_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.tif.*not found"):
        read_image(tmp_path / "nope.tif")
    (tmp_path / "doc.txt").write_text("x")
    with pytest.raises(ImageReadError, match=r"doc\.txt.*unsupported image type"):
        read_image(tmp_path / "doc.txt")
    (tmp_path / "dir.tif").mkdir()
    with pytest.raises(ImageReadError, match=r"dir\.tif.*not a regular file"):
        read_image(tmp_path / "dir.tif")


def test_image_suffixes_list_every_format():
    assert set(IMAGE_SUFFIXES) == {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".nd2", ".czi", ".lif"}


# ------------------------------------------------------------------------- vendor formats (bioio)


@pytest.mark.parametrize("suffix", [".czi", ".nd2", ".lif"])
def test_vendor_formats_without_the_extra_say_how_to_install_it(tmp_path, monkeypatch, suffix):
    for module in ("bioio", "bioio_czi", "bioio_nd2", "bioio_lif"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    path = tmp_path / f"plate{suffix}"
    path.write_bytes(b"\x00" * 64)
    for reader in (read_image, count_frames, image_size, read_frames):
        with pytest.raises(
            ImageReadError,
            match=rf"plate\{suffix}.*reading \{suffix} needs the optional extra: "
            r"pip install 'gbm-assets\[formats\]'",
        ):
            reader(path)


def _czi_writer():
    try:
        import bioio  # noqa: F401
        import bioio_czi  # noqa: F401
        from pylibCZIrw import czi as pyczi
    except ImportError as exc:
        unavailable(
            f"the formats extra (bioio, bioio-czi, pylibCZIrw) is not installed ({exc.name}): "
            "pip install -e '.[formats]'"
        )
    return pyczi


def _write_czi(pyczi, path: Path, planes: dict[tuple[int, int], np.ndarray]) -> None:
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for (t, c), plane in planes.items():
            czi.write(data=plane, plane={"T": t, "Z": 0, "C": c}, location=(0, 0))


def test_czi_through_bioio(tmp_path):
    pyczi = _czi_writer()
    one = grey16(seed=4)
    _write_czi(pyczi, tmp_path / "field.czi", {(0, 0): one})
    assert count_frames(tmp_path / "field.czi") == 1
    assert image_size(tmp_path / "field.czi") == (48, 64, 16)
    image = read_image(tmp_path / "field.czi")
    assert image.dtype == np.uint16 and np.array_equal(image, one)

    frames = [grey16(seed=s) for s in range(3)]
    _write_czi(pyczi, tmp_path / "timelapse.czi", {(t, 0): f for t, f in enumerate(frames)})
    assert count_frames(tmp_path / "timelapse.czi") == 3
    with pytest.raises(ImageReadError, match=r"timelapse\.czi.*3 frames"):
        read_image(tmp_path / "timelapse.czi")
    got = list(read_frames(tmp_path / "timelapse.czi"))
    assert len(got) == 3 and all(np.array_equal(g, f) for g, f in zip(got, frames, strict=False))

    _write_czi(pyczi, tmp_path / "two-channels.czi", {(0, 0): one, (0, 1): frames[0]})
    with pytest.raises(ImageReadError, match=r"two-channels\.czi.*2 channels"):
        count_frames(tmp_path / "two-channels.czi")
    with pytest.raises(ImageReadError, match=r"field\.czi.*64x48.*limit"):
        read_image(tmp_path / "field.czi", max_pixels=1000)


def test_corrupt_czi_is_wrapped(tmp_path):
    _czi_writer()
    path = tmp_path / "broken.czi"
    path.write_text(SECRET)
    with pytest.raises(ImageReadError, match=r"broken\.czi.*(unreadable|corrupt)") as info:
        read_image(path)
    assert "secret-line" not in str(info.value)


# ----------------------------------------------------------------------------- the shared lab cases


def test_case01_lzw_and_jpeg_in_tiff_find_the_same_cells():
    lzw = read_image(case("01-lzw-tiff", "raw", "t98g-lzw", "t07_lzw.tif"))
    jpeg = read_image(case("01-lzw-tiff", "t07_8bit_jpeg_in_tiff.tif"))
    assert lzw.shape == jpeg.shape == (384, 384)
    assert lzw.dtype == np.uint16 and jpeg.dtype == np.uint8
    n_lzw = len(find_cells(lzw, SegmentationParams())[0])
    n_jpeg = len(find_cells(jpeg, SegmentationParams())[0])
    assert 12 <= n_lzw <= 24  # about 18 cells in this field
    assert abs(n_lzw - n_jpeg) <= 0.15 * n_lzw


def test_case03_imagej_stack_is_three_frames():
    path = case("03-multipage-timelapse", "raw", "t98g-stack", "xy01_t07-t19.tif")
    assert count_frames(path) == 3
    with pytest.raises(ImageReadError, match=r"xy01_t07-t19\.tif.*3 frames"):
        read_image(path)
    frames = list(read_frames(path))
    assert len(frames) == 3
    assert all(f.shape == (384, 384) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])


def test_case07_incucyte_jpegs_read_as_grey():
    paths = sorted(case("07-incucyte-jpeg-export", "export").glob("*.jpg"))
    assert paths
    for path in paths:
        image = read_image(path)
        assert image.ndim == 2 and image.dtype == np.uint8 and image.shape == (384, 384)
        assert image_size(path) == (384, 384, 8)


def test_case08_incucyte_tiffs_read():
    paths = sorted(case("08-incucyte-timestamps", "export").glob("*.tif"))
    assert len(paths) == 3
    for path in paths:
        assert read_image(path).shape == (256, 256) and count_frames(path) == 1


def test_empty_file_is_named(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.tif.*empty file"):
        read_image(tmp_path / "empty.tif")


@pytest.mark.parametrize("planar", ["separate", "contig"])
@pytest.mark.parametrize("n", [2, 3])
def test_grey_pages_with_several_samples_are_channels_not_dropped(tmp_path, planar, n):
    """A grey page holding n samples (no alpha) is n channels: refused, never read as its first one."""
    a = np.arange(32 * 40, dtype=np.uint16).reshape(32, 40)
    data = np.stack([a + k for k in range(n)], axis=0 if planar == "separate" else -1)
    path = tmp_path / "multisample.tif"
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig=planar)
    for read in (read_image, count_frames, image_size):
        with pytest.raises(ImageReadError, match=rf"multisample\.tif.*{n} samples per pixel.*one channel"):
            read(path)


def test_grey_with_alpha_is_one_channel(tmp_path):
    a = np.arange(32 * 40, dtype=np.uint16).reshape(32, 40)
    path = tmp_path / "grey_alpha.tif"
    tifffile.imwrite(
        path, np.stack([a, np.full_like(a, 65535)], axis=-1), photometric="minisblack", extrasamples=["unassalpha"]
    )
    assert np.array_equal(read_image(path), a)


def test_animated_png_is_refused_not_cut_to_its_first_frame(tmp_path):
    from PIL import Image

    frames = [Image.fromarray(np.full((24, 32), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match=r"anim\.png.*2 frames"):
        read_image(tmp_path / "anim.png")
