"""`geoloc serve`: the runs folder over HTTP, read-only, so dashboards open from a browser.

Browsers refuse `file://` links from web pages (a Prefect artifact, the MLflow UI), so flow
artifacts link `$GEOLOC_DASHBOARD_URL/<run_id>/dashboard.html` instead; this is the small
server behind that URL. GET and HEAD only (the standard library answers 501 to anything else),
nothing is cached so a re-written report shows at once.

Safe to expose: a file or folder is served only when its real path (links resolved) lies inside
the folder; dot-files and database files (`mlflow.db`, `optuna.db`, their journals) are neither
served nor listed; a connection idle for `idle_timeout` seconds is closed, so half-sent requests
cannot pin threads; a malformed request (`%00`...) is an error answer and one debug line, never a
traceback on the console.
"""

from __future__ import annotations

import functools
import html
import http.server
import io
import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any

from geoloc.errors import GeolocError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_IDLE_TIMEOUT_S = 30.0
"""Seconds a connection may stay silent (mid-request or kept alive) before it is closed."""
HIDDEN_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db-journal", ".db-wal", ".db-shm")
"""Tracking and sweep stores may sit in the runs folder; they are never served."""


def _hidden(name: str) -> bool:
    """A dot-file/-folder or a database file: never served, never listed."""
    return name.startswith(".") or name.lower().endswith(HIDDEN_SUFFIXES)


class _ReadOnlyHandler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def send_head(self) -> Any:
        """404 for anything outside the root once links are resolved, hidden or malformed;
        otherwise the standard library's answer."""
        url_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if "\x00" in url_path:
            self.send_error(400, "malformed path")
            return None
        root = os.path.realpath(self.directory)
        real = os.path.realpath(self.translate_path(self.path))
        if os.path.commonpath([root, real]) != root or any(
            _hidden(part) for part in Path(os.path.relpath(real, root)).parts
        ) or any(_hidden(part) for part in url_path.split("/") if part):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def list_directory(self, path: str | os.PathLike[str]) -> io.BytesIO | None:
        """A plain listing without the hidden entries (the standard one shows them all)."""
        try:
            names = sorted((n for n in os.listdir(path) if not _hidden(n)), key=str.lower)
        except OSError:
            self.send_error(404, "No permission to list directory")
            return None
        shown = [n + "/" if os.path.isdir(os.path.join(path, n)) else n for n in names]
        items = "".join(
            f'<li><a href="{urllib.parse.quote(n)}">{html.escape(n)}</a></li>' for n in shown
        )
        body = f"<!DOCTYPE html><html><body><ul>{items}</ul></body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """One debug line instead of socketserver's traceback on stderr (a client that hung
        up, timed out or sent garbage is not the operator's problem)."""
        import sys

        log.debug("request from %s failed: %s", client_address, sys.exc_info()[1])


def make_server(
    root: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
) -> http.server.ThreadingHTTPServer:  # fmt: skip
    """A threading HTTP server for `root` (not started: call `serve_forever`); port 0 picks one.

    A missing folder or a port in use is a `GeolocError` naming it.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise GeolocError(f"runs folder '{root}' does not exist (train a run first)")
    handler_class = type("_Handler", (_ReadOnlyHandler,), {"timeout": idle_timeout})
    handler = functools.partial(handler_class, directory=str(root))
    try:
        return _QuietServer((host, port), handler)
    except OSError as exc:
        raise GeolocError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from exc


def server_url(server: http.server.HTTPServer) -> str:
    """`http://host:port` of a server from `make_server` (the bound port when 0 was asked)."""
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"
