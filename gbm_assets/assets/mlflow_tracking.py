"""MLflow tracking as a Dagster resource: one MLflow run per asset partition, tagged with its Dagster run.

Default: the embedded store, SQLite at mlruns/mlflow.db with artifacts under mlruns/artifacts.
MLFLOW_TRACKING_URI (or the resource's config) points it at another store or a tracking server;
a new experiment's artifacts go to MLFLOW_ARTIFACT_ROOT (or the resource's artifact_root), else,
for a SQLite store, to artifacts/ beside its database file, else wherever the server says.

Several processes writing one SQLite store contend for its lock. MLflow already waits up to
20 s per statement (SQLite's busy timeout); when a statement still fails with "database is
locked", this resource retries it with exponential backoff within `lock_retry_s` seconds, for its
own store calls (experiment, start and end of a run) and for any call an asset wraps in
`MLflowTracking.retrying` or `with_lock_retry`. However a run block is left (an error, a Dagster
RetryRequested, an interrupt, a failed MLflow call), the run is ended: FINISHED, FAILED, or KILLED
for interrupts (KeyboardInterrupt, Dagster's execution interruption, SystemExit). Never RUNNING.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg

from gbm_assets import paths

EXPERIMENT = "gbm-assets"
DEFAULT_LOCK_RETRY_S = 30.0
_LOCK_MESSAGES = ("database is locked", "database table is locked", "database schema is locked")

T = TypeVar("T")
log = logging.getLogger(__name__)


class MLflowUnavailable(RuntimeError):
    """The tracking server cannot be reached: retrying later may help, nothing was written."""


class MLflowStoreLocked(RuntimeError):
    """The MLflow store stayed locked (SQLite "database is locked") for the whole retry budget.

    The original error is the __cause__. What the failed call meant to write was not written.
    """


def is_lock_error(exc: BaseException) -> bool:
    """True if `exc` (or an error it was raised from) is SQLite lock contention.

    Matches sqlite3 / SQLAlchemy OperationalError and MlflowException (including a tracking
    server relaying its SQLite error) by their message, e.g. "database is locked".
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Exception) and any(m in str(current).lower() for m in _LOCK_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def _call_with_lock_retry(fn: Callable[..., T], args: tuple, kwargs: dict, budget_s: float, store: str) -> T:
    started = time.monotonic()
    delay, attempts = 0.1, 0
    while True:
        attempts += 1
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_lock_error(exc):
                raise
            elapsed = time.monotonic() - started
            remaining = budget_s - elapsed
            name = getattr(fn, "__qualname__", None) or repr(fn)
            if remaining <= 0:
                raise MLflowStoreLocked(
                    f"MLflow store {store or '(current tracking URI)'} stayed locked for {elapsed:.1f} s "
                    f"({attempts} attempt{'s' if attempts > 1 else ''} of {name}); giving up: {exc}"
                ) from exc
            wait = min(remaining, delay * random.uniform(0.5, 1.0))
            log.warning("MLflow store %s is locked (%s); retrying %s in %.2f s", store, exc, name, wait)
            time.sleep(wait)
            delay = min(delay * 2, 5.0)


def with_lock_retry(fn: Callable[..., T], /, *args: Any, budget_s: float = DEFAULT_LOCK_RETRY_S, **kwargs: Any) -> T:
    """Return fn(*args, **kwargs), retrying with exponential backoff while the store is locked.

    Only SQLite lock contention (see is_lock_error) is retried; any other error is raised at
    once. Waits start at about 0.1 s and double up to 5 s (with jitter); no new attempt starts
    after `budget_s` seconds (one attempt may itself wait SQLite's busy timeout, 20 s in MLflow).
    Raises MLflowStoreLocked (from the last lock error) when the budget is spent. Wrap whole
    MLflow calls that are safe to repeat, e.g. with_lock_retry(mlflow.log_metrics, {"loss": 0.1}, step=3).
    """
    return _call_with_lock_retry(fn, args, kwargs, budget_s, "")


class MLflowTracking(dg.ConfigurableResource):
    """Where runs go and how to link to them from Dagster metadata."""

    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite under mlruns/
    # For a new experiment; empty: MLFLOW_ARTIFACT_ROOT, else artifacts/ beside a SQLite store's
    # database file, else the tracking server's default.
    artifact_root: str = ""
    experiment: str = EXPERIMENT
    ui_url: str = ""  # empty: MLFLOW_UI_URL, else http://127.0.0.1:5000
    lock_retry_s: float = DEFAULT_LOCK_RETRY_S  # how long a locked SQLite store is retried before failing

    def resolved_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        store = paths.project_root() / "mlruns"
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}"

    def _artifact_location(self) -> str | None:
        if self.artifact_root:
            return self.artifact_root
        if os.environ.get("MLFLOW_ARTIFACT_ROOT"):
            return os.environ["MLFLOW_ARTIFACT_ROOT"]
        db = sqlite_file(self.resolved_uri())
        return (db.parent / "artifacts").as_uri() if db is not None else None

    def retrying(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Return fn(*args, **kwargs), retrying SQLite lock contention for up to `lock_retry_s` seconds.

        For the assets' own MLflow calls inside a run block, e.g.
        `mlflow_tracking.retrying(mlflow.log_metrics, {"loss": loss}, step=epoch)`. Other errors
        are raised at once; MLflowStoreLocked when the store stays locked (see with_lock_retry).
        """
        return _call_with_lock_retry(fn, args, kwargs, self.lock_retry_s, self.resolved_uri())

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Raise MLflowUnavailable unless the tracking store answers (a server's /health, or the local store)."""
        uri = self.resolved_uri()
        if not uri.startswith(("http://", "https://")):
            return
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        raise MLflowUnavailable(f"MLflow tracking server {uri} is unreachable ({problem}); nothing was written")

    def reachable(self) -> bool:
        try:
            self.check_reachable()
            return True
        except MLflowUnavailable:
            return False

    def setup(self):
        """Point MLflow at the store and return the experiment id (created on first use)."""
        import mlflow

        mlflow.set_tracking_uri(self.resolved_uri())
        client = self.retrying(mlflow.MlflowClient)  # opening a SQLite store reads (and may migrate) it
        exp = self.retrying(client.get_experiment_by_name, self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.retrying(client.create_experiment, self.experiment, artifact_location=self._artifact_location())
        except MLflowStoreLocked:
            raise
        except Exception:  # created meanwhile by another process
            exp = self.retrying(client.get_experiment_by_name, self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext, run_name: str, run_id: str | None = None) -> Iterator:
        """Open (or resume, with run_id) an MLflow run tagged with the Dagster run, asset and partition.

        Yields the active mlflow ActiveRun. On leaving the block the run is ended FINISHED, or
        FAILED for an exception (RetryRequested included), or KILLED for an interrupt
        (KeyboardInterrupt, DagsterExecutionInterruptedError, SystemExit); the exception
        propagates. Starting and ending are retried while the store is locked; if ending still
        fails after an exception, the exception propagates with a note saying so.
        """
        import mlflow

        experiment_id = self.setup()
        tags = {
            "dagster.run_id": context.run.run_id,
            "dagster.asset_key": context.asset_key.to_user_string(),
            "dagster.partition": context.partition_key if context.has_partition_key else "",
        }
        try:
            run = self.retrying(
                mlflow.start_run,
                run_id=run_id,
                run_name=None if run_id else run_name,
                experiment_id=experiment_id,
                tags=tags,
            )
        except BaseException:
            if run_id:  # a resumed run may already have been set RUNNING before the failure
                self._end_quietly(run_id, "FAILED", only_if_running=True)
            raise
        run_id = run.info.run_id
        try:
            yield run
        except BaseException as exc:
            status = "FAILED" if isinstance(exc, Exception) else "KILLED"
            self._end_quietly(run_id, status, exc=exc)
            raise
        self._end_run(run_id, "FINISHED")

    def _end_run(self, run_id: str, status: str) -> None:
        """Mark the run terminated with `status` (and make it no longer active), retrying a locked store."""
        import mlflow

        def end() -> None:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                # end_run pops the run before writing its status: a retry after a failure lands below.
                mlflow.end_run(status)
            else:
                mlflow.MlflowClient().set_terminated(run_id, status)

        self.retrying(end)

    def _end_quietly(
        self, run_id: str, status: str, exc: BaseException | None = None, only_if_running: bool = False
    ) -> None:
        """_end_run for an error path: a failure to end is logged (and noted on `exc`), never raised."""
        import mlflow

        try:
            if only_if_running and self.retrying(mlflow.MlflowClient().get_run, run_id).info.status != "RUNNING":
                return
            self._end_run(run_id, status)
        except Exception as end_exc:
            message = f"MLflow run {run_id} could not be marked {status}: {end_exc}"
            log.warning(message)
            if exc is not None:
                exc.add_note(message)

    @contextmanager
    def retry_step_if_unreachable(self, max_retries: int, seconds_to_wait: float) -> Iterator[None]:
        """Turn an error raised in the block into a Dagster step retry when the tracking server is down.

        MLflowUnavailable, or any error while the server does not answer (reachable() is False),
        becomes dg.RetryRequested(max_retries, seconds_to_wait) raised from it; other errors
        propagate unchanged.
        """
        try:
            yield
        except Exception as exc:
            if isinstance(exc, MLflowUnavailable) or not self.reachable():
                raise dg.RetryRequested(max_retries=max_retries, seconds_to_wait=seconds_to_wait) from exc
            raise

    def log_encoder(self, encoder, registered_model: str, local_path: str | Path, crop_size: int) -> dict:
        """Save a Keras encoder to local_path and log it to the active run, registered with alias "current".

        encoder: a functional keras.Model taking (n, crop_size, crop_size, 1) float32 in [0, 1].
        The model is logged as the run's "encoder" artifact with a signature inferred from a
        zero batch (MLflow 3 with Keras 3 cannot take an input_example), registered as
        `registered_model`, and the alias "current" is moved to the new version (retried while
        the store is locked). Returns the record {"run_id", "model_uri", "registered_model",
        "version"}. MLflow errors propagate; local_path is written first.
        """
        import keras
        import mlflow
        import numpy as np
        from mlflow.models import infer_signature

        keras.saving.save_model(encoder, local_path)
        example = np.zeros((2, crop_size, crop_size, 1), np.float32)
        info = mlflow.keras.log_model(
            encoder,
            name="encoder",
            signature=infer_signature(example, encoder.predict_on_batch(example)),
            registered_model_name=registered_model,
            pip_requirements=["tensorflow-cpu", "keras>=3"],
        )
        version = info.registered_model_version
        self.retrying(mlflow.MlflowClient().set_registered_model_alias, registered_model, "current", version)
        return {
            "run_id": mlflow.active_run().info.run_id,
            "model_uri": info.model_uri,
            "registered_model": registered_model,
            "version": version,
        }

    def load_encoder(self, local_path: str | Path):
        """The Keras encoder log_encoder saved at local_path (uncompiled; for inference).

        Raises FileNotFoundError when there is no file; Keras' errors for a file it cannot load.
        """
        import keras

        if not Path(local_path).is_file():
            raise FileNotFoundError(f"{local_path}: no trained encoder (materialize trained_encoders first)")
        return keras.saving.load_model(local_path, compile=False)

    def run_url(self, run) -> str:
        base = self.ui_url or os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
        return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:// tracking URI (relative paths against the working directory), else None."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    if database.startswith("file:"):  # sqlite:///file:path?mode=...&uri=true
        database = database[len("file:") :].split("?", 1)[0]
    return Path(database).expanduser().absolute()
