"""The MLflow side as a user meets it: two tiny training runs, then `mlflow server` over their store.

The REST checks say the server holds what the MLflow UI shows (experiment, runs with params and
metrics, registered models); the browser checks say the UI pages render it.
"""

from __future__ import annotations

import json
import re
import urllib.parse

import dagster as dg
import pytest

from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.encoders import trained_encoders
from gbm_assets.assets.mlflow_tracking import EXPERIMENT, MLflowTracking
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets_tests.servers import chromium_page, mlflow_server, write_dense_plates

VARIANTS = ("siamese_a", "siamese_d")
TINY_TRAINING = {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two dense plates ingested with 64 px crops, one tiny training run per variant in a SQLite store."""
    root = tmp_path_factory.mktemp("mlflow_ui")
    plate_ids = write_dense_plates(root / "data" / "raw")
    store = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = (root / "artifacts").as_uri()
    resources = {
        "data": DataDirs(root=str(root / "data")),
        "mlflow_tracking": MLflowTracking(tracking_uri=store, artifact_root=artifacts),
    }
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, plate_ids)
    for plate_id in plate_ids:
        assert dg.materialize(
            [raw_plates, cell_coordinates, cell_crops],
            partition_key=plate_id,
            instance=instance,
            resources=resources,
            run_config={"ops": {"cell_crops": {"config": {"crop_size": 64}}}},
        ).success
    run_ids = {}
    for variant in VARIANTS:
        result = dg.materialize(
            [trained_encoders],
            partition_key=variant,
            instance=instance,
            resources=resources,
            run_config={"ops": {"trained_encoders": {"config": TINY_TRAINING}}},
        )
        assert result.success
        run_ids[variant] = result.asset_materializations_for_node("trained_encoders")[0].metadata["mlflow_run_id"].value
    return root, store, artifacts, run_ids


@pytest.fixture(scope="module")
def server(trained):
    root, store, artifacts, _ = trained
    with mlflow_server(
        root / "mlflow-server.log", "--backend-store-uri", store, "--default-artifact-root", artifacts
    ) as s:
        yield s


@pytest.fixture(scope="module")
def experiment_runs(server):
    experiment = server.get_json("/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": EXPERIMENT})[
        "experiment"
    ]
    runs = server.post_json("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    return experiment, {r["info"]["run_id"]: r for r in runs}


def _keys(entries: list[dict]) -> set[str]:
    return {e["key"] for e in entries}


def test_experiment_lists_the_runs_with_params_and_metrics(trained, experiment_runs):
    *_, run_ids = trained
    _, runs = experiment_runs
    assert set(run_ids.values()) <= set(runs)
    for variant, run_id in run_ids.items():
        run = runs[run_id]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == f"train-{variant}"
        assert params["variant"] == variant and params["batch_size"] == "16" and params["crop_size"] == "64"
        assert "loss" in _keys(run["data"]["metrics"])
        assert {"key": "dagster.partition", "value": variant} in run["data"]["tags"]


def test_each_variant_has_a_registered_model_pointing_at_its_run(server, trained):
    *_, run_ids = trained
    for variant, run_id in run_ids.items():
        name = f"gbm-encoder-{variant}"
        model = server.get_json("/api/2.0/mlflow/registered-models/get", {"name": name})["registered_model"]
        assert {"alias": "current", "version": "1"} in model["aliases"]
        version = server.get_json("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": "current"})
        assert version["model_version"]["run_id"] == run_id and version["model_version"]["status"] == "READY"


def test_the_two_runs_are_comparable(trained, experiment_runs):
    *_, run_ids = trained
    _, runs = experiment_runs
    a, d = (runs[run_ids[v]]["data"] for v in VARIANTS)
    assert _keys(a["metrics"]) == _keys(d["metrics"])
    params_a, params_d = ({p["key"]: p["value"] for p in run["params"]} for run in (a, d))
    assert params_a.keys() == params_d.keys()
    assert {k for k in params_a if params_a[k] != params_d[k]} == {"variant", "features"}  # what tells them apart


@pytest.mark.browser
def test_ui_home_page_renders_the_experiment(server, tmp_path):
    html = server.wait_for_http("/")
    assert "<title>MLflow</title>" in html
    with chromium_page(tmp_path / "failure.png") as page:
        page.goto(server.url + "/")
        page.get_by_text("Welcome to MLflow").wait_for()
        page.get_by_role("link", name=EXPERIMENT, exact=True).first.wait_for()
        shot = tmp_path / "mlflow_home.png"
        page.screenshot(path=str(shot))
        print(f"MLflow UI screenshot: {shot}")


@pytest.mark.browser
def test_compare_page_shows_both_runs(server, trained, experiment_runs, tmp_path):
    *_, run_ids = trained
    experiment, _ = experiment_runs
    ids = list(run_ids.values())
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment["experiment_id"]])})
    with chromium_page(tmp_path / "failure.png") as page:
        page.goto(f"{server.url}/#/compare-runs?{query}")
        page.get_by_text(re.compile(r"Comparing 2 Runs from 1 Experiment")).wait_for()
        for variant, run_id in run_ids.items():
            page.get_by_text(run_id, exact=True).first.wait_for()
            page.get_by_text(f"train-{variant}", exact=True).first.wait_for()
        shot = tmp_path / "mlflow_compare.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"MLflow compare screenshot: {shot}")
