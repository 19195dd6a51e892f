"""Fetching image URLs over http(s): timeouts, retries, and one clear stop when offline.

Sources fetch URLs only when the user asks for it (`fetch_urls`); a file on disk always wins.
When they do, every fetcher of one source shares a `HostBreaker`: after `limit` failed
connections in a row to a host (refused, DNS, timeouts), that host is not tried again, and if
no URL of the source has been fetched yet, the network is taken as down and the whole ingest
stops with one line (`<host> unreachable after 3 attempts; images are expected on disk under
<dir>`) instead of waiting out one timeout per row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from geoloc.data.rejects import UNREACHABLE
from geoloc.data.sources import FetchError
from geoloc.errors import DataError

HTTP_TIMEOUT_S = (5.0, 30.0)  # (connect, read)
HTTP_RETRIES = 3
BREAKER_LIMIT = 3


class NetworkUnreachableError(DataError):
    """No URL of a source could be fetched and its host refused `limit` connections in a row."""


class HostBreaker:
    """Counts failed connections per host, shared by the fetch threads of one source.

    A host with `limit` failures in a row is *dead*: its remaining URLs are refused at once
    (`unreachable`, no waiting). While nothing has been fetched yet, a dead host stops the
    ingest (`NetworkUnreachableError`): the network, or the only host, is down.
    """

    def __init__(self, disk_hint: Path | str | None = None, limit: int = BREAKER_LIMIT) -> None:
        self.disk_hint = disk_hint
        self.limit = limit
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._dead: dict[str, str] = {}  # host -> last error
        self._fetched = False

    def _stop_message(self, host: str, last: str) -> str:
        where = f"; images are expected on disk under {self.disk_hint}" if self.disk_hint else ""
        return f"{host} unreachable after {self.limit} attempts ({last}){where}"

    def before(self, host: str) -> None:
        """Refuse at once a URL of a dead host (or stop, when nothing was ever fetched)."""
        with self._lock:
            if host not in self._dead:
                return
            last, fetched = self._dead[host], self._fetched
        if not fetched:
            raise NetworkUnreachableError(self._stop_message(host, last))
        raise FetchError(UNREACHABLE, f"{host} unreachable after {self.limit} attempts, "
                                      f"not tried again ({last})")  # fmt: skip

    def succeeded(self, host: str) -> None:
        with self._lock:
            self._fetched = True
            self._failures[host] = 0

    def failed(self, host: str, error: str) -> None:
        """Count one failed connection; raises as `before` does once the host is dead."""
        with self._lock:
            self._failures[host] = self._failures.get(host, 0) + 1
            if self._failures[host] >= self.limit:
                self._dead.setdefault(host, error)
        self.before(host)


def http_fetcher(
    url: str, retries: int = HTTP_RETRIES, breaker: HostBreaker | None = None
) -> Callable[[], bytes]:
    """A `fetch()` for one URL: timeouts, retries with backoff on errors, 429 and 5xx.

    With a `breaker`, connection failures count towards the host's limit (see `HostBreaker`).
    """
    host = urlsplit(url).netloc or url

    def fetch() -> bytes:
        import requests

        last = ""
        for attempt in range(retries):
            if breaker is not None:
                breaker.before(host)
            try:
                resp = requests.get(url, timeout=HTTP_TIMEOUT_S)
            except requests.RequestException as exc:
                last = f"{url}: {type(exc).__name__}: {exc}"
                if breaker is not None:
                    breaker.failed(host, type(exc).__name__)
            else:
                if breaker is not None:
                    breaker.succeeded(host)
                if resp.status_code == 200:
                    return resp.content
                last = f"{url}: HTTP {resp.status_code}"
                if resp.status_code != 429 and resp.status_code < 500:
                    break  # 404 and friends will not get better
            if attempt + 1 < retries:
                time.sleep(min(0.2 * 2**attempt, 2.0))
        raise FetchError(UNREACHABLE, last)

    return fetch
