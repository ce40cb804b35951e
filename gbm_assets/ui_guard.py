"""The Dagster UI behind a guard this project controls: other web pages cannot drive it.

Dagster's webserver (dagster-webserver 1.13) executes GraphQL mutations sent as plain GET requests
(`<img src="http://127.0.0.1:3000/graphql?query=mutation{...}">` on any web page creates a
partition), accepts any ``Host`` header (DNS rebinding: a page whose name resolves to 127.0.0.1 is
"same origin" to the browser), never checks ``Origin`` (a cross-site form POST or a cross-site
websocket is served) and lets any page frame it. It has no setting for any of this: its options are
``--path-prefix`` (a URL prefix) and ``--read-only`` (which turns off every mutation, the UI's own
too), and the Dagster team documents ``dagster dev`` as having no CSRF protection. Binding to
127.0.0.1 does not help, since the attacker's page runs in the user's own browser.

So we build the webserver's ASGI app ourselves, with the factory ``dagster-webserver`` itself uses
(``create_app_from_workspace_process_context``), wrap it in :class:`UIGuard` and serve it with
uvicorn. The guard refuses, with HTTP 403 (a websocket: closed before the handshake, HTTP 403):

- a ``Host`` that is not allowed (DNS rebinding). Allowed by default: the bound address,
  ``localhost``, ``127.0.0.1`` and ``[::1]``, each with the bound port; ``GBM_UI_ALLOWED_HOSTS``
  adds names for a reverse proxy (``name`` allows any port, ``name:port`` that port only);
- any request or websocket whose ``Origin`` is not one of the allowed hosts (``null`` included);
- a state-changing request (anything but GET, HEAD, OPTIONS) whose ``Referer`` (read when there is
  no ``Origin``) is foreign, or that a browser marks ``Sec-Fetch-Site: cross-site``/``same-site``
  (another port on localhost is "same-site");
- a GET or HEAD to ``.../graphql`` carrying a GraphQL mutation or subscription, or a document that
  does not parse: over GET only queries run, whoever asks.

A request with neither ``Origin`` nor ``Referer`` passes, POST included: browsers send ``Origin``
with every POST, PUT, PATCH and DELETE and with every websocket handshake (Fetch standard; "null"
when they hide it), so such a request comes from a program (curl, a script, the tests), which can
set any header it likes anyway; refusing it would protect nothing. Every response also carries
``X-Frame-Options: SAMEORIGIN`` so no other site can frame the UI (clickjacking).

Run it as ``python -m gbm_assets.ui_guard -w workspace.yaml --host 127.0.0.1 --port 3000``
(``--daemon`` also starts and stops ``dagster-daemon``, as ``scripts/dagster-ui.sh`` does).
This module is Dagster layer: it imports dagster, dagster_webserver and starlette.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_ALLOWED_HOSTS = "GBM_UI_ALLOWED_HOSTS"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")

log = logging.getLogger("gbm_assets.ui_guard")

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class HostRule:
    """One allowed host: a lower-case name or IP (IPv6 without brackets) and a port (None: any port)."""

    name: str
    port: int | None = None

    def matches(self, name: str, port: int) -> bool:
        return name == self.name and (self.port is None or port == self.port)

    def __str__(self) -> str:
        name = f"[{self.name}]" if ":" in self.name else self.name
        return name if self.port is None else f"{name}:{self.port}"


def _split_authority(value: str) -> tuple[str, int | None] | None:
    """'name', 'name:port', '[v6]' or '[v6]:port' -> (lower-case name, port or None); None if malformed."""
    if not value or any(c in value for c in "@/?#\\ \t\r\n,"):
        return None
    try:
        parts = urllib.parse.urlsplit("//" + value)
        name, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    name = (name or "").rstrip(".")
    if not name or parts.netloc != value:
        return None
    return name, port


def parse_allowed_hosts(spec: str, source: str = ENV_ALLOWED_HOSTS) -> tuple[HostRule, ...]:
    """Host rules from 'name[:port]' entries separated by commas or spaces (IPv6 as '[::1]:3000').

    Raises ValueError naming `source` and the entry for '*', a URL, or an entry that is no host.
    """
    rules = []
    for entry in spec.replace(",", " ").split():
        if entry == "*":
            raise ValueError(
                f"{source}: '*' would let any web page in (DNS rebinding); list the names the UI is reached by"
            )
        if "://" in entry:
            raise ValueError(f"{source}: {entry!r} is a URL; give the host as the browser sees it, name or name:port")
        parsed = _split_authority(entry)
        if parsed is None:
            raise ValueError(f"{source}: {entry!r} is not a host name or name:port")
        rules.append(HostRule(*parsed))
    return tuple(rules)


def default_allowed_hosts(bind_host: str, port: int) -> tuple[HostRule, ...]:
    """The bound address (unless a wildcard such as 0.0.0.0) and the loopback names, with `port`."""
    names = [] if bind_host.strip("[]") in _WILDCARD_BINDS else [bind_host.strip("[]").lower().rstrip(".")]
    names += [n for n in LOOPBACK_NAMES if n not in names]
    return tuple(HostRule(n, port) for n in names)


def allowed_hosts(bind_host: str, port: int, environ: Mapping[str, str] = os.environ) -> tuple[HostRule, ...]:
    """default_allowed_hosts plus the entries of GBM_UI_ALLOWED_HOSTS (ValueError if one is malformed)."""
    return default_allowed_hosts(bind_host, port) + parse_allowed_hosts(environ.get(ENV_ALLOWED_HOSTS, ""))


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (latin-1, as HTTP sends it), or None."""
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _shown(value: str) -> str:
    """A client-sent value safe to put in a message or log line: escaped and cut short."""
    return ascii(value[:100] + ("..." if len(value) > 100 else ""))


def is_graphql_path(path: str) -> bool:
    """The GraphQL endpoint, with or without a --path-prefix and a trailing slash."""
    return path.rstrip("/").endswith("/graphql")


def graphql_get_refusal(query_string: bytes) -> str | None:
    """Why a GET/HEAD with this query string must not reach the GraphQL endpoint, or None.

    Reads the parameters as Starlette (and so Dagster) does; every `query` parameter must be a
    document that parses and holds only query operations.
    """
    from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse
    from starlette.datastructures import QueryParams

    for document in QueryParams(query_string).getlist("query"):
        try:
            parsed = parse(document)
        except GraphQLError:
            return "a GraphQL document that does not parse, sent over GET"
        for definition in parsed.definitions:
            if isinstance(definition, OperationDefinitionNode) and definition.operation is not OperationType.QUERY:
                return f"a GraphQL {definition.operation.value} sent over GET (send it as POST from the UI)"
    return None


class UIGuard:
    """Pure ASGI middleware in front of the Dagster webserver (see the module docstring for the rules).

    `allowed` is the Host allow-list; Origin and Referer values are allowed when their host and port
    (80/443 by scheme when absent) match it. Refused HTTP requests get 403 text/plain naming the
    rule, refused websockets are closed with code 1008 before they are accepted (uvicorn answers
    the handshake with 403); both are logged as warnings on `gbm_assets.ui_guard`.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[HostRule]):
        self.app = app
        self.allowed = tuple(allowed)
        if not self.allowed:
            raise ValueError("UIGuard needs at least one allowed host")

    def _host_allowed(self, name: str, port: int) -> bool:
        return any(rule.matches(name, port) for rule in self.allowed)

    def origin_allowed(self, url: str) -> bool:
        """An Origin (or a Referer's origin) is allowed: http(s), and host and port in the allow-list."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        port = port if port is not None else (443 if parts.scheme == "https" else 80)
        return self._host_allowed(parts.hostname.rstrip("."), port)

    def refusal(self, scope: Scope) -> str | None:
        """Why this http or websocket connection is refused, or None when it may pass."""
        host = _header(scope, b"host")
        if host is None:
            return "no Host header"
        authority = _split_authority(host)
        default_port = 443 if scope.get("scheme") in ("https", "wss") else 80
        if authority is None or not self._host_allowed(authority[0], authority[1] or default_port):
            return (
                f"Host {_shown(host)} is not one this UI is served as (DNS rebinding); "
                f"allowed: {', '.join(map(str, self.allowed))}; add names with {ENV_ALLOWED_HOSTS}"
            )
        origin = _header(scope, b"origin")
        if origin is not None and not self.origin_allowed(origin):
            return f"a request from the web page {_shown(origin)} (cross-origin)"
        websocket = scope["type"] == "websocket"
        method = scope.get("method", "GET").upper()
        if websocket or method not in SAFE_METHODS:
            referer = _header(scope, b"referer")
            if origin is None and referer is not None and not self.origin_allowed(referer):
                return f"a request from the web page {_shown(referer)} (cross-origin)"
            site = (_header(scope, b"sec-fetch-site") or "").strip().lower()
            if site in ("cross-site", "same-site"):
                return f"a {method if not websocket else 'websocket'} request the browser marks {site}"
        if method in ("GET", "HEAD") and not websocket and is_graphql_path(scope.get("path", "")):
            return graphql_get_refusal(scope.get("query_string") or b"")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        reason = self.refusal(scope)
        if reason is not None:
            log.warning("refused %s %s: %s", scope.get("method", "WEBSOCKET"), _shown(scope.get("path", "")), reason)
            if scope["type"] == "websocket":
                message = await receive()
                if message.get("type") == "websocket.connect":
                    await send({"type": "websocket.close", "code": 1008, "reason": "refused by the UI guard"})
                return
            body = f"403 Forbidden: the gbm-assets UI guard refused {reason}.\n".encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                        (b"x-content-type-options", b"nosniff"),
                        (b"x-frame-options", b"SAMEORIGIN"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        async def send_no_framing(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-frame-options" for k, _ in headers):
                    headers.append((b"x-frame-options", b"SAMEORIGIN"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_no_framing)


@contextlib.asynccontextmanager
async def _lifespan(_app):
    try:  # Ctrl-C cancels the lifespan task; that is a normal stop (as in dagster-webserver)
        yield
    except asyncio.CancelledError:
        pass


@contextlib.contextmanager
def guarded_app(workspace: str, allowed: Sequence[HostRule], *, path_prefix: str = "", read_only: bool = False):
    """The Dagster webserver's app for `workspace` (a workspace.yaml) on the DAGSTER_HOME instance,
    wrapped in UIGuard; the code server it starts stops when the block ends."""
    from dagster._cli.utils import get_possibly_temporary_instance_for_cli
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_webserver.app import create_app_from_workspace_process_context
    from dagster_webserver.cli import DEFAULT_DB_STATEMENT_TIMEOUT, DEFAULT_POOL_MAX_OVERFLOW, DEFAULT_POOL_RECYCLE
    from dagster_webserver.version import __version__

    with get_possibly_temporary_instance_for_cli("gbm_assets.ui_guard", logger=log) as instance:
        instance.optimize_for_webserver(DEFAULT_DB_STATEMENT_TIMEOUT, DEFAULT_POOL_RECYCLE, DEFAULT_POOL_MAX_OVERFLOW)
        with WorkspaceProcessContext(
            instance,
            version=__version__,
            read_only=read_only,
            workspace_load_target=WorkspaceFileTarget(paths=[workspace]),
        ) as context:
            app = create_app_from_workspace_process_context(context, path_prefix, 2000, lifespan=_lifespan)
            yield UIGuard(app, allowed)


def _start_daemon(workspace: str) -> subprocess.Popen:
    """`dagster-daemon run` (sensors, schedules, run queue) as `dagster dev` starts it."""
    # serve() has given SIGINT a handler, so the daemon starts with the default disposition even
    # when this process inherited an ignored SIGINT (a background job of a script); the daemon maps
    # SIGTERM to its SIGINT handling and could otherwise never be stopped.
    return subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-w", workspace])


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(
    workspace: str,
    host: str,
    port: int,
    allowed: Sequence[HostRule],
    *,
    path_prefix: str = "",
    read_only: bool = False,
    daemon: bool = False,
    log_level: str = "warning",
) -> int:
    """Serve the guarded UI until interrupted (and, with daemon, the daemon beside it).

    Returns the exit status: 0 after Ctrl-C/SIGTERM, 1 when the daemon stopped on its own (the UI
    stops with it, as with `dagster dev`) or the server could not start.
    """
    import uvicorn
    from dagster._utils.log import configure_loggers

    # uvicorn re-raises SIGINT/SIGTERM after its shutdown: both must raise KeyboardInterrupt here
    # (as in dagster-webserver), never kill the process before the code server and daemon are stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    configure_loggers(log_level="INFO")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    with guarded_app(workspace, allowed, path_prefix=path_prefix, read_only=read_only) as app:
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        daemon_proc = _start_daemon(workspace) if daemon else None
        daemon_died = threading.Event()
        if daemon_proc is not None:

            def watch() -> None:
                daemon_proc.wait()
                if not server.should_exit:
                    daemon_died.set()
                    log.error("dagster-daemon stopped (status %s); stopping the UI", daemon_proc.returncode)
                    server.should_exit = True

            threading.Thread(target=watch, name="daemon-watch", daemon=True).start()
        log.info(
            "Dagster UI (guarded) on http://%s:%d%s; allowed hosts: %s",
            host if ":" not in host else f"[{host}]",
            port,
            path_prefix,
            ", ".join(map(str, allowed)),
        )
        try:
            server.run()
        finally:
            server.should_exit = True
            if daemon_proc is not None:
                _stop(daemon_proc)
    return 1 if daemon_died.is_set() or not server.started else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gbm_assets.ui_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workspace", default="workspace.yaml", help="workspace file (default: workspace.yaml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=3000, help="port (default: 3000)")
    parser.add_argument("--path-prefix", default="", help="URL prefix when a reverse proxy serves the UI below a path")
    parser.add_argument("--read-only", action="store_true", help="no mutations at all (launching runs included)")
    parser.add_argument("--daemon", action="store_true", help="also run dagster-daemon (sensors, schedules, run queue)")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.workspace):
        print(f"gbm_assets.ui_guard: error: workspace file {args.workspace!r} not found", file=sys.stderr)
        return 1
    try:
        allowed = allowed_hosts(args.host, args.port)
    except ValueError as exc:
        print(f"gbm_assets.ui_guard: error: {exc}", file=sys.stderr)
        return 1
    try:
        return serve(
            args.workspace,
            args.host,
            args.port,
            allowed,
            path_prefix=args.path_prefix,
            read_only=args.read_only,
            daemon=args.daemon,
            log_level=args.log_level,
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
