"""Atomic file writes: a reader sees the previous file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it over `final`, else delete it.

    The temporary file lives in the same folder so that os.replace is an atomic rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: str | Path, data: bytes) -> Path:
    """Write a whole file atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def write_parquet_atomic(table: pa.Table, final: str | Path, row_group_size: int = 2048) -> Path:
    """Write one Parquet file atomically, in row groups small enough to stream back in batches."""
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    return Path(final)


class AtomicParquetWriter:
    """Stream record batches into one Parquet file that appears only when closed without error."""

    def __init__(self, final: str | Path, schema: pa.Schema):
        self._ctx = atomic_path(final)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def __enter__(self) -> "AtomicParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._writer.close()
        self._ctx.__exit__(exc_type, exc, tb)
        return False


def plate_dataset(path: str | Path):
    """A per-plate Parquet dataset (plate=<id>/part-0.parquet) as one pyarrow dataset.

    The folder key is declared a string so that it merges with the `plate` column the files
    carry themselves (each file stays self-describing when read alone).
    """
    import pyarrow.dataset as pds

    return pds.dataset(path, format="parquet", partitioning=pds.partitioning(pa.schema([("plate", pa.string())]), flavor="hive"))


def sample_batches(path: str | Path, max_rows: int | None, seed: int, columns, batch_size: int = 8192):
    """Record batches of a seeded uniform sample of at most max_rows rows of one Parquet file.

    Rows are chosen from the row count first, then picked out of each streamed batch, so
    memory stays at the sample's size however large the file.
    """
    import numpy as np

    with pq.ParquetFile(path) as pf:
        total = pf.metadata.num_rows
        keep = None if max_rows is None or total <= max_rows else np.sort(
            np.random.default_rng(seed).choice(total, size=max_rows, replace=False))
        start = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
            if keep is not None:
                local = keep[(keep >= start) & (keep < start + batch.num_rows)] - start
                start += batch.num_rows
                batch = batch.take(pa.array(local))
            if batch.num_rows:
                yield batch
