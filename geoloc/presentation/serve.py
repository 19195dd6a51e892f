"""`geoloc serve`: the runs folder over HTTP, read-only, so dashboards open from a browser.

Browsers refuse `file://` links from web pages (a Prefect artifact, the MLflow UI), so flow
artifacts link `$GEOLOC_DASHBOARD_URL/<run_id>/dashboard.html` instead; this is the small
server behind that URL. GET and HEAD only (the standard library answers 501 to anything else),
paths cannot leave the folder, and nothing is cached so a re-written report shows at once.
"""

from __future__ import annotations

import functools
import http.server
import logging
from pathlib import Path
from typing import Any

from geoloc.errors import GeolocError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765


class _ReadOnlyHandler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)


def make_server(
    root: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT
) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server for `root` (not started: call `serve_forever`); port 0 picks one.

    A missing folder or a port in use is a `GeolocError` naming it.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise GeolocError(f"runs folder '{root}' does not exist (train a run first)")
    handler = functools.partial(_ReadOnlyHandler, directory=str(root))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise GeolocError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from exc


def server_url(server: http.server.HTTPServer) -> str:
    """`http://host:port` of a server from `make_server` (the bound port when 0 was asked)."""
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"
