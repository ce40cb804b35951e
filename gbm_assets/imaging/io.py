"""Reading microscope images into 2-D NumPy arrays (H, W) of uint8 or uint16, with errors that name the file.

Formats
    TIFF (.tif, .tiff, OME-TIFF .ome.tif): tifffile with imagecodecs, so every compression real tools
        write (LZW, Deflate, JPEG, PackBits, Zstd, ...), strips or tiles, BigTIFF, either byte order.
        ImageJ and OME-TIFF stacks are read through their metadata (no extra package needed).
    PNG, JPEG, BMP (.png, .jpg, .jpeg, .bmp): the header through Pillow, the pixels through OpenCV.
    ND2, CZI, LIF (.nd2, .czi, .lif): through bioio and its plugins, the optional extra
        `pip install 'gbm-assets[formats]'`; without it these raise ImageReadError saying so.
    The content decides between TIFF, PNG, JPEG and BMP (a JPEG saved as .tif is read as JPEG); the
    suffix decides for the vendor formats.

Frames
    A file holds one or more 2-D grey frames: the pages of a plain multi-page TIFF, the T/Z (and
    other non-channel) positions of an ImageJ, OME or vendor series. Frames are never blended.
    TIFF pages flagged (NewSubfileType) as a reduced-resolution copy (thumbnail, preview) or a
    transparency mask are skipped.
    read_image reads a file of exactly one frame; read_frames yields every frame, decoded one at a
    time; count_frames counts them from the header and frame_axes says which axes (T, Z...) they
    run along. An RGB(A) image (samples) is one frame. A file
    with more than one channel (C > 1, e.g. phase + fluorescence) or more than one image series /
    scene (positions) is refused: phase contrast is one channel, and each position should be its own
    file.

Pixels
    RGB(A): alpha dropped; identical R, G, B (grey saved as colour) -> that channel; truly coloured ->
        luminance (0.299 R + 0.587 G + 0.114 B). Palette TIFFs go through their colour map;
        "min-is-white" TIFFs are inverted, except ImageJ's: ImageJ writes an image shown with an
        inverting LUT as min-is-white with its pixel values unchanged, and reads them back unchanged. A planar RGB(A) TIFF written by tifffile from an array
        of shape (3 or 4, H, W), which is how tifffile and scikit-image save a stack of 3 or 4
        frames, is refused unless its colour planes are one grey (and alpha constant): frames
        are never blended as colours.
    uint8 and uint16 are returned unchanged (12- or 14-bit data in 16-bit containers stay as they are:
        cell finding normalises by robust statistics, so a 12-bit image and its x16 twin give the same
        cells). Bilevel (1-bit) images become uint8 0/255.
    Signed integers: non-negative -> uint16 when they fit; with negative values, shifted by the
        minimum into uint16 when the range fits in 16 bits; otherwise refused.
    Unsigned integers wider than 16 bits -> uint16 when the values fit, otherwise refused.
    Floating point (ImageJ "32-bit"): finite values are rescaled linearly from their min..max to
        0..65535 (uint16), per frame. Nothing downstream depends on absolute intensities: segmentation
        normalises each image by its median and spread, and crops are normalised per crop, so a
        linear rescale changes no result while keeping 16 bits of resolution. A constant image
        becomes all zeros. NaN or infinite values are refused (they have no place on that scale).

Pixel budget
    An image whose header claims more than the limit of pixels per frame (default 100 megapixels;
    environment variable GBM_MAX_IMAGE_MEGAPIXELS, or the max_pixels keyword, which wins) is refused
    before anything is decoded, so a small file claiming a huge size (a decompression bomb) costs
    neither time nor memory.

Errors
    Every problem is an ImageReadError(path, problem) naming the file. Messages never contain what a
    decoder said about the file, because decoders quote the bytes they could not parse (a plate may
    link to any file); the underlying exception is not chained either, for the same reason.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile

from gbm_assets.errors import ImageReadError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".nd2", ".czi", ".lif")
VENDOR_SUFFIXES = {".nd2": "bioio_nd2", ".czi": "bioio_czi", ".lif": "bioio_lif"}
DEFAULT_MAX_MEGAPIXELS = 100.0
MAX_PIXELS_ENV = "GBM_MAX_IMAGE_MEGAPIXELS"

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_BMP_MAGIC = b"BM"
_FRAME_AXES_EXCLUDED = frozenset("YXSC")


# ----------------------------------------------------------------------------------------- public API


def read_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file holding one frame as a 2-D array (H, W) of uint8 or uint16.

    Parameters
    ----------
    path : str or Path
        A TIFF, PNG, JPEG, BMP file, or ND2/CZI/LIF with the ``formats`` extra (see the module).
    max_pixels : int, optional
        Pixel budget per frame (height x width); default from max_image_pixels().

    Returns
    -------
    image : (H, W) ndarray of uint8 or uint16
        Grey intensities, unscaled for 8- and 16-bit data; colour is reduced to luminance and
        other dtypes converted as the module describes.

    Raises
    ------
    ImageReadError
        Naming the file when it is missing, of an unsupported kind, unreadable or corrupt, over
        the pixel budget, holds more than one channel, series or scene, or holds more than one
        frame (a stack or time-lapse: use read_frames, or `gbm-assets add-plate`, which makes
        each frame its own image).
    """
    path = Path(path)
    with _open(path, max_pixels) as source:
        if source.n_frames != 1:
            raise ImageReadError(path, _many_frames(source.n_frames))
        return source.frame(0)


def read_frames(path: str | Path, *, max_pixels: int | None = None) -> Iterator[np.ndarray]:
    """Every frame of an image file in order, each a 2-D array (H, W) of uint8 or uint16.

    Frames are decoded one at a time as the iterator advances (a long time-lapse is never loaded
    whole).

    Parameters
    ----------
    path : str or Path
        An image file of one or more frames (see the module).
    max_pixels : int, optional
        Pixel budget per frame (height x width); default from max_image_pixels().

    Returns
    -------
    frames : iterator of (H, W) ndarray of uint8 or uint16
        The frames in file order (T, then Z, then other non-channel axes), as read_image would
        return each.

    Raises
    ------
    ImageReadError
        On this call for a missing, unsupported, multi-channel or over-budget file (the header
        is checked at once); while iterating, for a frame that cannot be decoded.
    """
    path = Path(path)
    with _open(path, max_pixels):  # check the header now, not at the first next()
        pass

    def frames() -> Iterator[np.ndarray]:
        with _open(path, max_pixels) as source:
            for index in range(source.n_frames):
                yield source.frame(index)

    return frames()


def count_frames(path: str | Path, *, max_pixels: int | None = None) -> int:
    """Number of 2-D grey frames in an image file, read from the header only.

    The pages of a plain multi-page TIFF; T x Z (and other non-channel) positions of an ImageJ, OME
    or vendor series; 1 for an RGB(A) image.

    Raises
    ------
    ImageReadError
        As read_frames does: more than one channel, series or scene; over the pixel budget
        (max_pixels); a missing file or unreadable header.
    """
    path = Path(path)
    with _open(path, max_pixels) as source:
        return source.n_frames


def frame_axes(path: str | Path, *, max_pixels: int | None = None) -> dict[str, int]:
    """The axes a file's frames run along, outermost first, with their lengths, from the header only.

    Only axes longer than 1 are given: {} for one frame, {"T": 3} for a time-lapse, {"T": 3, "Z": 2}
    for an ImageJ hyperstack of 3 time points by 2 focal planes (frames in the order read_frames
    yields them: T outer, Z inner). Axis letters are tifffile's (T time, Z depth, I an unlabelled
    page sequence, ...) or bioio's (T, Z). An ImageJ stack of "slices" alone is I, an unlabelled page
    sequence: ImageJ calls every plain stack slices and records a z-step for any calibrated image.

    Raises
    ------
    ImageReadError
        As count_frames does.
    """
    path = Path(path)
    with _open(path, max_pixels) as source:
        return {axis: n for axis, n in source.frame_sizes.items() if n > 1}


def image_size(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int, int]:
    """(height, width, bits) of a one-frame image from its header, without decoding its pixels.

    Returns
    -------
    height, width : int
        Pixels, the (H, W) shape read_image would return.
    bits : int
        That of the array read_image returns: 8 for uint8, 16 for uint16 (also for 32-bit float
        and other integer types, which read_image converts to uint16).

    Raises
    ------
    ImageReadError
        For the same files read_image refuses from their header, including files of more than one
        frame: a file that passes here is one read_image can read unless its pixel data are damaged.
    """
    path = Path(path)
    with _open(path, max_pixels) as source:
        if source.n_frames != 1:
            raise ImageReadError(path, _many_frames(source.n_frames))
        return source.height, source.width, source.bits


_SECONDS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "ms": 1e-3,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}


def frame_interval_h(path: str | Path) -> float | None:
    """Hours between the time points of a time-lapse file, from its own metadata, else None.

    ImageJ TIFF: `finterval` in `tunit` (seconds when absent); OME-TIFF: Pixels TimeIncrement in
    TimeIncrementUnit (seconds when absent); ND2/CZI/LIF: bioio's time_interval. Metadata are a
    hint, never an error: anything missing, zero or unreadable gives None.
    """
    path = Path(path)
    seconds = None
    try:
        if path.suffix.lower() in VENDOR_SUFFIXES:
            from bioio import BioImage

            interval = BioImage(
                path, reader=importlib.import_module(VENDOR_SUFFIXES[path.suffix.lower()]).Reader
            ).time_interval
            seconds = interval.total_seconds() if interval is not None else None
        else:
            with tifffile.TiffFile(path) as tif:
                if tif.is_imagej and tif.imagej_metadata and "finterval" in tif.imagej_metadata:
                    meta = tif.imagej_metadata
                    seconds = float(meta["finterval"]) * _SECONDS.get(str(meta.get("tunit", "s")).lower(), math.nan)
                elif tif.is_ome and tif.ome_metadata:
                    pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
                    pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
                    if "TimeIncrement" in pixels:
                        unit = str(pixels.get("TimeIncrementUnit", "s")).lower()
                        seconds = float(pixels["TimeIncrement"]) * _SECONDS.get(unit, math.nan)
    except Exception:  # no metadata, another format, a damaged header: no hint
        return None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds / 3600


def frame_times_h(path: str | Path) -> list[float] | None:
    """Hours of each time point of a time-lapse file after its first, as the file records them, else None.

    OME-TIFF: each Plane's DeltaT in its DeltaTUnit (seconds when absent), the actual time of every
    frame, so an irregular series (a pause, a longer interval overnight) keeps its real times. Used
    only when every time point has one (the lowest DeltaT among a time point's planes) and they
    increase from the first; otherwise None, as for every other file (frame_interval_h then gives
    a regular interval). Metadata are a hint, never an error: anything unreadable gives None.

    Returns
    -------
    times : list of float, or None
        One per time point (T), in hours, times[0] == 0.0.
    """
    path = Path(path)
    if path.suffix.lower() in VENDOR_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if not (tif.is_ome and tif.ome_metadata):
                return None
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
        n = int(pixels.get("SizeT", 1))
        planes = pixels.get("Plane", [])
        planes = planes if isinstance(planes, list) else [planes]
        seconds: dict[int, float] = {}
        for plane in planes:
            if "DeltaT" not in plane:
                continue
            unit = str(plane.get("DeltaTUnit", "s")).lower()
            t = int(plane.get("TheT", 0))
            value = float(plane["DeltaT"]) * _SECONDS.get(unit, math.nan)
            seconds[t] = min(seconds.get(t, math.inf), value)
    except Exception:  # no metadata, another format, a damaged header: no hint
        return None
    if n < 2 or sorted(seconds) != list(range(n)):
        return None
    values = [seconds[t] for t in range(n)]
    if not all(math.isfinite(v) for v in values) or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        return None
    return [(v - values[0]) / 3600 for v in values]


def image_files(folder: str | Path) -> list[Path]:
    """The image files (by suffix, IMAGE_SUFFIXES) directly inside a folder, sorted by name.

    Hidden files are skipped: macOS writes "._name.tif" resource forks beside every file copied to
    a foreign disk, and they are not images.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        When folder is missing or not a folder.
    """
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel budget per frame: max_pixels if given, else GBM_MAX_IMAGE_MEGAPIXELS x 1e6, else 100e6.

    Raises
    ------
    ImageReadError
        Naming GBM_MAX_IMAGE_MEGAPIXELS when it is set to anything but a positive, finite number.
    """
    if max_pixels is not None:
        return int(max_pixels)
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MAX_MEGAPIXELS * 1e6)
    try:
        megapixels = float(raw)
    except ValueError:
        megapixels = float("nan")
    if not (megapixels > 0 and math.isfinite(megapixels)):
        raise ImageReadError(MAX_PIXELS_ENV, f"must be a positive number of megapixels, not {raw!r}")
    return int(megapixels * 1e6)


# ------------------------------------------------------------------------------------------- helpers


def _many_frames(n: int) -> str:
    return f"holds {n} frames (a stack or time-lapse); `gbm-assets add-plate` makes each frame its own image"


def _corrupt(path: Path, exc: BaseException) -> ImageReadError:
    # Only the exception's class: its text may quote the file's bytes.
    return ImageReadError(path, f"unreadable or corrupt image ({type(exc).__name__})")


def _check_budget(path: Path, height: int, width: int, max_pixels: int | None) -> None:
    try:
        limit = max_image_pixels(max_pixels)
    except ImageReadError as exc:
        raise ImageReadError(path, f"{MAX_PIXELS_ENV} {exc.problem}") from None
    pixels = int(height) * int(width)
    if pixels > limit:
        raise ImageReadError(
            path,
            f"header claims {width}x{height} pixels ({pixels / 1e6:.1f} megapixels per frame), more than "
            f"the limit of {limit / 1e6:g} megapixels (a guard against decompression bombs); if the image "
            f"is genuine, raise the limit with {MAX_PIXELS_ENV}=<megapixels> or max_pixels=",
        )


def _output_bits(dtype: np.dtype) -> int:
    return 8 if np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(bool)) else 16


class _Source:
    """An opened image file: its frame count, frame size and output bits, and a frame decoder."""

    n_frames: int
    height: int
    width: int
    bits: int
    frame_sizes: dict[str, int]  # the frame axes in file order (outer first), with their lengths

    def __init__(self, path: Path):
        self.path = path
        self.max_pixels: int | None = None
        self.frame_sizes = {}
        self._closers: list[Callable[[], None]] = []

    def frame(self, index: int) -> np.ndarray:
        try:
            image = self._decode(index)
        except ImageReadError:
            raise
        except Exception as exc:  # decoders raise anything on corrupt data
            raise _corrupt(self.path, exc) from None
        if image is None or np.size(image) == 0:
            raise ImageReadError(self.path, "unreadable or corrupt image (decoder returned nothing)")
        image = _to_uint(self.path, np.asarray(image))
        if image.shape != (self.height, self.width):
            raise ImageReadError(
                self.path,
                f"frame {index} decoded to shape {image.shape}, not the {self.height}x{self.width} "
                "its header claims (corrupt image)",
            )
        return image

    def _decode(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                pass
        self._closers.clear()

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: Path, max_pixels: int | None) -> _Source:
    if not path.exists():
        raise ImageReadError(path, "image file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported image type {suffix!r} (use one of {', '.join(IMAGE_SUFFIXES)})")
    if suffix in VENDOR_SUFFIXES:
        source: _Source = _BioioSource(path, suffix)
    else:
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise ImageReadError(path, f"cannot open the file ({type(exc).__name__})") from None
        try:
            try:
                head = fh.read(32)
                fh.seek(0)
            except OSError as exc:
                raise ImageReadError(path, f"cannot read the file ({type(exc).__name__})") from None
            if not head:
                raise ImageReadError(path, "empty file (unreadable or corrupt image)")
            if head[:4] in _TIFF_MAGIC:
                source = _TiffSource(path, fh)
            elif head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC) or head.startswith(_BMP_MAGIC):
                source = _RasterSource(path, fh, head)
            else:
                raise ImageReadError(path, "not a TIFF, PNG, JPEG or BMP image (its content is of another kind)")
        except BaseException:
            fh.close()
            raise
    source.max_pixels = max_pixels
    try:
        _check_budget(path, source.height, source.width, max_pixels)
    except BaseException:
        source.close()
        raise
    return source


# ----------------------------------------------------------------------------------------------- TIFF


class _TiffSource(_Source):
    def __init__(self, path: Path, fh):
        super().__init__(path)
        self._closers.append(fh.close)
        try:
            tif = tifffile.TiffFile(fh, name=path.name)
            self._closers.append(tif.close)
            series_list = tif.series
        except Exception as exc:
            self.close()
            raise _corrupt(path, exc) from None
        try:
            self._setup(tif, series_list)
        except ImageReadError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise _corrupt(path, exc) from None

    def _setup(self, tif: tifffile.TiffFile, series_list) -> None:
        path = self.path
        # A page the file itself flags (NewSubfileType) as a reduced-resolution copy of another image
        # (a thumbnail or preview, which acquisition programs write beside the image) or as a
        # transparency mask is no image of its own.
        images = [s for s in series_list if not is_thumbnail_or_mask(s.keyframe)]
        if images:
            series_list = images
        if not series_list:
            raise ImageReadError(path, "unreadable or corrupt image (no image found in the TIFF)")
        if len(series_list) > 1:
            sizes = ", ".join(_series_size(s) for s in series_list[:4])
            raise ImageReadError(
                path,
                f"holds {len(series_list)} image series ({sizes}: positions, scenes or a thumbnail); "
                "save each as its own file",
            )
        series = series_list[0]
        axes = series.get_axes(squeeze=False)
        shape = tuple(int(n) for n in series.get_shape(squeeze=False))
        sizes = dict(zip(axes, shape, strict=False))
        if sizes.get("C", 1) > 1:
            names = _channel_names(tif, sizes["C"])
            named = f" ({', '.join(repr(n[:40]) for n in names[:8])})" if names else ""
            raise ImageReadError(
                path,
                f"holds {sizes['C']} channels{named}; phase contrast is one channel (save the phase channel alone)",
            )
        if "Y" not in sizes or "X" not in sizes:
            raise ImageReadError(path, f"unsupported TIFF layout (axes {axes!r})")
        self.tif = tif
        self.series = series
        self.axes = axes
        self.shape = shape
        self.height, self.width = sizes["Y"], sizes["X"]
        self.samples = sizes.get("S", 1)
        self.frame_sizes = {a: n for a, n in zip(axes, shape, strict=False) if a not in _FRAME_AXES_EXCLUDED}
        if tif.is_imagej and [a for a, n in self.frame_sizes.items() if n > 1] == ["Z"]:
            # ImageJ calls every plain stack "slices" (a time-lapse opened as an image sequence too),
            # and writes a z-step (spacing) whenever the image is calibrated: neither says focal
            # planes, so they are an unlabelled page sequence (a hyperstack's own T and Z are kept).
            self.frame_sizes = {("I" if a == "Z" else a): n for a, n in self.frame_sizes.items()}
        self.n_frames = math.prod(self.frame_sizes.values())
        page = series.keyframe
        self.keyframe = page
        self.photometric = page.photometric
        # ImageJ saves an image shown with an inverting LUT as min-is-white but keeps its pixel values
        # (FileSaver: whiteIsZero = isInvertedLut) and reads it back so: the values are the camera's.
        self.display_inverted_only = tif.is_imagej
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            self.bits = _output_bits(page.dtype)
        else:
            self.bits = _output_bits(series.dtype)
        if self.n_frames < 1:
            raise ImageReadError(path, "unreadable or corrupt image (no image found in the TIFF)")
        # Samples beyond the colour model's own (grey: 1, RGB: 3) and its alpha are further channels
        # (e.g. phase + fluorescence written as one multi-sample page): refused, never dropped.
        alpha = sum(1 for kind in (page.extrasamples or ()) if int(kind) in (1, 2))
        own = 3 if page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR) else 1
        if self.samples > own + alpha:
            raise ImageReadError(
                path,
                f"holds {self.samples} samples per pixel ({self.samples - alpha} channels) in a "
                f"{page.photometric.name.lower()} image; phase contrast is one channel (save the phase channel alone)",
            )
        if self.photometric not in (
            tifffile.PHOTOMETRIC.MINISBLACK,
            tifffile.PHOTOMETRIC.MINISWHITE,
            tifffile.PHOTOMETRIC.RGB,
            tifffile.PHOTOMETRIC.YCBCR,
            tifffile.PHOTOMETRIC.PALETTE,
        ):
            raise ImageReadError(path, f"unsupported TIFF colour model ({self.photometric.name})")
        # tifffile (and scikit-image, which writes through it) save an array of shape (3, H, W) or
        # (4, H, W), a stack of 3 or 4 frames as often as not, as one planar RGB(A) page, and the
        # file cannot tell which was meant: its planes are only taken as colour when they are the
        # same grey (and an alpha plane constant); otherwise refused in _grey, never blended.
        shaped = tif.shaped_metadata[0] if tif.is_shaped and tif.shaped_metadata else {}
        self.planar_stack_suspect = (
            page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
            and self.photometric == tifffile.PHOTOMETRIC.RGB
            and "axes" not in shaped
            and list(shaped.get("shape", ()))[:1] == [self.samples]
        )
        pages = series.pages
        page_pixels = math.prod(page.shaped)
        self.mode = (
            "pages"
            if (
                len(pages) == self.n_frames
                and page.shaped[1] == 1
                and page_pixels == self.height * self.width * self.samples
            )
            else "contiguous"
            if (
                series.dataoffset is not None
                and page.shaped[1] == 1
                and page_pixels == self.height * self.width * self.samples
            )
            else "whole"
        )

    def _decode(self, index: int) -> np.ndarray:
        page = self.keyframe
        if self.mode == "pages":
            frame_page = self.series.pages[index]
            if frame_page is None:
                raise ImageReadError(self.path, f"frame {index} is missing from the file (corrupt image)")
            data = frame_page.asarray(squeeze=False)  # (separate samples, depth, Y, X, contig samples)
        elif self.mode == "contiguous":  # ImageJ "virtual" stacks: all frames in one block after the first page
            count = math.prod(page.shaped)
            offset = self.series.dataoffset + index * count * page.dtype.itemsize
            fh = self.tif.filehandle
            with fh.lock:
                data = fh.read_array(self.tif.byteorder + page.dtype.char, count, offset).reshape(page.shaped)
        else:  # an unusual layout (several frames per page): decode the series once, within the budget
            _check_budget(self.path, self.height * self.n_frames, self.width, self.max_pixels)
            if not hasattr(self, "_whole"):
                whole = self.series.asarray(squeeze=False)
                order = [i for i, a in enumerate(self.axes) if a not in "YXS"] + [
                    self.axes.index(a) for a in "YXS" if a in self.axes
                ]
                self._whole = np.transpose(whole, order).reshape(self.n_frames, self.height, self.width, -1)
            return self._grey(self._whole[index])
        if data.ndim == 5:
            # (separate samples, depth, Y, X, contiguous samples) -> (Y, X, samples)
            data = np.moveaxis(data[:, 0, :, :, 0], 0, -1) if data.shape[0] > 1 else data[0, 0]
        return self._grey(data)

    def _grey(self, data: np.ndarray) -> np.ndarray:
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        if data.ndim == 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if self.planar_stack_suspect and data.ndim == 3 and _planes_differ(data):
            n = data.shape[-1]
            raise ImageReadError(
                self.path,
                f"holds {n} different planes stored as one planar RGB{'A' if n == 4 else ''} image, which is how "
                f"tifffile and scikit-image save a stack of {n} frames (an array of shape ({n}, H, W)); it is "
                "not known whether they are frames or colours: save frames as pages (ImageJ TIFF, or "
                "tifffile.imwrite(..., photometric='minisblack')), colour as an (H, W, 3) array",
            )
        photometric = self.photometric
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            colormap = self.keyframe.colormap
            if colormap is None:
                raise ImageReadError(self.path, "palette TIFF without a colour map (corrupt image)")
            colormap = np.asarray(colormap)
            if data.dtype == np.uint8:
                colormap = (colormap >> 8 if colormap.max() > 255 else colormap).astype(np.uint8)
            index = data if data.ndim == 2 else data[..., 0]
            return _samples_to_grey(np.moveaxis(colormap[:, index], 0, -1), rgb=True)
        if photometric == tifffile.PHOTOMETRIC.MINISWHITE and not self.display_inverted_only:
            data = _invert(data, self.keyframe.bitspersample)
        return _samples_to_grey(data, rgb=photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR))


def _planes_differ(data: np.ndarray) -> bool:
    """(H, W, S): colour planes (the first 3) not all equal, or a further (alpha) plane not constant."""
    colour = data[..., :3]
    if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
        return True
    return any(data[..., k].min() != data[..., k].max() for k in range(3, data.shape[-1]))


def _channel_names(tif: tifffile.TiffFile, n: int) -> list[str]:
    """The n channel names an OME-TIFF (Channel Name) or ImageJ TIFF (slice Labels, when there are n)
    records, [] if none."""
    try:
        if tif.is_ome and tif.ome_metadata:
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            channels = (image[0] if isinstance(image, list) else image)["Pixels"].get("Channel", [])
            channels = channels if isinstance(channels, list) else [channels]
            return [str(c["Name"]) for c in channels if isinstance(c, dict) and c.get("Name")]
        labels = (tif.imagej_metadata or {}).get("Labels") if tif.is_imagej else None
        if labels and len(labels) == n:  # a label per slice: channel names only when the slices are the channels
            return [str(label) for label in labels]
    except Exception:  # names are a courtesy in an error message, never an error of their own
        return []
    return []


def is_thumbnail_or_mask(page) -> bool:
    """Whether a TIFF page (tifffile TiffPage/TiffFrame) is flagged in NewSubfileType as a
    reduced-resolution copy (thumbnail, preview) or a transparency mask, not the image itself."""
    flags = int(getattr(page, "subfiletype", 0) or 0)
    return bool(flags & (int(tifffile.FILETYPE.REDUCEDIMAGE) | int(tifffile.FILETYPE.MASK)))


def _series_size(series) -> str:
    sizes = dict(zip(series.get_axes(squeeze=False), series.get_shape(squeeze=False), strict=False))
    return f"{sizes.get('X', '?')}x{sizes.get('Y', '?')}"


def _invert(data: np.ndarray, bits: int) -> np.ndarray:
    if data.dtype == bool:
        return ~data
    if np.issubdtype(data.dtype, np.floating):
        return -data
    if np.issubdtype(data.dtype, np.unsignedinteger):
        top = (1 << bits) - 1 if bits < data.dtype.itemsize * 8 else np.iinfo(data.dtype).max
        return (top - np.minimum(data, top)).astype(data.dtype)
    return -data.astype(np.int64)


# ------------------------------------------------------------------------------------ PNG, JPEG, BMP


class _RasterSource(_Source):
    def __init__(self, path: Path, fh, head: bytes):
        super().__init__(path)
        self._closers.append(fh.close)
        self.fh = fh
        from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin

        if head.startswith(_PNG_MAGIC):
            factory = PngImagePlugin.PngImageFile
            # IHDR: bit depth at byte 24; OpenCV keeps 16-bit PNGs (grey or colour) 16-bit.
            self.bits = 16 if len(head) > 24 and head[24] == 16 else 8
        elif head.startswith(_JPEG_MAGIC):
            factory, self.bits = JpegImagePlugin.JpegImageFile, 8
        else:
            factory, self.bits = BmpImagePlugin.BmpImageFile, 8
        try:
            # The plugin class reads the header only (Image.open would add Pillow's own bomb check,
            # which must not override our budget).
            header = factory(fh)
            self.width, self.height = (int(n) for n in header.size)
            frames = int(getattr(header, "n_frames", 1))
        except Exception as exc:
            self.close()
            raise _corrupt(path, exc) from None
        if frames > 1:  # OpenCV would read the first frame only
            self.close()
            raise ImageReadError(path, f"animated image with {frames} frames; save each frame as its own image")
        self.n_frames = 1

    def _decode(self, index: int) -> np.ndarray:
        self.fh.seek(0)
        buffer = np.frombuffer(self.fh.read(), dtype=np.uint8)
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
        if image is None:
            return None
        if image.ndim == 3 and image.shape[2] >= 3:
            image = image[..., [2, 1, 0]]  # BGR(A) -> RGB, alpha dropped
        return _samples_to_grey(image, rgb=True)


# ----------------------------------------------------------------------------- ND2, CZI, LIF (bioio)


class _BioioSource(_Source):
    """Vendor formats through bioio.BioImage: dims T, C, Z, Y, X (and S for RGB).

    Frames are the T x Z positions (T outer, Z inner). More than one scene (position) is refused,
    like a multi-series TIFF: export each position as its own file.
    """

    def __init__(self, path: Path, suffix: str):
        super().__init__(path)
        try:
            plugin = importlib.import_module(VENDOR_SUFFIXES[suffix])
            from bioio import BioImage
        except ImportError:
            raise ImageReadError(
                path, f"reading {suffix} needs the optional extra: pip install 'gbm-assets[formats]'"
            ) from None
        try:
            self.image = image = BioImage(path, reader=plugin.Reader)
            scenes = image.scenes
            if len(scenes) > 1:
                raise ImageReadError(
                    path, f"holds {len(scenes)} scenes (positions); export each position as its own file"
                )
            order = image.dims.order
            sizes = dict(zip(order, (int(n) for n in image.dims.shape), strict=False))
            dtype = np.dtype(image.dtype)
        except ImageReadError:
            raise
        except Exception as exc:
            raise _corrupt(path, exc) from None
        if sizes.get("C", 1) > 1:
            raise ImageReadError(
                path, f"holds {sizes['C']} channels; phase contrast is one channel (export the phase channel alone)"
            )
        other = {a: n for a, n in sizes.items() if a not in "TCZYXS" and n > 1}
        if other:
            raise ImageReadError(path, f"unsupported dimensions {other} (expected T, C, Z, Y, X)")
        if "Y" not in sizes or "X" not in sizes:
            raise ImageReadError(path, f"unsupported dimensions {order!r}")
        self.sizes = sizes
        self.height, self.width = sizes["Y"], sizes["X"]
        self.frame_sizes = {"T": sizes.get("T", 1), "Z": sizes.get("Z", 1)}
        self.n_frames = sizes.get("T", 1) * sizes.get("Z", 1)
        self.bits = _output_bits(dtype)

    def _decode(self, index: int) -> np.ndarray:
        t, z = divmod(index, self.sizes.get("Z", 1))
        selection = {a: 0 for a in self.sizes if a not in "YXS"}
        if "T" in selection:
            selection["T"] = t
        if "Z" in selection:
            selection["Z"] = z
        order = "YXS" if "S" in self.sizes else "YX"
        data = np.asarray(self.image.get_image_dask_data(order, **selection).compute())
        return _samples_to_grey(data, rgb=True)


# ------------------------------------------------------------------------------------ pixel handling


def _samples_to_grey(image: np.ndarray, rgb: bool) -> np.ndarray:
    """(H, W) or (H, W, S) -> (H, W). rgb=False: the first sample is the grey one (extra samples dropped)."""
    if image.ndim != 3:
        return image
    if image.shape[2] == 1 or not rgb or image.shape[2] < 3:
        return np.ascontiguousarray(image[..., 0])  # grey (+ alpha or extra samples)
    rgb_ = image[..., :3]
    if np.array_equal(rgb_[..., 0], rgb_[..., 1]) and np.array_equal(rgb_[..., 1], rgb_[..., 2]):
        return np.ascontiguousarray(rgb_[..., 0])
    grey = rgb_[..., 0] * 0.299 + rgb_[..., 1] * 0.587 + rgb_[..., 2] * 0.114
    if np.issubdtype(rgb_.dtype, np.floating):
        return grey.astype(rgb_.dtype)
    return np.round(grey).astype(rgb_.dtype)


def _to_uint(path: Path, image: np.ndarray) -> np.ndarray:
    """Any 2-D pixel type -> uint8 or uint16 by the rules in the module docstring."""
    if image.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D single-channel image, got shape {image.shape}")
    dtype = image.dtype
    if dtype == np.uint8 or dtype == np.uint16:
        return image
    if dtype.kind == "b":
        return image.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(dtype, np.floating):
        if not np.isfinite(image).all():
            raise ImageReadError(path, "floating-point image holds NaN or infinite values")
        work = image.astype(np.float64 if dtype.itemsize > 4 else np.float32)
        lo, hi = float(work.min()), float(work.max())
        if hi <= lo:
            return np.zeros(image.shape, np.uint16)
        scaled = (work - work.dtype.type(lo)) * work.dtype.type(65535.0 / (hi - lo))
        return np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(image.min()), int(image.max())
        if lo >= 0:
            if hi <= 65535:
                return image.astype(np.uint16)
            raise ImageReadError(path, f"{dtype} values up to {hi} do not fit in 16 bits")
        if hi - lo <= 65535:
            return (image.astype(np.int64) - lo).astype(np.uint16)
        raise ImageReadError(path, f"{dtype} values from {lo} to {hi} span more than 16 bits")
    raise ImageReadError(path, f"unsupported pixel type {dtype} (use 8- or 16-bit integers or 32-bit float)")
