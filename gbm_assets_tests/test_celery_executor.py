"""Beyond one machine, run for real: GBM_EXECUTOR=celery, a Redis broker and a Celery worker process.

Uses the Redis server at GBM_TEST_CELERY_BROKER_URL (started by .ci/run). The test starts a worker as
docs/deployment.md tells (`dagster-celery worker start`) and launches each run as a deployment's run
worker does: a fresh process with GBM_EXECUTOR=celery in its environment that imports
gbm_assets.definitions (`dagster job execute`). A tiny synthetic plate goes raw_plates -> cell_coordinates
-> cell_crops, then a model variant is trained (1 epoch, 2 steps) and embeds its crops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from gbm_assets.assets.automation import TRAIN_JOB_NAME
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.sensors import INGEST_JOB_NAME
from gbm_assets_tests.servers import REPO_ROOT, log_tail, server_process, unavailable, write_dense_plates

pytestmark = pytest.mark.celery

BIN = Path(sys.executable).parent  # the dagster and dagster-celery commands of this environment
VARIANT = "siamese_d"
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def broker_url() -> str:
    url = os.environ.get("GBM_TEST_CELERY_BROKER_URL")
    if not url:
        unavailable("GBM_TEST_CELERY_BROKER_URL is not set (.ci/run starts a Redis server and sets it)")
    try:
        import dagster_celery  # noqa: F401
        import redis
    except ImportError as exc:
        unavailable(f"{exc.name} is not installed (pip install -e '.[celery]')")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5).ping()
    except redis.RedisError as exc:
        unavailable(f"cannot reach the Redis broker at GBM_TEST_CELERY_BROKER_URL: {exc}")
    return url


def wait_for_worker(worker, name: str, timeout_s: float = 180.0) -> None:
    """Until the worker's log says it is ready; fail with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            pytest.fail(f"the Celery worker exited with {worker.proc.returncode}\n{worker.tail()}")
        if f"{name}@" in log_tail(worker.log, 200) and " ready." in log_tail(worker.log, 200):
            return
        time.sleep(0.5)
    pytest.fail(f"the Celery worker was not ready within {timeout_s:.0f} s\n{worker.tail()}")


def execute_job(env: dict, job: str, partition: str, configs: list[Path], log: Path, worker) -> int:
    """`dagster job execute` of job for one partition in a process of its own; returns that process's id."""
    cmd = [
        str(BIN / "dagster"),
        "job",
        "execute",
        "-m",
        "gbm_assets.definitions",
        "-j",
        job,
        "--tags",
        json.dumps({"dagster/partition": partition}),
    ]
    for config in configs:
        cmd += ["-c", str(config)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT
        )
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{job} ({partition}) ran over {RUN_TIMEOUT_S} s\n{log_tail(log)}\n{worker.tail()}")
    assert rc == 0, f"{job} ({partition}) exited with {rc}\n--- {log} ---\n{log_tail(log)}\n{worker.tail()}"
    return proc.pid


@pytest.fixture(scope="module")
def celery_runs(broker_url, tmp_path_factory):
    """One plate ingested, then one variant trained and embedded, every step in the Celery worker."""
    root = tmp_path_factory.mktemp("celery_executor")
    (plate_id,) = write_dense_plates(root / "data" / "raw", n=1)
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
    # What every process of the deployment shares (docs/deployment.md): the worker reads it too.
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GBM_EXECUTOR": "celery",
        "GBM_ASSETS_DATA": str(root / "data"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_ARTIFACT_ROOT": (root / "mlflow-artifacts").as_uri(),
        "KERAS_BACKEND": "tensorflow",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # dagster-celery starts `celery`
    # The executor's block of run config; `dagster-celery worker start -y` reads the same file.
    celery_config = root / "celery.yaml"
    celery_config.write_text(json.dumps({"execution": {"config": {"broker": broker_url, "backend": broker_url}}}))
    ingest_config = root / "ingest.yaml"
    ingest_config.write_text(json.dumps({"ops": {"cell_crops": {"config": {"crop_size": 64}}}}))
    train_config = root / "train.yaml"
    train_config.write_text(
        json.dumps({"ops": {"trained_encoders": {"config": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16}}}})
    )

    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(plates.name, [plate_id])

    name = f"gbm-test-{uuid.uuid4().hex[:8]}"
    worker_cmd = [
        str(BIN / "dagster-celery"),
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(celery_config),
        "-n",
        name,
        "--",
        "--concurrency",
        "1",
    ]
    with server_process(worker_cmd, root / "celery-worker.log", 0, env=env, cwd=REPO_ROOT) as worker:
        wait_for_worker(worker, name)
        launchers = {
            INGEST_JOB_NAME: execute_job(
                env, INGEST_JOB_NAME, plate_id, [celery_config, ingest_config], root / "ingest.log", worker
            ),
            TRAIN_JOB_NAME: execute_job(
                env, TRAIN_JOB_NAME, VARIANT, [celery_config, train_config], root / "train.log", worker
            ),
        }
        worker_group = os.getpgid(worker.proc.pid)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            # While the worker runs: its pool processes are alive, so their process group can be read.
            step_pids = {}
            for job, launcher_pid in launchers.items():
                (run,) = instance.get_runs(filters=dg.RunsFilter(job_name=job))
                events = [e.dagster_event for e in instance.all_logs(run.run_id) if e.dagster_event]
                step_pids[job] = {e.step_key: e.pid for e in events if e.event_type_value == "STEP_START"}
                for step, pid in step_pids[job].items():
                    assert pid != launcher_pid and os.getpgid(pid) == worker_group, (job, step, pid)
            yield root, home, name, plate_id, step_pids


def test_ingest_and_training_steps_run_in_the_celery_worker(celery_runs):
    root, home, name, plate_id, step_pids = celery_runs
    assert set(step_pids[INGEST_JOB_NAME]) == {"raw_plates", "cell_coordinates", "cell_crops"}
    assert set(step_pids[TRAIN_JOB_NAME]) == {"trained_encoders", "embeddings"}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for job, steps in step_pids.items():
            (run,) = instance.get_runs(filters=dg.RunsFilter(job_name=job))
            assert run.status == dg.DagsterRunStatus.SUCCESS
            delegated = [
                e
                for e in instance.all_logs(run.run_id)
                if e.dagster_event
                and e.dagster_event.event_type_value == "ENGINE_EVENT"
                and "in celery worker" in e.message
            ]
            # dagster-celery reports, for each step, the worker (our named one) that executed it.
            assert {e.step_key for e in delegated} == set(steps)
            assert {
                e.dagster_event.engine_event_data.metadata["Celery worker"].value.split("@")[0] for e in delegated
            } == {name}
        assert instance.get_materialized_partitions(dg.AssetKey("cell_crops")) == {plate_id}
        assert instance.get_materialized_partitions(dg.AssetKey("trained_encoders")) == {VARIANT}
        assert instance.get_materialized_partitions(dg.AssetKey("embeddings")) == {VARIANT}


def test_training_in_the_worker_logs_its_run_and_device_to_the_shared_mlflow_store(celery_runs):
    import mlflow

    root, *_ = celery_runs
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias(f"gbm-encoder-{VARIANT}", "current")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["variant"] == VARIANT
    assert run.data.params["epochs"] == "1" and "loss" in run.data.metrics
    # Where it trained (the worker sees what this process sees): CPU and float32 without a GPU.
    from gbm_assets.models.device import detect_device

    assert {k: run.data.params.get(k) for k in ("device", "device_name", "precision", "n_gpus")} == {
        k: str(v) for k, v in detect_device().mlflow_params().items()
    }
