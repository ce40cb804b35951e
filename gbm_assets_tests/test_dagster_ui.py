"""The Dagster UI as a user meets it: scripts/dagster-ui.sh's guarded webserver and daemon on a fresh
instance (`python -m gbm_assets.ui_guard --daemon`), a plate materialized by clicking.

This is the README's path (scripts/dagster-ui.sh): the daemon's new_plate_sensor registers the plate,
then a person picks raw_plates in the asset graph, chooses the plate in the launch dialog and launches.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from datetime import UTC, datetime

import pytest

from gbm_assets_tests.servers import REPO_ROOT, chromium_page, free_port, server_process

pytestmark = pytest.mark.browser

RUNS = """{ runsOrError { ... on Runs { results {
  runId status assetSelection { path } tags { key value } } } } }"""
PARTITIONS = """{ assetNodeOrError(assetKey: {path: ["raw_plates"]}) { ... on AssetNode { partitionKeys } } }"""


def _graphql(server, query: str) -> dict:
    answer = server.post_json("/graphql", {"query": query})
    assert "errors" not in answer, answer["errors"]
    return answer["data"]


def _wait(predicate, timeout_s: float, what: str, server):
    """Poll predicate() every second until it returns something truthy; fail with the server log after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"dagster dev exited while waiting for {what}\n{server.tail()}")
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{server.tail()}")


def _plates(server) -> list[str]:
    return _graphql(server, PARTITIONS)["assetNodeOrError"].get("partitionKeys") or []


def _ui_run(server, plate: str, known: set[str]) -> dict | None:
    """The run the UI launched: new, for raw_plates alone, on this plate."""
    for run in _graphql(server, RUNS)["runsOrError"]["results"]:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        if (
            run["runId"] not in known
            and run["assetSelection"] == [{"path": ["raw_plates"]}]
            and tags.get("dagster/partition") == plate
        ):
            return run
    return None


def _final_status(server, run_id: str) -> str | None:
    statuses = {r["runId"]: r["status"] for r in _graphql(server, RUNS)["runsOrError"]["results"]}
    return statuses.get(run_id) if statuses.get(run_id) in ("SUCCESS", "FAILURE", "CANCELED") else None


def test_materialize_a_plate_partition_from_the_ui(tmp_path):
    from gbm_assets.imaging.synthetic import write_plates

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / ".dagster_home" / "dagster.yaml", home)
    data = tmp_path / "data"
    plate = write_plates(data / "raw", n_cultures=1, n_concentrations=1, images_per_plate=1, size=512)[0].name
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GBM_ASSETS_DATA": str(data),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        # keep the nightly retraining schedule 12 hours away from this test
        "GBM_RETRAIN_CRON": f"0 {(datetime.now(UTC).hour + 12) % 24} * * *",
    }
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gbm_assets.ui_guard",
        "--daemon",
        "-w",
        "workspace.yaml",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    dagster_dev = server_process(cmd, tmp_path / "dagster.log", port, env=env, cwd=REPO_ROOT, stop_signal=signal.SIGINT)
    with chromium_page(tmp_path / "failure.png") as page, dagster_dev as dagster:
        dagster.wait_for_http("/server_info", timeout_s=120)
        _wait(lambda: plate in _plates(dagster), 120, f"new_plate_sensor to register {plate}", dagster)
        _graphql(dagster, "mutation { setNuxSeen }")  # no newsletter dialog over the graph
        known = {r["runId"] for r in _graphql(dagster, RUNS)["runsOrError"]["results"]}

        page.goto(f"{dagster.url}/asset-groups")
        page.get_by_text("ingest", exact=True).first.dblclick()  # unfold the group in the asset tree
        page.get_by_text("raw_plates", exact=True).first.click()  # selects the node in the graph
        page.get_by_role("button").filter(has_text=re.compile(r"^Materialize selected")).click()
        dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize raw_plates")
        dialog.get_by_text("Select a partition or create one").click()
        page.get_by_placeholder("Filter partitions").fill(plate)
        page.get_by_role("menuitem").filter(has_text=plate).click()
        dialog.get_by_role("button").filter(has_text=re.compile(r"^Launch 1 run$")).click()

        run = _wait(lambda: _ui_run(dagster, plate, known), 60, "the run launched from the UI", dagster)
        status = _wait(lambda: _final_status(dagster, run["runId"]), 180, f"run {run['runId']} to finish", dagster)
        assert status == "SUCCESS", dagster.tail()

        page.goto(f"{dagster.url}/runs/{run['runId']}")
        page.get_by_text("Success", exact=True).first.wait_for()
        page.get_by_text(plate).first.wait_for()
        page.get_by_text(re.compile("Finished execution of run")).first.wait_for()  # the event log has loaded
        shot = tmp_path / "dagster_ui.png"
        page.screenshot(path=str(shot))
        print(f"Dagster UI screenshot: {shot}")
