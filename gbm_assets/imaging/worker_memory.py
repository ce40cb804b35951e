"""Heap settings for cell-finding worker processes: freed image-sized buffers are kept for reuse.

Cell finding makes and frees a few dozen image-sized temporaries per image (a 1-megapixel float32
image is 4 MiB). glibc's malloc serves a block above its mmap threshold (128 KiB at start, raised
as large blocks are freed, up to 32 MiB) with freshly mapped pages that it unmaps on free, and
returns free memory past 128 KiB at the top of the heap to the system: each such array's pages are
then faulted in and zeroed by the kernel again, image after image. On the segmentation
benchmark's path that was about a tenth of a worker's CPU time (the scikit-image reference, which
allocates less per image, gained 2%). A worker that keeps its freed memory (mapped pages only for
blocks over 32 MiB, the most glibc allows; memory returned only past 256 MiB free at the top of
the heap) reuses the same pages: its resident size stays near its peak, a few hundred MiB for
1-megapixel images. Nothing computed changes.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set this process' glibc malloc thresholds as the module docstring says.

    Returns True when both were set, False where they cannot be (not Linux, a C library without
    mallopt, e.g. musl, or one that refuses the values): the allocator's defaults then stay, and
    only speed differs. Raises nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    trimmed = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(mapped) and bool(trimmed)
