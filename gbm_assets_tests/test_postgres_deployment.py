"""Beyond one machine, with configuration only: Dagster storage and the MLflow tracking server on PostgreSQL.

Uses the server at GBM_TEST_POSTGRES_URL (started by .ci/run); each run gets scratch databases of
its own, dropped afterwards. The Dagster instance is deploy/dagster.postgres.yaml, unchanged.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
import uuid
from contextlib import contextmanager

import dagster as dg
import pytest

from gbm_assets.assets.encoders import trained_encoders
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets_tests.servers import REPO_ROOT, mlflow_server, unavailable, write_dense_plates

pytestmark = pytest.mark.postgres


def ingest_plate_job():
    """The project's own ingest job (multi-or-in-process executor), rebuilt by each step process."""
    from gbm_assets.definitions import defs

    return defs.resolve_job_def("ingest_plate")


# By module path from the repository root, which each step process imports it from.
INGEST_PLATE = dg.build_reconstructable_job(
    "gbm_assets_tests.test_postgres_deployment", "ingest_plate_job", reconstructor_working_directory=str(REPO_ROOT)
)


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get("GBM_TEST_POSTGRES_URL")
    if not url:
        unavailable("GBM_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as exc:
        unavailable(f"cannot connect to GBM_TEST_POSTGRES_URL: {exc}")
    return url


@contextmanager
def scratch_database(url: str, prefix: str):
    """A new, empty database on the server of url (its role needs CREATEDB); yields its URL, drops it after."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(url, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield urllib.parse.urlsplit(url)._replace(path=f"/{name}").geturl()
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def with_psycopg2(url: str) -> str:
    """The SQLAlchemy URL naming the psycopg2 driver: since SQLAlchemy 2.1 plain postgresql:// means psycopg 3."""
    return "postgresql+psycopg2://" + url.split("://", 1)[1]


def query(url: str, sql: str, *args) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.close()
    return rows


@pytest.fixture(scope="module")
def ingested(postgres_url, tmp_path_factory):
    """Two plates ingested by the multiprocess executor into a Dagster instance stored in PostgreSQL."""
    root = tmp_path_factory.mktemp("postgres_deployment")
    plate_ids = write_dense_plates(root / "data" / "raw")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")
    with scratch_database(postgres_url, "gbm_dagster") as dagster_url, pytest.MonkeyPatch.context() as env:
        env.setenv("DAGSTER_POSTGRES_URL", with_psycopg2(dagster_url))  # read by every step process too
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions(plates.name, plate_ids)
            run_config = {
                "execution": {"config": {"multiprocess": {"max_concurrent": 2}}},
                "resources": {"data": {"config": {"root": str(root / "data")}}},
                "ops": {"cell_crops": {"config": {"crop_size": 64}}},
            }
            results = [
                dg.execute_job(INGEST_PLATE, instance, run_config=run_config, tags={"dagster/partition": plate_id})
                for plate_id in plate_ids
            ]
            yield root, home, dagster_url, instance, plate_ids, results


def test_dagster_on_postgres_ingests_plates_in_separate_processes(ingested):
    root, home, dagster_url, instance, plate_ids, results = ingested
    assert all(r.success for r in results)
    for result in results:
        workers = [e for e in result.all_events if e.event_type_value == "STEP_WORKER_STARTED"]
        assert {e.step_key for e in workers} == {"raw_plates", "cell_coordinates", "cell_crops"}
        pids = {e.pid for e in workers}
        assert len(pids) == 3 and os.getpid() not in pids  # each step in a process of its own
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert instance.get_materialized_partitions(dg.AssetKey("cell_crops")) == set(plate_ids)
    # The events are rows in PostgreSQL, and nothing went to a SQLite file in DAGSTER_HOME.
    rows = query(
        dagster_url,
        "SELECT DISTINCT partition FROM event_logs WHERE dagster_event_type = %s AND asset_key = %s",
        "ASSET_MATERIALIZATION",
        '["cell_crops"]',
    )
    assert {r[0] for r in rows} == set(plate_ids)
    assert query(dagster_url, "SELECT count(*) FROM runs WHERE status = 'SUCCESS'") == [(2,)]
    assert not list(home.rglob("*.db"))


def test_mlflow_server_on_postgres_receives_a_training_run(ingested, postgres_url):
    import mlflow

    root, _, _, instance, _, _ = ingested
    shared_artifacts = root / "shared_artifacts"
    shared_artifacts.mkdir()
    with (
        scratch_database(postgres_url, "gbm_mlflow") as store,
        mlflow_server(
            root / "mlflow-server.log",
            "--backend-store-uri",
            with_psycopg2(store),
            "--artifacts-destination",
            str(shared_artifacts),
            "--serve-artifacts",
        ) as server,
    ):
        tracking = MLflowTracking(tracking_uri=server.url)
        result = dg.materialize(
            [trained_encoders],
            partition_key="siamese_d",
            instance=instance,
            resources={"data": DataDirs(root=str(root / "data")), "mlflow_tracking": tracking},
            run_config={
                "ops": {"trained_encoders": {"config": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16}}}
            },
        )
        assert result.success, server.tail()
        run_id = result.asset_materializations_for_node("trained_encoders")[0].metadata["mlflow_run_id"].value

        client = mlflow.MlflowClient(tracking_uri=server.url)
        run = client.get_run(run_id)
        assert run.data.params["variant"] == "siamese_d" and "loss" in run.data.metrics
        version = client.get_model_version_by_alias("gbm-encoder-siamese_d", "current")
        assert version.run_id == run_id
        # The server wrote the run to PostgreSQL and the model files to the shared artifact folder.
        assert query(store, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
        assert query(store, "SELECT name FROM registered_models") == [("gbm-encoder-siamese_d",)]
        assert list(shared_artifacts.rglob("MLmodel")), f"no model under {shared_artifacts}"
