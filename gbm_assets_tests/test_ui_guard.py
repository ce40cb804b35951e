"""Other web pages cannot drive the Dagster UI (issue 14, item 12).

Dagster's webserver runs GraphQL mutations sent as GET, accepts any Host and never checks Origin, so a
page open in the same browser (an <img>, a no-cors fetch, a form POST, DNS rebinding) could add a
partition to the running UI. gbm_assets.ui_guard puts the webserver behind a Host/Origin guard.

Unit tests drive the ASGI middleware directly around a tiny inner app; the rest start the real
guarded webserver for the project's Definitions and attack it over HTTP, over a websocket and from a
page served by another localhost port in Chromium.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

from gbm_assets.ui_guard import HostRule, UIGuard, allowed_hosts, default_allowed_hosts, parse_allowed_hosts
from gbm_assets_tests.servers import REPO_ROOT, chromium_page, free_port, guarded_dagster_ui

UI = "127.0.0.1:3000"


# --- the middleware around a tiny inner app ---------------------------------------------------


class Inner:
    """An ASGI app that records what reached it and answers 200 'inner' (websockets: accepts)."""

    def __init__(self):
        self.calls: list[dict] = []

    async def __call__(self, scope, receive, send):
        self.calls.append(dict(scope))
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept", "subprotocol": "graphql-ws"})
            return
        if scope["type"] == "lifespan":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"inner:" + body})


def guard(extra: str = "") -> tuple[UIGuard, Inner]:
    inner = Inner()
    return UIGuard(inner, allowed_hosts("127.0.0.1", 3000, {"GBM_UI_ALLOWED_HOSTS": extra})), inner


def request(
    app,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: dict | None = None,
    body: bytes = b"",
    scheme: str = "http",
) -> tuple[int, dict, bytes]:
    """One HTTP request through an ASGI app: (status, lower-case headers, body). Host defaults to the UI's."""
    headers = {"host": UI, **{k.lower(): v for k, v in (headers or {}).items()}}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items() if v is not None],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 3000),
    }
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}, out


def websocket(app, headers: dict | None = None, path: str = "/graphql") -> dict:
    """Open a websocket through an ASGI app; the first message the app sends (accept or close)."""
    headers = {"host": UI, **{k.lower(): v for k, v in (headers or {}).items()}}
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "subprotocols": ["graphql-ws"],
    }
    sent: list[dict] = []
    messages = [{"type": "websocket.connect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "websocket.disconnect", "code": 1000}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]


def gql(document: str) -> str:
    return urllib.parse.urlencode({"query": document})


MUTATION = "mutation { setNuxSeen }"


def test_a_host_the_ui_is_not_served_as_is_refused_dns_rebinding():
    app, inner = guard()
    for host in (
        "evil.example:3000",
        "evil.example",
        "127.0.0.1:8000",
        "localhost",
        "127.0.0.1.evil.example:3000",
        "user@127.0.0.1:3000",
        "127.0.0.1:3000/x",
        "[::2]:3000",
        "",
    ):
        status, headers, body = request(app, headers={"Host": host})
        assert status == 403, host
        assert b"Host" in body and b"GBM_UI_ALLOWED_HOSTS" in body, body
    assert request(app, headers={"Host": None})[0] == 403  # no Host at all
    assert inner.calls == []
    for host in ("127.0.0.1:3000", "localhost:3000", "LOCALHOST:3000", "localhost.:3000", "[::1]:3000"):
        assert request(app, headers={"Host": host})[0] == 200, host
    assert len(inner.calls) == 5


def test_a_cross_origin_post_is_refused():
    app, inner = guard()
    post = partial(request, app, "POST", "/graphql", body=json.dumps({"query": MUTATION}).encode())
    for headers in (
        {"Origin": "http://localhost:8000"},  # another port of this machine
        {"Origin": "http://evil.example"},
        {"Origin": "http://127.0.0.1:3000.evil.example"},
        {"Origin": "null"},  # sandboxed frame, data: URL, no-referrer form
        {"Origin": "file://"},
        {"Referer": "http://localhost:8000/attack.html"},  # no Origin, foreign Referer
        {"Sec-Fetch-Site": "same-site"},  # what Chromium says for another localhost port
        {"Sec-Fetch-Site": "cross-site", "Origin": f"http://{UI}"},
    ):
        status, _, body = post(headers={"Content-Type": "text/plain", **headers})
        assert status == 403, headers
        assert body.startswith(b"403 Forbidden: the gbm-assets UI guard refused"), body
    for method in ("PUT", "PATCH", "DELETE"):
        assert (
            request(app, method, "/report_asset_materialization/x", headers={"Origin": "http://localhost:8000"})[0]
            == 403
        )
    assert inner.calls == []


def test_a_graphql_mutation_over_get_is_refused_whoever_sends_it():
    app, inner = guard()
    same_origin = {"Origin": f"http://{UI}", "Referer": f"http://{UI}/assets"}
    refused = {
        MUTATION: "mutation",
        "query A { version } mutation B { setNuxSeen }": "mutation",  # operationName could pick either
        "subscription { locationStateChangeEvents { event { message } } }": "subscription",
        "mutation {": "does not parse",
        "{ version } }": "does not parse",
    }
    for document, why in refused.items():
        for path in ("/graphql", "/graphql/", "/dagster/graphql"):  # with a --path-prefix too
            for headers in ({}, same_origin):
                status, _, body = request(app, "GET", path, gql(document), headers)
                assert status == 403 and why.encode() in body, (document, path, headers, body)
        assert request(app, "HEAD", "/graphql", gql(document))[0] == 403
    # a second query parameter cannot hide the mutation from the guard (Starlette reads the last one)
    assert request(app, "GET", "/graphql", gql(MUTATION) + "&" + gql("{ version }"))[0] == 403
    assert request(app, "GET", "/graphql", "query=mutation%7BsetNuxSeen%7D")[0] == 403
    assert inner.calls == []
    # queries over GET, GraphiQL, and UI pages with a `query` parameter of their own still pass
    assert request(app, "GET", "/graphql", gql("{ version }"))[0] == 200
    assert request(app, "GET", "/graphql", gql("query Named { version }"), same_origin)[0] == 200
    assert request(app, "GET", "/graphql", headers={"Accept": "text/html"})[0] == 200
    assert request(app, "GET", "/assets", "query=mutation")[0] == 200
    assert len(inner.calls) == 4


def test_same_origin_requests_from_the_ui_pass_and_cannot_be_framed():
    app, inner = guard()
    body = json.dumps({"query": MUTATION}).encode()
    for origin in (f"http://{UI}", "http://localhost:3000", "http://[::1]:3000"):
        status, headers, out = request(
            app,
            "POST",
            "/graphql",
            headers={
                "Origin": origin,
                "Referer": f"{origin}/assets",
                "Content-Type": "application/json",
                "Sec-Fetch-Site": "same-origin",
            },
            body=body,
        )
        assert (status, out) == (200, b"inner:" + body), origin  # the body reaches Dagster unchanged
        assert headers["x-frame-options"] == "SAMEORIGIN"
    # a page of the UI opened from a link on another site (top-level navigation) still opens
    status, headers, _ = request(
        app, "GET", "/runs", headers={"Referer": "http://mlflow.example/x", "Sec-Fetch-Site": "cross-site"}
    )
    assert status == 200 and headers["x-frame-options"] == "SAMEORIGIN"
    assert [c["method"] for c in inner.calls] == ["POST", "POST", "POST", "GET"]


def test_programs_without_origin_or_referer_pass_get_and_post():
    """curl, scripts and the tests send neither header. Browsers always send Origin with a POST and a
    websocket handshake ("null" when hiding it), so a POST without both comes from a program, which
    could forge any header anyway: refusing it would protect nothing and break scripted use."""
    app, inner = guard()
    assert request(app, "GET", "/server_info")[0] == 200
    assert request(app, "GET", "/graphql", gql("{ version }"))[0] == 200
    body = json.dumps({"query": MUTATION}).encode()
    assert request(app, "POST", "/graphql", headers={"Content-Type": "application/json"}, body=body)[0] == 200
    assert request(app, "POST", "/report_asset_materialization/x")[0] == 200
    assert len(inner.calls) == 4


def test_a_websocket_from_another_page_is_refused():
    app, inner = guard()
    for headers in (
        {"Origin": "http://localhost:8000"},
        {"Origin": "null"},
        {"Host": "evil.example:3000"},
        {"Origin": f"http://{UI}", "Sec-Fetch-Site": "same-site"},
    ):
        first = websocket(app, headers)
        assert first["type"] == "websocket.close" and first["code"] == 1008, headers
    assert inner.calls == []
    assert websocket(app, {"Origin": f"http://{UI}"})["type"] == "websocket.accept"
    assert websocket(app, {"Origin": "http://localhost:3000"})["type"] == "websocket.accept"
    assert websocket(app, {})["type"] == "websocket.accept"  # a program, not a browser


def test_reverse_proxy_names_come_from_gbm_ui_allowed_hosts():
    app, inner = guard("dagster.lab.example, gbm.internal:8443")
    proxied = {"Host": "dagster.lab.example", "Origin": "https://dagster.lab.example"}
    assert request(app, "POST", "/graphql", headers=proxied, scheme="https")[0] == 200
    assert (
        request(app, "POST", "/graphql", headers={"Host": "gbm.internal:8443", "Origin": "https://gbm.internal:8443"})[
            0
        ]
        == 200
    )
    assert request(app, "GET", "/", headers={"Host": "gbm.internal:9000"})[0] == 403  # that name, another port
    assert request(app, "GET", "/", headers={"Host": "evil.example"})[0] == 403
    assert (
        request(app, "POST", "/graphql", headers={"Host": "dagster.lab.example", "Origin": "https://evil.example"})[0]
        == 403
    )
    # a proxy that rewrites Host to the bound address: the browser's Origin is still checked
    assert request(app, "POST", "/graphql", headers={"Origin": "https://dagster.lab.example"})[0] == 200
    assert len(inner.calls) == 3

    assert parse_allowed_hosts("a.example, [::1]:3000 b:1") == (
        HostRule("a.example"),
        HostRule("::1", 3000),
        HostRule("b", 1),
    )
    for bad in ("*", "https://dagster.lab.example", "a.example:http", "a/b", "a.example:99999"):
        with pytest.raises(ValueError, match="GBM_UI_ALLOWED_HOSTS"):
            parse_allowed_hosts(bad)
    # a wildcard bind is no name a browser uses; the loopback names stay
    assert default_allowed_hosts("0.0.0.0", 3000) == (
        HostRule("localhost", 3000),
        HostRule("127.0.0.1", 3000),
        HostRule("::1", 3000),
    )
    assert HostRule("gbm.lab", 3000) in default_allowed_hosts("gbm.lab", 3000)


def test_lifespan_passes_through():
    app, inner = guard()

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        pass

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [c["type"] for c in inner.calls] == ["lifespan"]


def test_the_ui_script_starts_the_guarded_webserver_and_the_daemon():
    """scripts/dagster-ui.sh no longer serves the bare webserver (`dagster dev`, `dagster-webserver`)."""
    lines = [
        line
        for line in (REPO_ROOT / "scripts" / "dagster-ui.sh").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    command = lines[-1].split()
    assert command[:4] == ["exec", "python", "-m", "gbm_assets.ui_guard"], lines
    assert "--daemon" in command and command[command.index("--host") + 1] == "127.0.0.1"
    assert not any("dagster dev" in line or "dagster-webserver" in line for line in lines)


# --- the real webserver for the project's Definitions -----------------------------------------

ADD = """mutation {{ addDynamicPartition(repositorySelector: {{repositoryLocationName: "{location}",
  repositoryName: "{repository}"}}, partitionsDefName: "plates", partitionKey: "{key}") {{
  __typename ... on AddDynamicPartitionSuccess {{ partitionKey }} ... on PythonError {{ message }} }} }}"""
REPOSITORIES = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"


def send_http(
    server, method: str, path: str, *, data: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def same_origin_graphql(server, document: str) -> dict:
    """A GraphQL request the way the UI page sends it: POST, JSON, its own Origin."""
    status, body = send_http(
        server,
        "POST",
        "/graphql",
        data=json.dumps({"query": document}).encode(),
        headers={
            "Content-Type": "application/json",
            "Origin": server.url,
            "Referer": server.url + "/assets",
            "Sec-Fetch-Site": "same-origin",
        },
    )
    assert status == 200, (status, body[:500])
    answer = json.loads(body)
    assert "errors" not in answer, answer["errors"]
    return answer["data"]


def plates(workdir: Path) -> list[str]:
    """The dynamic partitions of `plates`, read from the instance's storage (not through the UI)."""
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(workdir / "dagster_home")) as instance:
        return list(instance.get_dynamic_partitions("plates"))


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("guarded-ui")
    with guarded_dagster_ui(workdir) as server:
        node = same_origin_graphql(server, REPOSITORIES)["repositoriesOrError"]["nodes"][0]
        server.add = partial(ADD.format, location=node["location"]["name"], repository=node["name"])
        server.workdir = workdir
        yield server


def test_the_running_ui_refuses_the_attack_and_serves_the_ui_request(dagster_ui):
    server, port = dagster_ui, dagster_ui.url.rsplit(":", 1)[1]
    attacker = f"http://localhost:{free_port()}"
    evil = server.add(key="evil")
    attacks = {
        "GET, foreign Origin (fetch)": ("GET", "/graphql?" + gql(evil), None, {"Origin": attacker}),
        "GET, no Origin (<img src>)": ("GET", "/graphql?" + gql(evil), None, {"Referer": attacker + "/a.html"}),
        "GET, rebound Host": ("GET", "/graphql?" + gql(evil), None, {"Host": f"rebind.evil.example:{port}"}),
        "POST form, query in URL": (
            "POST",
            "/graphql?" + gql(evil),
            b"x=1",
            {"Origin": attacker, "Content-Type": "application/x-www-form-urlencoded"},
        ),
        "POST JSON, foreign Origin": (
            "POST",
            "/graphql",
            json.dumps({"query": evil}).encode(),
            {"Origin": attacker, "Content-Type": "application/json"},
        ),
        "POST JSON, rebound Host and Origin": (
            "POST",
            "/graphql",
            json.dumps({"query": evil}).encode(),
            {
                "Host": f"rebind.evil.example:{port}",
                "Content-Type": "application/json",
                "Origin": f"http://rebind.evil.example:{port}",
            },
        ),
    }
    for name, (method, path, data, headers) in attacks.items():
        status, body = send_http(server, method, path, data=data, headers=headers)
        assert status == 403 and body.startswith(b"403 Forbidden: the gbm-assets UI guard refused"), (
            name,
            status,
            body[:300],
        )
    assert "evil" not in plates(server.workdir)

    # the same mutation sent the way the UI sends it works, so the refusals above were the guard's
    answer = same_origin_graphql(server, server.add(key="good"))["addDynamicPartition"]
    assert answer == {"__typename": "AddDynamicPartitionSuccess", "partitionKey": "good"}
    assert plates(server.workdir) == ["good"]
    log = server.log.read_text(errors="replace")
    assert len(re.findall(r"WARNING gbm_assets\.ui_guard: refused", log)) >= len(attacks), server.tail()


def test_the_running_ui_refuses_a_websocket_from_another_page(dagster_ui):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = dagster_ui.url.replace("http://", "ws://") + "/graphql"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin=f"http://localhost:{free_port()}", subprotocols=["graphql-ws"], proxy=None, open_timeout=30)
    assert refused.value.response.status_code == 403
    with connect(url, origin=dagster_ui.url, subprotocols=["graphql-ws"], proxy=None, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "connection_init", "payload": {}}))
        assert json.loads(ws.recv(timeout=30))["type"] == "connection_ack"


ATTACK_PAGE = """<!doctype html><title>a page on another port</title>
<iframe name="sink" style="display:none"></iframe>
<form id="form" method="POST" target="sink" enctype="text/plain" action="__UI__/graphql?__FORM_QUERY__">
  <input name="x" value="1"></form>
<script>
const UI = "__UI__", MUTATION = __MUTATION__;
const q = key => "query=" + encodeURIComponent(MUTATION.replace("KEY", key));
const settle = p => p.then(r => "answered " + r.type, e => "failed " + e);
window.results = {};
const tries = [
  new Promise(done => { const img = new Image(); img.onload = img.onerror = () => done("img done");
                        img.src = UI + "/graphql?" + q("evil-img"); }),
  settle(fetch(UI + "/graphql?" + q("evil-get"), {mode: "no-cors"})),
  settle(fetch(UI + "/graphql?" + q("evil-post"), {method: "POST", mode: "no-cors", body: "x"})),
  settle(fetch(UI + "/graphql", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                 body: JSON.stringify({query: MUTATION.replace("KEY", "evil-json")})})),
  new Promise(done => { document.querySelector("iframe").onload = () => done("form done");
                        document.getElementById("form").submit(); }),
  new Promise(done => { const ws = new WebSocket(UI.replace("http", "ws") + "/graphql", "graphql-ws");
                        ws.onopen = () => { window.results.wsOpened = true; ws.close(); done("ws opened"); };
                        ws.onerror = () => done("ws refused"); }),
];
Promise.all(tries).then(r => { window.results.done = r; });
</script>"""


@contextmanager
def static_site(folder: Path):
    """A plain HTTP server for folder on a free 127.0.0.1 port (another origin than the UI)."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


@pytest.mark.browser
def test_a_page_on_another_port_cannot_add_a_partition_and_the_ui_still_works(dagster_ui, tmp_path):
    server = dagster_ui
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    mutation = server.add(key="KEY")
    page_html = (
        ATTACK_PAGE.replace("__MUTATION__", json.dumps(mutation))
        .replace("__UI__", server.url)
        .replace("__FORM_QUERY__", gql(mutation.replace("KEY", "evil-form")))
    )
    (site_dir / "attack.html").write_text(page_html)
    before = server.log.read_text(errors="replace").count("gbm_assets.ui_guard: refused")

    with chromium_page(tmp_path / "failure.png") as page, static_site(site_dir) as site:
        page.goto(f"{site}/attack.html")
        page.wait_for_function("window.results && window.results.done", timeout=30_000)
        results = page.evaluate("window.results")
        assert not results.get("wsOpened"), results
        time.sleep(1)  # the guard has answered every request; let its log reach the file
        assert not [p for p in plates(server.workdir) if p.startswith("evil")], results
        log = server.log.read_text(errors="replace")
        refusals = log.count("gbm_assets.ui_guard: refused") - before
        # img, two fetches, the JSON fetch, the form and the websocket each reached the guard and were refused
        assert refusals >= 6, (results, server.tail())
        assert "GraphQL mutation sent over GET" in log and "(cross-origin)" in log and "WEBSOCKET" in log

        # the UI itself, through the guard: the asset graph loads (same-origin POSTs), the UI's own
        # mutation works (Skip in the newsletter dialog sends setNuxSeen), a websocket opens
        assert same_origin_graphql(server, "{ shouldShowNux }")["shouldShowNux"] is True
        page.goto(f"{server.url}/asset-groups")
        page.get_by_role("dialog").get_by_role("button", name="Skip").click()
        page.get_by_text("ingest", exact=True).first.dblclick()  # unfold the group in the asset tree
        page.get_by_text("raw_plates", exact=True).first.wait_for()
        for group in ("cells", "models", "analysis"):
            page.get_by_text(group, exact=True).first.wait_for()
        deadline = time.monotonic() + 30
        while same_origin_graphql(server, "{ shouldShowNux }")["shouldShowNux"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert same_origin_graphql(server, "{ shouldShowNux }")["shouldShowNux"] is False, server.tail()
        opened = page.evaluate(
            """url => new Promise(done => {
            const ws = new WebSocket(url, "graphql-ws");
            ws.onopen = () => ws.send(JSON.stringify({type: "connection_init", payload: {}}));
            ws.onmessage = m => { done(JSON.parse(m.data).type); ws.close(); };
            ws.onerror = () => done("refused"); })""",
            server.url.replace("http", "ws") + "/graphql",
        )
        assert opened == "connection_ack"


def test_the_ui_stops_when_its_daemon_dies_and_leaves_nothing_behind(tmp_path):
    """--daemon (scripts/dagster-ui.sh): the daemon runs beside the UI, is stopped with it, and when it
    dies (SIGKILL) the UI stops with status 1 and takes its code server with it, as `dagster dev` does."""
    with guarded_dagster_ui(tmp_path, "--daemon") as server:
        statuses = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (statuses and all(statuses.values())):
            health = same_origin_graphql(
                server, "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"
            )
            statuses = {d["daemonType"]: d["healthy"] for d in health["instance"]["daemonHealth"]["allDaemonStatuses"]}
            time.sleep(1)
        assert statuses.get("SENSOR"), (statuses, server.tail())
        children = subprocess.run(
            ["ps", "-o", "pid=,args=", "--ppid", str(server.proc.pid)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        daemon = [int(line.split()[0]) for line in children if "dagster._daemon run" in line]
        code_server = [int(line.split()[0]) for line in children if "dagster api grpc" in line]
        assert len(daemon) == 1 and len(code_server) == 1, children
        os.kill(daemon[0], signal.SIGKILL)
        assert server.proc.wait(timeout=60) == 1, server.tail()
        assert "dagster-daemon stopped" in server.log.read_text(errors="replace")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(code_server[0]):
            time.sleep(0.5)
        assert not _alive(code_server[0]), "the UI's code server outlived it"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if Path(f"/proc/{pid}/stat").exists()
        else "X"
    )
    return state not in ("Z", "X")


def test_the_guard_refuses_a_bad_allowed_hosts_setting_before_starting(tmp_path):
    env = {**os.environ, "GBM_UI_ALLOWED_HOSTS": "*"}
    done = subprocess.run(
        [sys.executable, "-m", "gbm_assets.ui_guard", "-w", "workspace.yaml", "--port", str(free_port())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "GBM_UI_ALLOWED_HOSTS" in done.stderr and "DNS rebinding" in done.stderr, done.stderr
