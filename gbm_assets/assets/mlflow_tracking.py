"""MLflow tracking as a Dagster resource: one MLflow run per asset partition, tagged with its Dagster run.

Default: the embedded store, SQLite at mlruns/mlflow.db with artifacts under mlruns/artifacts.
MLFLOW_TRACKING_URI (or the resource's config) points it at a tracking server instead.
"""

import os
from contextlib import contextmanager
from typing import Iterator

import dagster as dg

from gbm_assets import paths

EXPERIMENT = "gbm-assets"


class MLflowUnavailable(RuntimeError):
    """The tracking server cannot be reached: retrying later may help, nothing was written."""


class MLflowTracking(dg.ConfigurableResource):
    """Where runs go and how to link to them from Dagster metadata."""

    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite under mlruns/
    artifact_root: str = ""  # for a new experiment; empty: mlruns/artifacts (embedded) or the server's
    experiment: str = EXPERIMENT
    ui_url: str = ""  # empty: MLFLOW_UI_URL, else http://127.0.0.1:5000

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
        if self.resolved_uri().startswith("sqlite:"):
            return (paths.project_root() / "mlruns" / "artifacts").as_uri()
        return None

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
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self._artifact_location())
        except Exception:  # created meanwhile by another process
            return client.get_experiment_by_name(self.experiment).experiment_id

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext, run_name: str, run_id: str | None = None) -> Iterator:
        """Open (or resume, with run_id) an MLflow run tagged with the Dagster run, asset and partition."""
        import mlflow

        experiment_id = self.setup()
        tags = {
            "dagster.run_id": context.run.run_id,
            "dagster.asset_key": context.asset_key.to_user_string(),
            "dagster.partition": context.partition_key if context.has_partition_key else "",
        }
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, experiment_id=experiment_id, tags=tags) as run:
            yield run

    def run_url(self, run) -> str:
        base = self.ui_url or os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
        return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
