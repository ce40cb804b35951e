"""Atomic file writes: a reader sees the previous file or the new one, never half of one.

Every output is first written to a hidden temporary file beside it, named
`.<name>.<host>.<pid>.<random>.tmp`, then renamed over the output. Two promises beyond
atomicity:

- Permissions: the temporary file (hence the output) is created the way open() creates a
  file, mode 0o666 minus the umask (and any default ACL of the folder); folders made on the
  way get 0o777 minus the umask. A colleague in the same group reads the report when the
  umask says so.
- Nothing left behind: a writer killed mid-write (SIGKILL, power loss) leaves its temporary
  file. The next write of the same output removes such leftovers: those named by a process
  of this host that no longer exists, and any other (another host's, or the older
  `.<name>.<random>.tmp` form) once it is older than STALE_TEMP_AGE_S. A live writer's
  temporary file is never touched.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STALE_TEMP_AGE_S = 3600.0  # a temp file of an unknown or remote writer untouched this long is an orphan


def host_tag() -> str:
    """This machine's name as it appears in temp-file and staging-folder names: letters, digits and '-' only, at most 32."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _temp_name(final_name: str) -> str:
    return f".{final_name}.{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def pid_alive(pid: int) -> bool:
    """True unless this host certainly has no process `pid` (permission errors count as alive)."""
    if pid <= 0 or os.name == "nt":  # Windows: os.kill(pid, 0) would send CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temps(final: str | Path, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove orphaned temporary files of `final` left by killed writers; return the removed paths.

    A temp file of this host whose process is gone is removed at once; a temp file of another
    host, or of the older random-only naming, only when its modification time is more than
    `max_age_s` seconds old. Files of live writers on this host are kept. "This host" is the
    host name, so containers that share a folder must not share a host name. Cleaning up never
    fails a write: missing folders, files vanishing meanwhile (another writer finishing) and
    files this user may not remove are skipped.
    """
    final = Path(final)
    prefix = f".{final.name}."
    ours = re.compile(r"(?P<host>[A-Za-z0-9-]{1,32})\.(?P<pid>\d{1,10})\.[0-9a-f]{8}\.tmp")
    legacy = re.compile(r"[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp names of earlier versions
    host, now, removed = host_tag(), time.time(), []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        rest = entry.name[len(prefix) :]
        match = ours.fullmatch(rest)
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if match and match["host"] == host:
                stale = not pid_alive(int(match["pid"]))
            elif match or legacy.fullmatch(rest):
                stale = now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
            else:
                continue
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it over `final`, else delete it.

    The temporary file lives in the same folder so that os.replace is an atomic rename. It
    exists (empty) when yielded, created with mode 0o666 less the umask, as open() would; if
    the caller replaces it by a file of another mode, the created mode is restored before the
    rename. Missing folders are created with mode 0o777 less the umask. Stale temporary files
    of the same output left by killed writers are removed first (see remove_stale_temps).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)  # os.mkdir applies the umask to each level
    remove_stale_temps(final)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp_path = final.parent / _temp_name(final.name)
        try:
            fd = os.open(tmp_path, flags, 0o666)  # the kernel applies the umask / default ACL
            break
        except FileExistsError:
            continue
    try:
        created_mode = os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
    try:
        yield tmp_path
        if os.stat(tmp_path).st_mode & 0o7777 != created_mode:
            os.chmod(tmp_path, created_mode)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def claim(path: str | Path) -> Path | None:
    """Take `path` away from other writers: rename it to a hidden temporary name beside it
    (`.<name>.<host>.<pid>.<random>.tmp`, as atomic_path's) and return that path, None when
    `path` does not exist. What the caller then reads and renames is what it took, even if
    another process writes `path` again meanwhile; the caller deletes or renames the claimed
    file, and a claim left by a killed process is removed like a temp file (remove_stale_temps).
    """
    path = Path(path)
    claimed = path.parent / _temp_name(path.name)
    try:
        os.replace(path, claimed)
    except FileNotFoundError:
        return None
    return claimed


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

    def __enter__(self) -> AtomicParquetWriter:
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

    return pds.dataset(
        path, format="parquet", partitioning=pds.partitioning(pa.schema([("plate", pa.string())]), flavor="hive")
    )


def seeded_sample(total: int, max_rows: int | None, seed: int):
    """Sorted int64 indices of a seeded uniform sample of max_rows of total rows, without
    replacement; None when every row is kept (max_rows None or >= total)."""
    import numpy as np

    if max_rows is None or total <= max_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False))


def take_rows(batches, keep) -> Iterator[pa.RecordBatch]:
    """The rows numbered `keep` (sorted indices into the concatenated stream; None: every row)
    out of streamed record batches, batch by batch; batches left empty are skipped."""
    start = 0
    for batch in batches:
        if keep is not None:
            local = keep[(keep >= start) & (keep < start + batch.num_rows)] - start
            start += batch.num_rows
            batch = batch.take(pa.array(local))
        if batch.num_rows:
            yield batch


def sample_batches(path: str | Path, max_rows: int | None, seed: int, columns, batch_size: int = 8192):
    """Record batches of a seeded uniform sample of at most max_rows rows of one Parquet file.

    Rows are chosen from the row count first (seeded_sample), then picked out of each streamed
    batch, so memory stays at the sample's size however large the file.
    """
    with pq.ParquetFile(path) as pf:
        keep = seeded_sample(pf.metadata.num_rows, max_rows, seed)
        yield from take_rows(pf.iter_batches(batch_size=batch_size, columns=list(columns)), keep)
