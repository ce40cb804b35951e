"""The one reader of the cell_crops Parquet dataset (plate=<id>/part-0.parquet, CROP_SCHEMA); no TensorFlow.

Crops are read one record batch at a time (one Parquet file per plate) and decoded without
copying: the binary pixel and mask columns of a record batch are one contiguous buffer, viewed
as (n, S, S) uint8 with np.frombuffer. Memory therefore depends on the batch size, never on the
number of crops. Everything that reads crops goes through this module: training
(models.dataset feeds iter_record_batches into tf.data), embedding (iter_crop_batches), and the
report, explorer and raw-pixel baseline (read_crops / iter_crops_by_id, by crop_id, streamed too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from gbm_assets.errors import InputError
from gbm_assets.imaging.crops import decode_crops
from gbm_assets.schema import PROVENANCE_COLUMNS
from gbm_assets.storage import plate_dataset, seeded_sample, take_rows

INTERLEAVE_PLATES = 8  # plates read at once in seeded order, so that shuffled batches mix plates
_READ_BUFFER = 1 << 20  # bytes; stream Parquet pages instead of loading whole column chunks


@dataclass(frozen=True)
class CropSelection:
    """Which crops to use: all, only some plates, and/or a seeded random subset of max_crops."""

    crops_dir: Path
    plates: tuple[str, ...] | None = None
    max_crops: int | None = None
    seed: int = 0

    @classmethod
    def of(cls, crops_dir, plates: Sequence[str] | None = None, max_crops: int | None = None, seed: int = 0):
        return cls(Path(crops_dir), tuple(plates) if plates is not None else None, max_crops, seed)


def _open(selection: CropSelection) -> tuple[pds.Dataset, list]:
    """The dataset and its (fragment, kept row indices or None) pairs, in file path order.

    Raises InputError when the folder does not exist.
    """
    if not selection.crops_dir.is_dir():
        raise InputError(selection.crops_dir, "crops dataset not found (materialize cell_crops first)")
    dataset = plate_dataset(selection.crops_dir)
    where = pds.field("plate").isin(list(selection.plates)) if selection.plates is not None else None
    fragments = sorted(dataset.get_fragments(filter=where), key=lambda f: f.path)
    if selection.max_crops is None:
        return dataset, [(f, None) for f in fragments]
    counts = np.array([f.count_rows() for f in fragments], dtype=np.int64)
    chosen = seeded_sample(int(counts.sum()), selection.max_crops, selection.seed)
    if chosen is None:  # every crop: the plates that have any
        return dataset, [(f, None) for f, n in zip(fragments, counts, strict=False) if n]
    starts = np.concatenate([[0], np.cumsum(counts)])
    kept = []
    for i, fragment in enumerate(fragments):
        local = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(local):
            kept.append((fragment, local))
    return dataset, kept


def count_crops(selection: CropSelection) -> int:
    """Number of selected crops, from the Parquet footers. Raises InputError if the dataset is missing."""
    _, fragments = _open(selection)
    return int(sum(f.count_rows() if rows is None else len(rows) for f, rows in fragments))


def _crop_side(dataset: pds.Dataset) -> int | None:
    head = dataset.head(1, columns=["crop_size"])
    return int(head.column("crop_size")[0].as_py()) if head.num_rows else None


def read_crop_size(crops_dir) -> int:
    """The crop side S in pixels (from the first row).

    Raises InputError when the dataset is missing or holds no crops.
    """
    dataset, _ = _open(CropSelection.of(crops_dir))
    side = _crop_side(dataset)
    if side is None:
        raise InputError(crops_dir, "crops dataset holds no crops")
    return side


def crop_plates(crops_dir) -> list[str]:
    """Sorted ids of the plates that have a crops file (plate=<id>/part-0.parquet); [] if none."""
    return sorted(p.name.split("=", 1)[1] for p in Path(crops_dir).glob("plate=*") if (p / "part-0.parquet").is_file())


def _fragment_batches(fragment, rows, columns, batch_size) -> Iterator[pa.RecordBatch]:
    """Stream one plate file. ParquetFile.iter_batches with a buffered input stream holds about
    one record batch of decoded data at a time, where a dataset Scanner (read-ahead of batches
    and whole column chunks) measured 3-6x more memory on a 10,000-crop plate."""
    keys = pds.get_partition_keys(fragment.partition_expression)  # plate, if not stored in the file
    with pq.ParquetFile(fragment.path, buffer_size=_READ_BUFFER, pre_buffer=False) as reader:
        present = [c for c in columns if c in reader.schema_arrow.names]
        missing = [c for c in columns if c not in present and c not in keys]
        if missing:
            raise InputError(fragment.path, f"crops file lacks column(s) {', '.join(missing)}")
        for batch in take_rows(reader.iter_batches(batch_size=batch_size, columns=present, use_threads=False), rows):
            for name in columns:
                if name not in present:
                    batch = batch.append_column(name, pa.array([keys[name]] * batch.num_rows, pa.string()))
            yield batch.select(list(columns))


def iter_record_batches(
    selection: CropSelection, columns: Sequence[str], batch_size: int, order_seed: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Record batches of at most batch_size rows of the selected crops, holding `columns`.

    order_seed None reads plates one after another in path order (inference: stable row
    order). With a seed, plates come in a seeded random order, INTERLEAVE_PLATES at a time in
    round-robin, so that a bounded shuffle buffer still sees many plates. Raises InputError
    when the dataset is missing or a file lacks one of `columns`.
    """
    _, fragments = _open(selection)
    if order_seed is None:
        for fragment, rows in fragments:
            yield from _fragment_batches(fragment, rows, columns, batch_size)
        return
    order = np.random.default_rng(order_seed).permutation(len(fragments))
    pending = [fragments[i] for i in order]
    active: list[Iterator[pa.RecordBatch]] = []
    while pending or active:
        while pending and len(active) < INTERLEAVE_PLATES:
            fragment, rows = pending.pop(0)
            active.append(_fragment_batches(fragment, rows, columns, batch_size))
        for reader in list(active):
            batch = next(reader, None)
            if batch is None:
                active.remove(reader)
            else:
                yield batch


def iter_crop_batches(
    crops_dir, batch_size: int = 256, columns: Sequence[str] = PROVENANCE_COLUMNS, plates: Sequence[str] | None = None
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """(rows of `columns`, float32 pixels (n, S, S, 1) scaled to [0, 1]) per record batch, in dataset order.

    n <= batch_size. Raises InputError when the dataset is missing, empty or lacks a column.
    """
    size = read_crop_size(crops_dir)
    for batch in iter_record_batches(CropSelection.of(crops_dir, plates), [*columns, "pixels"], batch_size):
        pixels = decode_crops(batch.column("pixels"), size)
        rows = batch.drop_columns(["pixels"]).to_pandas()
        yield rows, (pixels.astype(np.float32) / np.float32(255.0))[..., None]


def iter_crops_by_id(
    crops_dir: str | Path, crop_ids, column: str = "pixels", batch_size: int = 256
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, crops) for the given crops, streamed: one record batch of pixels at a time.

    positions: (m,) int64 indices into crop_ids; crops: (m, S, S) uint8, a read-only view (the
    `column`, "pixels" or "mask", of those rows), m <= batch_size. Plate files are read one
    after another: first their crop_id column, then only the row groups that hold a wanted
    crop, batch_size rows at a time, keeping the wanted rows only. Memory is about one record batch of pixels plus one
    plate's crop ids, whatever the number of crops in the dataset (a dataset Scanner reads ahead
    whole column chunks of several files: hundreds of MB on large plates). Crops not in the
    dataset are never yielded (read_crops reports them). Raises ValueError when crop_ids repeat
    an id, InputError when a file lacks `column`.
    """
    wanted = pd.Index(pd.Series(crop_ids, dtype=str))
    if not wanted.is_unique:
        raise ValueError(f"{crops_dir}: crop ids asked for twice: {wanted[wanted.duplicated()][:3].tolist()}")
    if not len(wanted):
        return
    value_set = pa.array(wanted.to_numpy(), pa.string())
    dataset = plate_dataset(crops_dir)
    side = _crop_side(dataset) or 0
    for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
        with pq.ParquetFile(fragment.path, buffer_size=_READ_BUFFER, pre_buffer=False) as reader:
            if column not in reader.schema_arrow.names:
                raise InputError(fragment.path, f"crops file lacks column {column}")
            ids = reader.read(columns=["crop_id"], use_threads=False).column("crop_id")
            where = pc.index_in(ids, value_set=value_set).to_numpy(zero_copy_only=False)  # NaN: not wanted
            del ids
            rows = np.flatnonzero(~np.isnan(where))
            if not len(rows):
                continue
            positions = where[rows].astype(np.int64)
            sizes = np.array([reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            group_of = np.searchsorted(starts, rows, side="right") - 1
            kept = np.isin(np.arange(len(sizes)), group_of)
            kept_starts = np.concatenate([[0], np.cumsum(np.where(kept, sizes, 0))])  # with skipped groups gone
            local = rows - starts[group_of] + kept_starts[group_of]
            groups = np.flatnonzero(kept)
            batches = reader.iter_batches(
                batch_size=batch_size, row_groups=groups.tolist(), columns=[column], use_threads=False
            )
            done = 0
            for batch in take_rows(batches, local):
                yield positions[done : done + batch.num_rows], decode_crops(batch.column(column), side)
                done += batch.num_rows


def read_crops(crops_dir: str | Path, crop_ids, column: str = "pixels", batch_size: int = 256) -> np.ndarray:
    """(n, S, S) uint8 crops (or masks, column="mask") in the order of crop_ids.

    Streams the dataset with iter_crops_by_id (about one record batch of batch_size rows of
    pixels at a time besides the result). Raises errors.MissingCropsError (a KeyError) naming the
    plates of crop ids that are not in the dataset, ValueError when crop_ids repeat an id.
    """
    wanted = pd.Index(pd.Series(crop_ids, dtype=str))
    side = _crop_side(plate_dataset(crops_dir)) or 0
    out = np.zeros((len(wanted), side, side), np.uint8)
    found = np.zeros(len(wanted), bool)
    for where, crops in iter_crops_by_id(crops_dir, wanted, column, batch_size):
        out[where] = crops
        found[where] = True
    if not found.all():
        from gbm_assets.errors import missing_crops_error

        raise missing_crops_error(crops_dir, wanted[~found], int((~found).sum()))
    return out
