"""Cell finding and cropping over a whole plate, image by image, on all cores.

Work is spread over a process pool (one image per task); results come back in manifest
order so output is deterministic whatever the number of workers. Label masks travel and are
stored as their 16-bit pixels compressed with Zstandard (encode_labels: lossless, smaller than a
PNG and about ten times faster to write and read back); cell_crops reads masks of either kind.
Given a CropRequest, cell finding also crops each image while its worker holds the image and its
label mask (ImageCells.crops), so that one ingest run reads each image once for both assets.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gbm_assets.errors import ImageReadError
from gbm_assets.imaging import magnification
from gbm_assets.imaging.cell_quality import kept_candidates
from gbm_assets.imaging.cell_size import (
    CellSizeEstimate,
    cell_diameters,
    confirms_magnification,
    edge_corrected,
    estimate_from_diameters,
    sample_images,
    whole_cell_weights,
)
from gbm_assets.imaging.cellprofiler_masks import cells_at_objects
from gbm_assets.imaging.crops import extract_crops
from gbm_assets.imaging.field_quality import field_quality
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.neighbors import with_neighbors
from gbm_assets.imaging.segmentation import SegmentationParams, find_candidates_boxed
from gbm_assets.imaging.worker_memory import keep_freed_memory
from gbm_assets.schema import CONTEXT_COLUMNS, CROP_SCHEMA, MEASUREMENT_COLUMNS, make_crop_id

Progress = Callable[[int, int], None] | None


LABELS_CODEC = "zstd"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _uint16_labels(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{where}: more than 65535 cells in one image cannot be stored")
    return np.ascontiguousarray(labels, np.uint16)


def encode_labels(labels: np.ndarray, where: str = "labels") -> bytes:
    """A label image as stored between cell_coordinates and cell_crops (lossless).

    labels: (H, W) integer instance labels, 0 = background. Returns its uint16 pixels in row
    order compressed with Zstandard (pyarrow's codec); decode_labels needs (H, W) back.
    Raises ValueError naming `where` when a label exceeds 65535.
    """
    # the array itself, not a tobytes() copy of it (about 1 ms per megapixel image): the same bytes in
    return pa.compress(_uint16_labels(labels, where), LABELS_CODEC, asbytes=True)


def png_labels(labels: np.ndarray, where: str = "labels") -> bytes:
    """A label image as a lossless 16-bit PNG file's bytes (what `gbm-assets segment --masks` writes).

    Raises ValueError naming `where` when a label exceeds 65535 or encoding fails.
    """
    ok, buf = cv2.imencode(".png", _uint16_labels(labels, where))
    if not ok:
        raise ValueError(f"{where}: could not encode label mask")
    return buf.tobytes()


def decode_labels(data: bytes, shape: tuple[int, int], where: str = "labels") -> np.ndarray:
    """The (H, W) = shape uint16 label image from encode_labels' bytes, or from a 16-bit PNG
    (masks stored before the codec changed). Raises ValueError naming `where` when the bytes
    are not such a mask or hold another size."""
    try:
        if data[:8] == _PNG_SIGNATURE:
            labels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        else:
            size = int(np.prod(shape)) * 2
            labels = np.frombuffer(pa.decompress(data, size, LABELS_CODEC, asbytes=True), np.uint16).reshape(shape)
    except (pa.ArrowException, OSError, ValueError, cv2.error) as e:
        raise ValueError(f"{where}: stored label mask is corrupt ({e})") from e
    if labels is None or labels.shape != tuple(shape):
        got = "unreadable" if labels is None else f"{labels.shape}"
        raise ValueError(f"{where}: label mask {got} does not match image {tuple(shape)}")
    return labels


MIN_IMAGE_SIDE_PX = 32  # a smaller image cannot hold a whole cell at the set-ups cell finding is tuned for


def check_image_size(shape: tuple[int, ...], where: str | Path) -> None:
    """Raise ImageReadError naming `where` when an image of (H, W) = shape[:2] px is smaller than
    MIN_IMAGE_SIDE_PX on a side (cell finding's filters would otherwise fail deep in OpenCV)."""
    height, width = shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE_PX:
        raise ImageReadError(
            where,
            f"image is {width}x{height} px; cell finding needs at least {MIN_IMAGE_SIDE_PX} px on each "
            "side (a cell is about 40-70 px across at the reference set-up)",
        )


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _map_in_order(fn, tasks: list, workers: int, progress: Progress) -> Iterator:
    """Run fn over tasks, in a process pool when workers > 1, yielding results in task order."""
    total = len(tasks)
    results = map(fn, tasks) if workers <= 1 or total <= 1 else _pool(workers).map(fn, tasks, chunksize=1)
    for done, result in enumerate(results, 1):
        if progress:  # before handing it over: a consumer that stops at the last one still reports it
            progress(done, total)
        yield result


_POOLS: dict[tuple[int, int], ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool kept for the life of the process, so plate after plate reuses warm workers.

    forkserver: safe when the parent has threads (Dagster, TensorFlow); preloading this module
    in the server makes each worker a cheap fork rather than a fresh interpreter importing OpenCV.
    Workers exit when the process that made the pool dies, even by SIGKILL (see _exit_with_owner);
    the fork server and multiprocessing's resource tracker follow once no worker holds their pipes.
    """
    key = (os.getpid(), workers)  # a forked child must not reuse its parent's pool
    pool = _POOLS.get(key)
    if pool is None or getattr(pool, "_broken", False):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        pool = _POOLS[key] = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
        )
    return pool


def _ppid_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (Linux), None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _owner_is_ancestor(owner: int) -> bool:
    """True while `owner` is this worker's parent (fork/spawn) or its parent's parent (forkserver).

    When the owner dies its children are re-parented (to init or a subreaper), so the chain
    breaks at once; a recycled pid elsewhere cannot pass for the owner.
    """
    parent = os.getppid()
    if parent == owner:
        return True
    grandparent = _ppid_of(parent)
    if grandparent is None:  # no /proc: fall back to "the owner pid still exists"
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    return grandparent == owner


def _exit_with_owner(owner: int) -> None:
    """Make this worker process end when `owner` (the process that made the pool) dies.

    Three layers, because a SIGKILLed owner runs no clean-up: prctl(PR_SET_PDEATHSIG, SIGKILL)
    kills the worker with its direct parent (the fork server); a check right after that the
    owner is still an ancestor catches an owner that died before the prctl; and a daemon thread
    blocked on a pidfd of the owner (polling once a second where pidfds do not exist) exits the
    worker when the owner dies. The fork server itself stays up while any worker holds its
    "alive" pipe, so this last layer is what lets the whole tree go.
    """
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(owner)
        except OSError:
            pidfd = None
    if not _owner_is_ancestor(owner):
        os._exit(1)

    def watch() -> None:
        if pidfd is not None:
            import select

            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll():  # readable once the owner has exited
                pass
            os._exit(1)
        import time

        while _owner_is_ancestor(owner):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="gbm-owner-watch", daemon=True).start()


def worker_setup() -> None:
    """What every cell-finding worker process sets at start: one OpenCV thread, and a heap that
    keeps freed image-sized buffers for the next image (worker_memory.keep_freed_memory)."""
    cv2.setNumThreads(1)
    keep_freed_memory()


def _init_worker(owner: int | None = None) -> None:
    """Pool worker start-up: worker_setup; exit with `owner` (a pid) when given."""
    worker_setup()
    if owner is not None:
        _exit_with_owner(owner)


# ---------------------------------------------------------------- cell finding


@dataclass(frozen=True)
class CropFilters:
    """The thesis' image filters; None switches a filter off."""

    max_cells_per_image: int | None = None  # keep images with fewer cells than this (thesis: 100)
    min_timepoint_h: float | None = None  # keep images at or after this time point
    max_timepoint_h: float | None = None  # keep images at or before this time point (thesis: 1)

    def keep_image(self, n_cells: int, timepoint_h: float) -> bool:
        if self.max_cells_per_image is not None and n_cells >= self.max_cells_per_image:
            return False
        if self.min_timepoint_h is not None and timepoint_h < self.min_timepoint_h:
            return False
        if self.max_timepoint_h is not None and timepoint_h > self.max_timepoint_h:
            return False
        return True


@dataclass
class ImageCells:
    """Cell candidates found in one image (with their qc labels), its label mask (encode_labels'
    bytes) and its image quality measures (field_quality's ImageQuality_* columns). crops: the
    image's crops (cells, pixels, masks as crop_plate makes them) when a CropRequest asked for
    them and the image passes its filters, else None."""

    image: str
    cells: pd.DataFrame
    labels: bytes
    height: int
    width: int
    measures: dict[str, float]
    crops: tuple[pd.DataFrame, np.ndarray, np.ndarray] | None = None
    fine_scale: float | None = None  # magnification.fine_scale (px) when it was asked for


@dataclass(frozen=True)
class CropRequest:
    """The crops cell_crops will make of a plate, so that cell finding makes them in the same
    pass, while it holds each image and its label mask (no second read or mask decode).

    crop_size: crop side in px (positive, even); keep_qc: the qc labels cropped; filters: the
    image filters; timepoints: each image's timepoint_h (the manifest's), for the filters.
    The crops are those crop_plate makes from the stored coordinates and masks, byte for byte.
    """

    crop_size: int = 128
    keep_qc: tuple[str, ...] = ("cell",)
    filters: CropFilters = CropFilters()
    timepoints: Mapping[str, float] = field(default_factory=dict)

    def settings(self) -> dict:
        """crop_size, keep_qc and filters as JSON-ready values: what a stored result was made with."""
        return {"crop_size": int(self.crop_size), "keep_qc": list(self.keep_qc), **asdict(self.filters)}

    def task(self, name: str) -> tuple:
        """What a worker needs to crop image `name` (KeyError when its timepoint is not known)."""
        return (self.crop_size, tuple(self.keep_qc), self.filters, float(self.timepoints[name]))


CROP_CELL_COLUMNS = ["cell_id", "x", "y", *MEASUREMENT_COLUMNS, "qc"]


def _cells_to_crop(
    cells: pd.DataFrame, keep_qc: Iterable[str], filters: CropFilters, timepoint_h: float
) -> pd.DataFrame | None:
    """One image's candidates that get crops (those whose qc is in keep_qc; CROP_CELL_COLUMNS and
    the neighbour measurements and cell_diameter_px the table has),
    None when there is none or the image filters drop the image. Both cropping paths use it."""
    kept = kept_candidates(cells, keep_qc).reset_index(drop=True)
    if kept.empty or not filters.keep_image(len(kept), timepoint_h):
        return None
    return kept[CROP_CELL_COLUMNS + [c for c in CONTEXT_COLUMNS if c in kept]]


def _image_crops(image: np.ndarray, cells: pd.DataFrame, labels: np.ndarray, crop: tuple | None):
    """(cells, pixels, masks) of one image's kept candidates, as crop_plate makes them; None when
    there is no request, no kept candidate or the image filters drop the image."""
    if crop is None:
        return None
    crop_size, keep_qc, filters, timepoint_h = crop
    chosen = _cells_to_crop(cells, keep_qc, filters, timepoint_h)
    if chosen is None:
        return None
    batch = extract_crops(image, chosen, labels, crop_size)
    return batch.cells, batch.pixels, batch.masks


def _segment_task(task: tuple, fine_scale: bool = False) -> ImageCells:
    """One image's ImageCells; fine_scale: with its magnification.fine_scale too (same read)."""
    plate_dir, name, params, *crop = task
    image = read_image(plate_dir / name)
    check_image_size(image.shape, plate_dir / name)
    cells, labels, measures, boxes = find_candidates_boxed(image, params)
    # here, where the labels are (the main process decodes them only for an edge-corrected size
    # estimate's few sampled images), on cell finding's boxes
    cells = with_neighbors(cells, labels, boxes=boxes)
    crops = _image_crops(image, cells, labels, crop[0] if crop else None)
    scale = magnification.fine_scale(image) if fine_scale else None
    return ImageCells(name, cells, encode_labels(labels, str(plate_dir / name)), *image.shape, measures, crops, scale)


def _objects_task(task: tuple) -> ImageCells:
    plate_dir, name, params, objects, *crop = task
    image = read_image(plate_dir / name)
    check_image_size(image.shape, plate_dir / name)
    cells, labels = cells_at_objects(image, objects, params)
    # CellProfiler's objects are the user's own choice of cells: kept as cells, not judged again
    cells = with_neighbors(cells.assign(qc="cell", qc_reason="CellProfiler object"), labels)
    measures = field_quality(image, labels, params.cell_diameter_px).measures
    crops = _image_crops(image, cells, labels, crop[0] if crop else None)
    return ImageCells(name, cells, encode_labels(labels, str(plate_dir / name)), *labels.shape, measures, crops)


def find_plate_cells_sized(
    plate_dir: str | Path,
    images: Iterable[str],
    params: SegmentationParams = SegmentationParams(),
    sample: int = 8,
    workers: int = 1,
    progress: Progress = None,
    crop: CropRequest | None = None,
) -> tuple[CellSizeEstimate, SegmentationParams, Iterator[ImageCells]]:
    """Estimate a plate's typical cell diameter, then find each image's cells at the scale it calls for.

    The estimate (see cell_size) comes from a first pass at `params` over up to `sample` images
    spread evenly over the list (cell_size.sample_images: the same ones on every run), which also
    measures the set-up's magnification (magnification.fine_scale of up to magnification.IMAGES
    of them, from the same read); where that calls for another scale, the first pass runs again
    at it. Cells are then found at estimate.params(params), and the first pass's results are kept
    where that is the first pass's scale. With workers > 1, a worker left idle while the last first-pass images finish starts
    on the other images at `params`, so the pool does not wait for the estimate; that work is
    discarded when the scale changes (it cost only otherwise idle time, and at most one image per
    worker still running).

    Returns (estimate, the params cells are found at, ImageCells per image in image order, with
    their crops when `crop` asks for them; the iterator reports progress(done, total) as it
    goes). Raises the image reader's errors, naming the file, for an unreadable image (from the
    first pass or while iterating).
    """
    plate_dir = Path(plate_dir)
    images = list(images)
    picked = sample_images(images, sample)
    probes = set(sample_images(picked, magnification.IMAGES))  # their fine scale: the magnification

    def task(name: str, at: SegmentationParams) -> tuple:
        return (plate_dir, name, at, crop.task(name)) if crop is not None else (plate_dir, name, at)

    def confirmed(
        first: Mapping[str, ImageCells],
        scales: dict[str, float],
        run: Callable[[SegmentationParams], dict[str, ImageCells]],
    ) -> tuple[SegmentationParams, dict[str, ImageCells]] | None:
        """Inside the magnification band but checked (magnification.checked), with an estimate
        from the first pass at params (`first`): the multiplied scale and the first pass run(at
        it) when the cells found there confirm it (cell_size.confirms_magnification); else None
        (also when not checked, or with too few cells for an estimate at params)."""
        ratio = magnification.relative_magnification(scales.values())
        if not magnification.checked(ratio):
            return None
        seen = estimate_from_diameters([cell_diameters(first[name].cells, params.cell_diameter_px) for name in picked])
        if seen.diameter_px is None:  # too few cells at the default scale to check anything by
            return None
        at_m = magnification.multiplied(params, ratio)
        first_m = run(at_m)
        found = estimate_from_diameters([cell_diameters(first_m[name].cells, at_m.cell_diameter_px) for name in picked])
        return (at_m, first_m) if confirms_magnification(at_m.cell_diameter_px, found) else None

    def sized(
        first: Mapping[str, ImageCells], at: SegmentationParams, scales: dict[str, float], confirmed: bool = False
    ) -> tuple[CellSizeEstimate, SegmentationParams]:
        """The estimate (with the magnification measured as `scales`: each probe's fine scale;
        confirmed: a magnification inside the band confirmed) and the scale cells are found at,
        from a first pass at `at`."""
        ratio = magnification.relative_magnification(scales.values())
        found = estimate_from_diameters(
            [cell_diameters(first[name].cells, at.cell_diameter_px) for name in picked],
            # edge-corrected above the magnification band only (see cell_size.edge_corrected)
            [whole_cell_weights(first[name].cells, _labels_of(first[name])) for name in picked]
            if edge_corrected(ratio)
            else None,
        )
        return replace(
            found, magnification=ratio, fine_scales=tuple(scales.items()), confirmed=confirmed
        ), found.params(at)

    again = {"workers": workers, "progress": progress, "crop": crop}
    if workers <= 1 or len(images) <= 1:
        first = {name: _segment_task(task(name, params), name in probes) for name in picked}
        scales = {name: first[name].fine_scale for name in picked if name in probes}
        at = magnification.magnified(params, magnification.relative_magnification(scales.values()))
        if at != params:  # another magnification: the first pass again at its scale
            first = {name: _segment_task(task(name, at)) for name in picked}
        check = confirmed(first, scales, lambda at_m: {name: _segment_task(task(name, at_m)) for name in picked})
        if check is not None:
            at, first = check
        size, scaled = sized(first, at, scales, check is not None)
        kept = first if scaled == at else {}
        return size, scaled, find_plate_cells(plate_dir, images, scaled, found=kept, **(again | {"workers": 1}))
    pool = _pool(workers)
    futures = {name: pool.submit(_segment_task, task(name, params), name in probes) for name in picked}
    rest = iter([name for name in images if name not in futures])
    try:
        waiting = set(futures.values())
        while waiting:
            in_flight = sum(not f.done() for f in futures.values())
            while in_flight < workers and (name := next(rest, None)) is not None:
                futures[name] = pool.submit(_segment_task, task(name, params))
                in_flight += 1
            waiting = wait(waiting, return_when=FIRST_COMPLETED).not_done
        scales = {name: futures[name].result().fine_scale for name in picked if name in probes}
        at = magnification.magnified(params, magnification.relative_magnification(scales.values()))
        first = {name: futures[name].result() for name in picked}
        if at != params:  # another magnification: the first pass again at its scale
            _cancel(futures.values())
            first = dict(
                zip(picked, _map_in_order(_segment_task, [task(n, at) for n in picked], workers, None), strict=True)
            )
        check = confirmed(
            first,
            scales,
            lambda at_m: dict(
                zip(picked, _map_in_order(_segment_task, [task(n, at_m) for n in picked], workers, None), strict=True)
            ),
        )
        if check is not None:
            _cancel(futures.values())
            at, first = check
        size, scaled = sized(first, at, scales, check is not None)
    except BaseException:
        _cancel(futures.values())
        raise
    if scaled != params:
        _cancel(futures.values())  # found at a scale not wanted: all images again at the right one
        kept = first if scaled == at else {}
        return size, scaled, find_plate_cells(plate_dir, images, scaled, found=kept, **again)
    for name in rest:
        futures[name] = pool.submit(_segment_task, task(name, params))
    return size, scaled, _results_in_order(futures, images, progress)


def _labels_of(found: ImageCells) -> np.ndarray:
    """The (H, W) uint16 label mask of an image's candidates, decoded from its ImageCells."""
    return decode_labels(found.labels, (found.height, found.width), found.image)


def _cancel(futures: Iterable[Future]) -> None:
    for future in futures:
        future.cancel()


def _results_in_order(futures: dict[str, Future], images: list[str], progress: Progress) -> Iterator[ImageCells]:
    """Each image's result in image order (dropping it once yielded); the rest are cancelled
    when the caller stops early or a task fails."""
    try:
        for done, name in enumerate(images, 1):
            result = futures.pop(name).result()
            if progress:
                progress(done, len(images))
            yield result
    finally:
        _cancel(futures.values())


def find_plate_cells(
    plate_dir: str | Path,
    images: Iterable[str],
    params: SegmentationParams = SegmentationParams(),
    objects: pd.DataFrame | None = None,
    workers: int = 1,
    progress: Progress = None,
    found: Mapping[str, ImageCells] | None = None,
    crop: CropRequest | None = None,
) -> Iterator[ImageCells]:
    """Find cells in each image of a plate (or place them at `objects`, a CellProfiler table),
    yielding them in image order and reporting progress(done, total) after each. found: images
    already done at these params, not redone. crop: also crop each image (ImageCells.crops)."""
    plate_dir = Path(plate_dir)
    images = list(images)
    found = found or {}
    todo = [name for name in images if name not in found]
    extra = (lambda name: (crop.task(name),)) if crop is not None else (lambda name: ())
    if objects is None:
        tasks = [(plate_dir, name, params, *extra(name)) for name in todo]
        fn = _segment_task
    else:
        groups = {name: g.reset_index(drop=True) for name, g in objects.groupby("image", sort=False)}
        empty = objects.iloc[0:0]
        tasks = [(plate_dir, name, params, groups.get(name, empty), *extra(name)) for name in todo]
        fn = _objects_task
    computed = _map_in_order(fn, tasks, workers, None)
    for done, name in enumerate(images, 1):
        result = found[name] if name in found else next(computed)
        if progress:
            progress(done, len(images))
        yield result


# ---------------------------------------------------------------- crops


def _crop_task(task) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    plate_dir, name, cells, encoded, crop_size = task
    image = read_image(plate_dir / name)
    labels = decode_labels(encoded, image.shape, str(plate_dir / name))
    batch = extract_crops(image, cells, labels, crop_size)
    return batch.cells, batch.pixels, batch.masks


def crop_plate(
    plate_id: str,
    plate_dir: str | Path,
    manifest: pd.DataFrame,
    coordinates: pd.DataFrame,
    masks: Mapping[str, bytes],
    crop_size: int = 128,
    filters: CropFilters = CropFilters(),
    workers: int = 1,
    progress: Progress = None,
    keep_qc: Iterable[str] = ("cell",),
) -> Iterator[pa.Table]:
    """Yield one Arrow table (CROP_SCHEMA) per kept image of a plate, in manifest order.

    Only candidates whose qc label is in keep_qc are cropped (see kept_candidates). masks: each
    image's label mask as encode_labels (or a 16-bit PNG) gives it. Raises the image reader's
    errors, and ValueError naming the image when its mask is corrupt or of another size.
    """
    plate_dir = Path(plate_dir)
    by_image = dict(tuple(coordinates.groupby("image", sort=False)))
    tasks, meta = [], []
    for row in manifest.itertuples(index=False):
        cells = by_image.get(row.image)
        chosen = None if cells is None else _cells_to_crop(cells, keep_qc, filters, row.timepoint_h)
        if chosen is None:
            continue
        tasks.append((plate_dir, row.image, chosen, masks[row.image], crop_size))
        meta.append(row)
    for row, (cells, pixels, crop_masks) in zip(
        meta, _map_in_order(_crop_task, tasks, workers, progress), strict=False
    ):
        yield crops_table(plate_id, row, cells, pixels, crop_masks, crop_size)


# Crops made in the cell-finding pass wait beside the crops file, hidden (a leading dot: dataset
# readers skip it), until cell_crops adopts them. They and the coordinates they were cut from
# carry the same random token in their Parquet key-value metadata, and the crops their settings.
CROPS_PASS_KEY = b"gbm_assets.crops_pass"
CROP_SETTINGS_KEY = b"gbm_assets.crop_settings"


def pending_crops_path(crops_file: str | Path) -> Path:
    """Where crops made in the cell-finding pass wait for cell_crops: beside crops_file, hidden."""
    crops_file = Path(crops_file)
    return crops_file.with_name(f".pending-{crops_file.name}")


def crops_pass_metadata(token: str, request: CropRequest | None = None) -> dict[bytes, bytes]:
    """Parquet key-value metadata tying crops made in a cell-finding pass to its coordinates:
    the pass' token, and (for the crops file) the request's settings as JSON."""
    meta = {CROPS_PASS_KEY: token.encode()}
    if request is not None:
        meta[CROP_SETTINGS_KEY] = json.dumps(request.settings(), sort_keys=True).encode()
    return meta


def pass_token(source: str | Path | pa.Schema) -> bytes | None:
    """The cell-finding pass token recorded in a Parquet file's key-value metadata (coordinates,
    label masks and pending crops of one pass share it), from the file or from a schema already
    read; None when it records none (files written before tokens existed). Raises OSError or
    pyarrow's error for a missing or unreadable file."""
    schema = source if isinstance(source, pa.Schema) else pq.read_schema(source)
    return (schema.metadata or {}).get(CROPS_PASS_KEY)


def pending_crops_match(pending: str | Path, coordinates_file: str | Path | pa.Schema, request: CropRequest) -> bool:
    """True when `pending` (crops made in a cell-finding pass) is what crop_plate would make now:
    cut from the coordinates in coordinates_file (or of that schema, as read; same pass token)
    with request's settings. False when either file is missing or lacks the records, or any of
    them differs."""
    try:
        made = pq.read_schema(pending).metadata or {}
        coords_token = pass_token(coordinates_file)
    except (OSError, pa.ArrowException):
        return False
    token = made.get(CROPS_PASS_KEY)
    return (
        token is not None
        and coords_token == token
        and made.get(CROP_SETTINGS_KEY) == crops_pass_metadata("", request)[CROP_SETTINGS_KEY]
    )


def crops_table(
    plate_id: str, row, cells: pd.DataFrame, pixels: np.ndarray, masks: np.ndarray, crop_size: int
) -> pa.Table:
    """Arrow table of one image's crops with full provenance (CROP_SCHEMA column order)."""
    n = len(cells)
    cols = {
        "crop_id": [make_crop_id(plate_id, row.image, c) for c in cells["cell_id"]],
        "plate": [plate_id] * n,
        "image": [row.image] * n,
        "x": cells["x"].to_numpy(np.int32),
        "y": cells["y"].to_numpy(np.int32),
        "culture": [row.culture] * n,
        "concentration": [str(row.concentration)] * n,
        "replicate": np.full(n, row.replicate, np.int32),
        "timepoint_h": np.full(n, row.timepoint_h, np.float64),
        "well": [str(row.well)] * n,
        "position": [str(row.position)] * n,
        "cell_id": cells["cell_id"].to_numpy(np.int32),
        **{m: cells[m].to_numpy(np.float64) for m in MEASUREMENT_COLUMNS},
        # neighbour measurements: NaN for coordinates written before they were measured
        **{m: cells[m].to_numpy(np.float64) if m in cells else np.full(n, np.nan) for m in CONTEXT_COLUMNS},
        "qc": cells["qc"].astype(str).tolist() if "qc" in cells else ["cell"] * n,
        "crop_size": np.full(n, crop_size, np.int16),
        "pixels": [p.tobytes() for p in pixels],
        "mask": [m.tobytes() for m in masks],
    }
    return pa.table(cols, schema=CROP_SCHEMA)
