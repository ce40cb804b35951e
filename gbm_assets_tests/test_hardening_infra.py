"""Hardening of the plumbing (issue 14): file modes, leftovers of killed processes, MLflow store placement and locks.

Faults are real: a SIGKILLed writer and a SIGKILLed process-pool owner, a SQLite lock held by
another connection with BEGIN EXCLUSIVE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gbm_assets import paths
from gbm_assets.storage import atomic_path, write_parquet_atomic

REPO = Path(__file__).resolve().parents[1]


def _child_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


# ------------------------------------------------------------------ item 5: outputs respect the umask

UMASK_WRITER = textwrap.dedent("""
    import json, os, sys, tempfile
    from pathlib import Path
    os.umask(int(sys.argv[2], 8))
    import pyarrow as pa
    from gbm_assets.storage import AtomicParquetWriter, atomic_path, write_bytes_atomic, write_parquet_atomic
    root = Path(sys.argv[1])
    table = pa.table({"v": [1, 2, 3]})
    outs = {
        "bytes": write_bytes_atomic(root / "a" / "b" / "report.html", b"<html></html>"),
        "parquet": write_parquet_atomic(table, root / "c" / "part-0.parquet"),
    }
    with AtomicParquetWriter(root / "d" / "e" / "labels.parquet", table.schema) as w:
        w.write(table)
    outs["writer"] = root / "d" / "e" / "labels.parquet"
    with atomic_path(root / "f" / "comparison.csv") as tmp:
        tmp.write_text("a,b\\n1,2\\n")
    outs["atomic_path"] = root / "f" / "comparison.csv"
    with atomic_path(root / "f" / "model.bin") as tmp:  # a writer that swaps in its own 0600 file
        fd, own = tempfile.mkstemp(dir=tmp.parent)
        os.write(fd, b"model"); os.close(fd)
        os.replace(own, tmp)
    outs["replaced_by_writer"] = root / "f" / "model.bin"
    modes = {k: oct(os.stat(p).st_mode & 0o777) for k, p in outs.items()}
    modes.update({f"dir:{d}": oct(os.stat(root / d).st_mode & 0o777) for d in ["a", "a/b", "c", "d", "d/e", "f"]})
    print(json.dumps(modes))
""")


@pytest.mark.parametrize("umask, file_mode, dir_mode", [("022", 0o644, 0o755), ("027", 0o640, 0o750)])
def test_atomic_outputs_are_created_with_the_umask_like_open(tmp_path, umask, file_mode, dir_mode):
    out = subprocess.run(
        [sys.executable, "-c", UMASK_WRITER, str(tmp_path), umask],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    modes = {k: int(v, 8) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    for name, mode in modes.items():
        expected = dir_mode if name.startswith("dir:") else file_mode
        assert mode == expected, f"{name}: mode {oct(mode)}, expected {oct(expected)} under umask {umask}"
    assert not [p for p in tmp_path.rglob(".*.tmp")]


# ------------------------------------------------------------------ item 4b: temp files of killed writers

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    from gbm_assets.storage import AtomicParquetWriter
    schema = pa.schema([("v", pa.int64())])
    with AtomicParquetWriter(sys.argv[1], schema) as w:
        w.write(pa.table({"v": list(range(1000))}, schema=schema))
        print("writing", flush=True)
        time.sleep(600)
""")


def _host_tag() -> str:
    """This host as temp-file names spell it (storage.py: letters, digits and '-', at most 32)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_temp_file_of_a_sigkilled_writer_is_removed_when_the_output_is_next_written(tmp_path):
    final = tmp_path / "embeddings" / "siamese_a.parquet"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(final)], stdout=subprocess.PIPE, text=True, env=_child_env()
    )
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    orphans = list(final.parent.glob(f".{final.name}.*.tmp"))
    assert len(orphans) == 1 and not final.exists()

    host = _host_tag()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        planted = {
            "dead_here": (final.parent / f".{final.name}.{host}.{_dead_pid()}.0badc0de.tmp", 0, False),
            "live_other_process": (final.parent / f".{final.name}.{host}.{live.pid}.1badc0de.tmp", 7200, True),
            "old_other_host": (final.parent / f".{final.name}.elsewhere-7.{os.getpid()}.2badc0de.tmp", 7200, False),
            "fresh_other_host": (final.parent / f".{final.name}.elsewhere-7.{os.getpid()}.3badc0de.tmp", 0, True),
            "old_mkstemp_style": (final.parent / f".{final.name}.ab_cd123.tmp", 7200, False),
            "fresh_mkstemp_style": (final.parent / f".{final.name}.zz_cd123.tmp", 0, True),
            "other_output": (final.parent / f".siamese_b.parquet.{host}.{_dead_pid()}.4badc0de.tmp", 0, True),
        }
        for path, age, _ in planted.values():
            path.write_bytes(b"partial")
            _age(path, age)
        table = pa.table({"v": [1, 2, 3]})
        with atomic_path(final) as concurrent:  # a live writer of the same output, in this process
            concurrent.write_bytes(b"in progress")
            write_parquet_atomic(table, final)
            assert concurrent.read_bytes() == b"in progress"
            for name, (path, _, kept) in planted.items():
                assert path.exists() == kept, f"{name}: {'removed' if not kept else 'kept'} expected"
            assert not any(p.exists() for p in orphans), "the SIGKILLed writer's temp file is still there"
            pq.write_table(table, concurrent)
        assert pq.read_table(final).equals(table)
        assert not concurrent.exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ item 4a: pool workers die with their owner

POOL_OWNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import cv2, numpy as np
    from gbm_assets.imaging.plate_cells import find_plate_cells

    if __name__ == "__main__":
        d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        names = []
        for i in range(4):
            img = rng.normal(120, 10, (160, 160)).clip(0, 255).astype(np.uint8)
            for _ in range(5):
                cv2.circle(img, tuple(int(v) for v in rng.integers(20, 140, 2)), 8, 210, -1)
            cv2.imwrite(str(d / f"img{i}.png"), img)
            names.append(f"img{i}.png")
        serial = [len(f.cells) for f in find_plate_cells(d, names, workers=1)]
        first = True
        while True:
            pooled = [len(f.cells) for f in find_plate_cells(d, names, workers=2)]
            assert pooled == serial, (pooled, serial)
            if first:
                print("running", flush=True)
                first = False
""")


def _processes_with_marker(marker: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose environment carries GBM_TEST_MARKER=marker, wherever re-parented."""
    found = []
    needle = f"GBM_TEST_MARKER={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")[:120].decode(errors="replace")
        except OSError:
            continue
        if needle in env and stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z":
            found.append((int(entry), cmd))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_and_fork_server_exit_when_the_owner_is_sigkilled(tmp_path):
    marker = uuid.uuid4().hex
    owner = subprocess.Popen(
        [sys.executable, "-c", POOL_OWNER, str(tmp_path / "plate")],
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(GBM_TEST_MARKER=marker),
    )
    try:
        assert owner.stdout.readline().strip() == "running"
        tree = _processes_with_marker(marker)
        assert len(tree) >= 4, tree  # the owner, the fork server, 2 workers (and the resource tracker)
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
    deadline = time.monotonic() + 10
    left = _processes_with_marker(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _processes_with_marker(marker)
    for pid, _ in left:  # do not leak them into the rest of the session, then fail
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"still alive 10 s after the owner was SIGKILLed: {left}"


# ------------------------------------------------------------------ MLflow: where artifacts go, locks, run status


def _context(partition: str = "p1"):
    """The few attributes of an asset execution context that MLflowTracking.start_run reads."""
    import dagster as dg

    return SimpleNamespace(
        run=SimpleNamespace(run_id=f"dagster-{uuid.uuid4().hex[:8]}"),
        asset_key=dg.AssetKey("clusters"),
        has_partition_key=True,
        partition_key=partition,
    )


@pytest.fixture
def clean_mlflow(monkeypatch, tmp_path):
    """No tracking settings from the environment, and a project root that is not the repository."""
    import mlflow

    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_ARTIFACT_ROOT",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(var, raising=False)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setattr(paths, "project_root", lambda: project)
    while mlflow.active_run():
        mlflow.end_run()
    yield project
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its schema (creating one takes seconds; copying it does not)."""
    import mlflow

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def _new_store(empty_store: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    shutil.copyfile(empty_store, db)
    return db


def _log_note(tracking, text: str) -> str:
    import mlflow

    with tracking.start_run(_context(), run_name="note") as run:
        mlflow.log_text(text, "note.txt")
    return run.info.run_id


def test_artifacts_go_beside_each_sqlite_store_or_to_MLFLOW_ARTIFACT_ROOT(
    clean_mlflow, empty_store, tmp_path, monkeypatch
):
    from gbm_assets.assets.mlflow_tracking import MLflowTracking

    first, second = _new_store(empty_store, tmp_path / "first"), _new_store(empty_store, tmp_path / "other")
    # one store named in the resource, one only by MLFLOW_TRACKING_URI, as a second deployment would
    run1 = _log_note(MLflowTracking(tracking_uri=f"sqlite:///{first}"), "first store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{second}")
    run2 = _log_note(MLflowTracking(), "second store")
    assert (first.parent / "artifacts" / run1 / "artifacts" / "note.txt").read_text() == "first store"
    assert (second.parent / "artifacts" / run2 / "artifacts" / "note.txt").read_text() == "second store"
    assert not (first.parent / "artifacts" / run2).exists()
    assert not (clean_mlflow / "mlruns" / "artifacts").exists()

    # MLFLOW_ARTIFACT_ROOT wins for a new experiment
    monkeypatch.setenv("MLFLOW_ARTIFACT_ROOT", (tmp_path / "shared-artifacts").as_uri())
    run3 = _log_note(MLflowTracking(experiment="with-explicit-root"), "explicit root")
    assert (tmp_path / "shared-artifacts" / run3 / "artifacts" / "note.txt").read_text() == "explicit root"
    assert not (second.parent / "artifacts" / run3).exists()

    from gbm_assets.assets.mlflow_tracking import sqlite_file

    monkeypatch.chdir(tmp_path)
    assert sqlite_file("sqlite:///rel/mlflow.db") == tmp_path / "rel" / "mlflow.db"
    assert sqlite_file("sqlite:////abs/x/mlflow.db?timeout=5") == Path("/abs/x/mlflow.db")
    assert sqlite_file("http://127.0.0.1:5000") is None


@pytest.fixture
def short_busy_wait():
    """Make each SQLite statement give up on a held lock after 0.2 s instead of MLflow's 20 s.

    MLflow sets `PRAGMA busy_timeout = 20000` on every session; this lowers it right after, so
    that a held lock surfaces as the real "database is locked" error quickly. The lock itself
    is real.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def shorten(conn, cursor, statement, parameters, context, executemany):
        if "busy_timeout" in statement.lower():
            conn.connection.driver_connection.execute("PRAGMA busy_timeout = 200")

    event.listen(Engine, "after_cursor_execute", shorten)
    yield
    event.remove(Engine, "after_cursor_execute", shorten)


class HeldLock:
    """BEGIN EXCLUSIVE on a SQLite file from another connection, in a thread, until released."""

    def __init__(self, db: Path):
        self.db, self.locked, self.release = db, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        con = sqlite3.connect(self.db, isolation_level=None, timeout=30)
        try:
            con.execute("BEGIN EXCLUSIVE")
            self.locked.set()
            self.release.wait(60)
            con.execute("COMMIT")
        finally:
            con.close()

    def start(self, release_after_s: float | None = None) -> HeldLock:
        self.thread.start()
        assert self.locked.wait(30), "could not take the lock"
        if release_after_s is not None:
            threading.Timer(release_after_s, self.release.set).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.thread.join(30)


def _status(db: Path, run_id: str) -> str:
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def store(clean_mlflow, empty_store, tmp_path):
    """A fresh SQLite MLflow store whose schema exists before any lock is taken."""
    from gbm_assets.assets.mlflow_tracking import MLflowTracking

    db = _new_store(empty_store, tmp_path / "store")
    MLflowTracking(tracking_uri=f"sqlite:///{db}").setup()
    return db


def test_locked_store_is_retried_when_a_run_starts_and_ends(store, short_busy_wait):
    import mlflow

    from gbm_assets.assets.mlflow_tracking import MLflowTracking

    tracking = MLflowTracking(tracking_uri=f"sqlite:///{store}", experiment="fresh-experiment", lock_retry_s=20)
    lock = HeldLock(store).start(release_after_s=1.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="training diverged"):
            with tracking.start_run(
                _context(), run_name="train"
            ) as run:  # experiment created and run started under the lock
                assert time.monotonic() - t0 >= 1.0
                lock.stop()
                mlflow.log_metric("loss", 0.5)
                lock = HeldLock(store).start(release_after_s=1.5)
                raise RuntimeError("training diverged")  # the run is ended while the store is locked
    finally:
        lock.stop()
    assert _status(store, run.info.run_id) == "FAILED"
    assert mlflow.active_run() is None
    assert mlflow.MlflowClient().get_experiment(run.info.experiment_id).name == "fresh-experiment"


def test_store_locked_past_the_budget_raises_and_the_run_still_ends_failed(store, short_busy_wait):
    import mlflow

    from gbm_assets.assets.mlflow_tracking import MLflowStoreLocked, MLflowTracking, with_lock_retry

    tracking = MLflowTracking(tracking_uri=f"sqlite:///{store}", lock_retry_s=1.0)
    lock = HeldLock(store)
    t0 = time.monotonic()
    try:
        with pytest.raises(MLflowStoreLocked, match="stayed locked") as raised:
            with tracking.start_run(_context(), run_name="cluster") as run:
                lock.start()
                t0 = time.monotonic()
                try:
                    tracking.retrying(mlflow.log_metric, "n_cells", 42.0)
                finally:  # the lock goes away only after the call gave up, while the run is being ended
                    threading.Timer(0.3, lock.release.set).start()
    finally:
        lock.stop()
    assert 1.0 <= time.monotonic() - t0 < 15
    assert "database is locked" in str(raised.value.__cause__)
    assert _status(store, run.info.run_id) == "FAILED"
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == {}
    # the module-level helper: other errors are not retried
    calls = []

    def bad_value(x):
        calls.append(x)
        raise ValueError("not a lock problem")

    with pytest.raises(ValueError):
        with_lock_retry(bad_value, 1, budget_s=5)
    assert calls == [1]


def test_every_way_out_of_a_run_block_ends_the_run(store):
    import dagster as dg
    import mlflow
    from dagster._core.errors import DagsterExecutionInterruptedError

    from gbm_assets.assets.mlflow_tracking import MLflowTracking

    tracking = MLflowTracking(tracking_uri=f"sqlite:///{store}")
    cases = [
        (None, "FINISHED"),
        (RuntimeError("boom"), "FAILED"),
        (dg.RetryRequested(max_retries=1), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (DagsterExecutionInterruptedError(), "KILLED"),
    ]
    for error, expected in cases:
        try:
            with tracking.start_run(_context(), run_name="case") as run:
                if error is not None:
                    raise error
        except BaseException as exc:  # noqa: BLE001 - asserting it is the one raised
            assert exc is error
        assert _status(store, run.info.run_id) == expected, f"{type(error).__name__}: {_status(store, run.info.run_id)}"
        assert mlflow.active_run() is None
    # a resumed run (embeddings reopen the encoder's run) ends the same way
    with pytest.raises(RuntimeError):
        with tracking.start_run(_context(), run_name="", run_id=run.info.run_id):
            raise RuntimeError("embedding failed")
    assert _status(store, run.info.run_id) == "FAILED"
