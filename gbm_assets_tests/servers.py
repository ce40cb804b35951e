"""Helpers for tests that run real servers (Dagster, MLflow, PostgreSQL) and drive Debian's Chromium.

A missing service skips its test locally, but fails it where GBM_REQUIRE_SERVICES=1 (set by .ci/run),
so CI can never pass by skipping the browser and PostgreSQL tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# No sandbox: CI runs as root. The rest keeps Chromium from reaching out to the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def services_required() -> bool:
    return os.environ.get("GBM_REQUIRE_SERVICES") == "1"


def unavailable(reason: str):
    """Skip the test for a missing service, or fail it where the services are required."""
    if services_required():
        pytest.fail(f"{reason} (GBM_REQUIRE_SERVICES=1: this service must be available)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Server:
    """A server process in its own process group, its output captured in a log file."""

    def __init__(self, proc: subprocess.Popen, log: Path, url: str):
        self.proc, self.log, self.url = proc, log, url

    def tail(self) -> str:
        return f"--- {self.log} ---\n{log_tail(self.log)}"

    def wait_for_http(self, path: str = "/", timeout_s: float = 60.0) -> str:
        """Poll until path answers 200 and return the body; fail early if the server died."""
        deadline = time.monotonic() + timeout_s
        problem = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} before {path} answered\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as response:
                    return response.read().decode("utf-8", "replace")
            except (urllib.error.URLError, OSError) as exc:
                problem = str(getattr(exc, "reason", exc))
            time.sleep(0.5)
        pytest.fail(f"{self.url}{path} did not answer within {timeout_s:.0f} s ({problem})\n{self.tail()}")

    def get_json(self, path: str, params: dict | None = None) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=30) as response:
            return json.load(response)

    def post_json(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


@contextmanager
def server_process(
    cmd: list[str],
    log: Path,
    port: int,
    *,
    env: dict | None = None,
    cwd: Path | None = None,
    stop_signal: int = signal.SIGTERM,
    grace_s: float = 10.0,
) -> Iterator[Server]:
    """Start cmd (listening on 127.0.0.1:port); on exit signal its whole process group, then kill what is left."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            yield Server(proc, log, f"http://127.0.0.1:{port}")
        finally:
            try:
                os.killpg(proc.pid, stop_signal)
                proc.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:  # children (workers, code servers, run processes) may outlive the leader
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


@contextmanager
def mlflow_server(log: Path, *store_args: str) -> Iterator[Server]:
    """`mlflow server` on a free loopback port with the given store options, answering /health.

    One worker, no background job runners and no telemetry: a small footprint on 2 cores, no network.
    """
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *store_args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with server_process(cmd, log, port, env=env) as server:
        server.wait_for_http("/health", timeout_s=120)
        yield server


@contextmanager
def chromium_page(failure_screenshot: Path | None = None, width: int = 1400, height: int = 900):
    """A Playwright page in Debian's headless Chromium with a fresh profile (no browser download, ever).

    With failure_screenshot, a test that fails inside the block leaves a picture of the page there.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with (
        tempfile.TemporaryDirectory(prefix="gbm-chromium-", ignore_cleanup_errors=True) as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            page.set_default_navigation_timeout(30_000)
            try:
                yield page
            except BaseException:  # pytest.fail and skip too
                if failure_screenshot is not None:
                    with suppress(Exception):  # never hide the test's own error
                        page.screenshot(path=str(failure_screenshot))
                raise
        finally:
            context.close()


def write_dense_plates(raw: Path, n: int = 2) -> list[str]:
    """n small synthetic plates (one 512 px image each) at the highest concentration, ~30 cells each.

    The lower concentrations of so small an image hold too few cells to crop and train on.
    """
    from gbm_assets.imaging.synthetic import write_plates

    scratch = raw.parent / ".synthetic"
    raw.mkdir(parents=True, exist_ok=True)
    dense = [
        p for p in write_plates(scratch, n_cultures=n, images_per_plate=1, size=512) if p.name.endswith("-c4000-r1")
    ]
    for plate in dense:
        plate.rename(raw / plate.name)
    shutil.rmtree(scratch)
    return sorted(p.name for p in dense)


@contextmanager
def guarded_dagster_ui(workdir: Path, *extra_args: str, env: dict | None = None) -> Iterator[Server]:
    """The Dagster UI as scripts/dagster-ui.sh serves it (`python -m gbm_assets.ui_guard`, the
    webserver behind the project's Host/Origin guard) on a free loopback port, answering /server_info.

    A fresh instance under workdir/dagster_home with the repository's dagster.yaml, an empty
    workdir/data/raw, an MLflow SQLite file in workdir and the log in workdir/dagster-ui.log; extra_args
    go to the command (e.g. "--daemon"), env is added to the environment. Stopped with SIGINT, as Ctrl-C.
    """
    from datetime import datetime

    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / ".dagster_home" / "dagster.yaml", home)
    (workdir / "data" / "raw").mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k != "GBM_UI_ALLOWED_HOSTS"}
    full_env.update(
        {
            "DAGSTER_HOME": str(home),
            "GBM_ASSETS_DATA": str(workdir / "data"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            # keep the nightly retraining schedule 12 hours away from any test
            "GBM_RETRAIN_CRON": f"0 {(datetime.now(UTC).hour + 12) % 24} * * *",
            **(env or {}),
        }
    )
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gbm_assets.ui_guard",
        "-w",
        "workspace.yaml",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    with server_process(
        cmd, workdir / "dagster-ui.log", port, env=full_env, cwd=REPO_ROOT, stop_signal=signal.SIGINT
    ) as server:
        server.wait_for_http("/server_info", timeout_s=120)
        yield server
