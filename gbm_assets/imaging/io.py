"""Reading microscope images (TIFF 8/16-bit, PNG) into 2-D NumPy arrays, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

from gbm_assets.errors import ImageReadError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def read_image(path: str | Path) -> np.ndarray:
    """Read one single-channel image as uint8 or uint16 (H, W).

    Colour images whose channels are identical (phase contrast saved as RGB) are reduced to
    one channel; truly coloured images are converted to grey by luminance.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "image file not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported image type {suffix!r} (use TIFF or PNG)")
    try:
        if suffix in (".tif", ".tiff"):
            image = tifffile.imread(path)
        else:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is not None and image.ndim == 3:
                image = image[..., ::-1] if image.shape[2] == 3 else image  # BGR -> RGB
    except Exception as exc:  # tifffile raises many kinds on corrupt files
        raise ImageReadError(path, f"unreadable or corrupt image ({type(exc).__name__}: {exc})") from exc
    if image is None or image.size == 0:
        raise ImageReadError(path, "unreadable or corrupt image (decoder returned nothing)")
    image = np.asarray(image)
    if image.ndim == 3:
        image = _to_single_channel(path, image)
    if image.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D single-channel image, got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(image.dtype, np.integer) and image.min() >= 0 and image.max() <= 65535:
            image = image.astype(np.uint16)
        else:
            raise ImageReadError(path, f"unsupported pixel type {image.dtype} (use 8- or 16-bit)")
    return image


def _to_single_channel(path: Path, image: np.ndarray) -> np.ndarray:
    # A TIFF stack (pages, H, W) has its channel axis first; an RGB(A) image has it last.
    if image.shape[-1] in (3, 4):
        rgb = image[..., :3]
    elif image.shape[0] in (1, 3, 4) and image.shape[0] < min(image.shape[1:]):
        if image.shape[0] == 1:
            return image[0]
        rgb = np.moveaxis(image[:3], 0, -1)
    else:
        raise ImageReadError(path, f"multi-page or multi-channel image of shape {image.shape} not supported")
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.round(grey).astype(rgb.dtype)


def image_size(path: str | Path) -> tuple[int, int, int]:
    """(height, width, bits) of an image without decoding all of it where the format allows."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                shape = page.shape
                bits = np.dtype(page.dtype).itemsize * 8
                if len(shape) == 2:
                    return int(shape[0]), int(shape[1]), bits
        except Exception:
            pass  # fall through to a full read, which raises the precise error
    image = read_image(path)
    return image.shape[0], image.shape[1], image.dtype.itemsize * 8
