"""The `mapillary` source: street-level images in a bounding box, via the Graph API v4.

Spec `mapillary:minlon,minlat,maxlon,maxlat`; the access token comes from `MAPILLARY_TOKEN` and
the API base from `MAPILLARY_API_URL` (default https://graph.mapillary.com; tests point it at a
local server). A search, `GET /images?bbox=...&fields=id,computed_geometry,captured_at,
sequence,thumb_1024_url&limit=N`, followed through `paging.next`, gives every item's position
(`computed_geometry`, GeoJSON lon/lat: Mapillary's SfM-corrected fix, better than raw GPS),
capture time (epoch milliseconds) and sequence. Thumbnails are fetched later by ingestion.
A bbox search returns at most `limit` (2000) images and rarely a next page, so the box is
searched in tiles of `tile_deg` degrees (0.01 by default) and repeats are dropped by id.

Rate limits are normal with this API: 429 and 5xx answers are retried with exponential backoff,
honouring `Retry-After`. The token travels in the `Authorization` header, only to the API host
(never to the CDN serving thumbnails), and never appears in logs or messages.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from geoloc.data.rejects import CORRUPT, NO_GPS, UNREACHABLE, coords_problem
from geoloc.data.sources import FetchError, RawItem, SourceReject, register_source
from geoloc.errors import DataError

log = logging.getLogger(__name__)

TOKEN_ENV = "MAPILLARY_TOKEN"
API_URL_ENV = "MAPILLARY_API_URL"
DEFAULT_API_URL = "https://graph.mapillary.com"
FIELDS = ("id", "computed_geometry", "captured_at", "sequence", "thumb_1024_url")
PAGE_LIMIT = 2000  # the API's maximum per request
# Bbox searches are capped at `limit` results and often come without `paging.next`, so large
# boxes are split into tiles of this many degrees (edges shared; repeats dropped by id).
TILE_DEG = 0.01
TIMEOUT_S = (10.0, 60.0)  # (connect, read)
PREFIX = "mapillary:"


@dataclass(frozen=True)
class BBox:
    min_lon: float
    min_lat: float
    max_lon: float
    max_lat: float

    def __str__(self) -> str:
        return f"{self.min_lon},{self.min_lat},{self.max_lon},{self.max_lat}"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: `backoff_s * 2**attempt`, or the server's `Retry-After`, capped."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_wait_s: float = 60.0

    def wait(self, attempt: int, retry_after: float | None) -> float:
        base = retry_after if retry_after is not None else self.backoff_s * 2**attempt
        return min(max(base, 0.0), self.max_wait_s)


class RetriesExhaustedError(Exception):
    """Every attempt failed with a retryable answer; the message says the last one."""


def parse_bbox(spec: str) -> BBox:
    """`[mapillary:]minlon,minlat,maxlon,maxlat` -> BBox; `DataError` says what is wrong."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    parts = [p.strip() for p in body.split(",")]
    expected = (
        "expected mapillary:minlon,minlat,maxlon,maxlat, e.g. mapillary:2.29,48.85,2.30,48.86"
    )
    if len(parts) != 4:
        raise DataError(f"'{spec}': {len(parts)} numbers in the bounding box; {expected}")
    try:
        min_lon, min_lat, max_lon, max_lat = (float(p) for p in parts)
    except ValueError:
        raise DataError(f"'{spec}': the bounding box is not numeric; {expected}") from None
    if not all(-180.0 <= v <= 180.0 for v in (min_lon, max_lon)):
        raise DataError(f"'{spec}': longitudes must lie in [-180, 180]; {expected}")
    if not all(-90.0 <= v <= 90.0 for v in (min_lat, max_lat)):
        raise DataError(f"'{spec}': latitudes must lie in [-90, 90]; {expected}")
    if min_lon >= max_lon or min_lat >= max_lat:
        raise DataError(f"'{spec}': min must be below max for lon and lat; {expected}")
    return BBox(min_lon, min_lat, max_lon, max_lat)


def split_bbox(bbox: BBox, tile_deg: float) -> list[BBox]:
    """`bbox` as a grid of tiles at most `tile_deg` wide and high (row-major, south-west first)."""
    if tile_deg <= 0:
        raise DataError(f"tile size must be positive, got {tile_deg}")
    n_lon = max(1, math.ceil((bbox.max_lon - bbox.min_lon) / tile_deg - 1e-9))
    n_lat = max(1, math.ceil((bbox.max_lat - bbox.min_lat) / tile_deg - 1e-9))

    def edges(lo: float, hi: float, n: int) -> list[float]:
        # endpoints exact, inner edges rounded so that requests stay readable
        return [lo, *(round(lo + (hi - lo) * i / n, 7) for i in range(1, n)), hi]

    lons = edges(bbox.min_lon, bbox.max_lon, n_lon)
    lats = edges(bbox.min_lat, bbox.max_lat, n_lat)
    return [
        BBox(lons[i], lats[j], lons[i + 1], lats[j + 1]) for j in range(n_lat) for i in range(n_lon)
    ]


def redact(url: str) -> str:
    """`url` without an `access_token` query value (for messages and logs)."""
    parts = urlsplit(url)
    query = [(k, "***" if k == "access_token" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query, safe=",*")))


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return (when - datetime.now(UTC)).total_seconds()


def get_with_retries(
    session: Any,
    url: str,
    *,
    policy: RetryPolicy,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    """GET `url`; 429, 5xx and connection errors are retried, anything else is returned."""
    import requests

    last = ""
    for attempt in range(policy.attempts):
        retry_after = None
        try:
            resp = session.get(url, params=params, headers=headers, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            last = f"{type(exc).__name__} for {redact(url)}"
        else:
            if resp.status_code != 429 and resp.status_code < 500:
                return resp
            last = f"HTTP {resp.status_code} for {redact(resp.url or url)}"
            retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        if attempt + 1 < policy.attempts:
            wait = policy.wait(attempt, retry_after)
            log.info("mapillary: %s, retrying in %.2fs", last, wait)
            time.sleep(wait)
    raise RetriesExhaustedError(f"{last} (gave up after {policy.attempts} attempts)")


def _api_error(resp: Any) -> str:
    """The `error.message` of a Graph API error body, else the start of the body."""
    try:
        err = resp.json().get("error", {})
        return str(err.get("message") or err)[:200]
    except ValueError:
        return resp.text[:200]


def captured_at_iso(value: Any) -> str | None:
    """Epoch milliseconds (the API's `captured_at`) -> ISO 8601 in UTC."""
    if value is None or value == "":
        return None
    try:
        return datetime.fromtimestamp(float(value) / 1000.0, tz=UTC).isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _sequence_id(value: Any) -> str | None:
    if isinstance(value, dict):  # `sequence{id}` style expansions
        value = value.get("id")
    return str(value) if value not in (None, "") else None


def _lat_lon(record: dict[str, Any]) -> tuple[float, float] | None:
    geometry = record.get("computed_geometry")
    coords = geometry.get("coordinates") if isinstance(geometry, dict) else None
    if not isinstance(coords, list | tuple) or len(coords) < 2:
        return None
    try:
        return float(coords[1]), float(coords[0])  # GeoJSON order is lon, lat
    except (TypeError, ValueError):
        return None


class MapillarySource:
    """Image records of one bbox search as `RawItem`s whose `fetch` downloads the thumbnail."""

    name = "mapillary"

    def __init__(
        self,
        spec: str,
        *,
        token: str | None = None,
        api_url: str | None = None,
        page_limit: int = PAGE_LIMIT,
        tile_deg: float = TILE_DEG,
        max_images: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.spec = spec
        self.bbox = parse_bbox(spec)
        self._token = token or os.environ.get(TOKEN_ENV, "")
        if not self._token:
            raise DataError(
                f"'{spec}': the Mapillary source needs an access token: set {TOKEN_ENV} "
                "(a client token from https://www.mapillary.com/dashboard/developers)"
            )
        self.api_url = (api_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL).rstrip("/")
        self.page_limit = page_limit
        self.tile_deg = tile_deg
        self.max_images = max_images
        self.retry = retry or RetryPolicy()
        self._local = threading.local()  # one requests.Session per fetch thread

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
        return session

    def _auth_for(self, url: str) -> dict[str, str]:
        """The token header, only for the API host (thumbnail CDNs never see it)."""
        same_host = urlsplit(url).netloc == urlsplit(self.api_url).netloc
        return {"Authorization": f"OAuth {self._token}"} if same_host else {}

    def _page(self, url: str, params: dict[str, str] | None) -> dict[str, Any]:
        try:
            resp = get_with_retries(
                self._session(), url, policy=self.retry, params=params, headers=self._auth_for(url)
            )
        except RetriesExhaustedError as exc:
            raise DataError(f"'{self.spec}': Mapillary API unreachable: {exc}") from None
        if resp.status_code in (401, 403):
            raise DataError(
                f"'{self.spec}': Mapillary refused the token in {TOKEN_ENV} "
                f"(HTTP {resp.status_code}: {_api_error(resp)})"
            )
        if resp.status_code != 200:
            raise DataError(
                f"'{self.spec}': Mapillary API answered HTTP {resp.status_code} for "
                f"{redact(resp.url or url)}: {_api_error(resp)}"
            )
        try:
            body = resp.json()
        except ValueError:
            raise DataError(f"'{self.spec}': Mapillary API answered with non-JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("data", []), list):
            raise DataError(f"'{self.spec}': unexpected Mapillary response: no 'data' list")
        return body

    def records(self) -> Iterator[dict[str, Any]]:
        """Every image record of the search: tile after tile, page after page."""
        tiles = split_bbox(self.bbox, self.tile_deg)
        if len(tiles) > 1:
            log.info(
                "mapillary %s: searching %d tiles of %g deg", self.bbox, len(tiles), self.tile_deg
            )
        for tile in tiles:
            yield from self._search(tile)

    def _search(self, tile: BBox) -> Iterator[dict[str, Any]]:
        """One bbox search, following `paging.next` while the API offers one."""
        url: str | None = f"{self.api_url}/images"
        params: dict[str, str] | None = {
            "bbox": str(tile),
            "fields": ",".join(FIELDS),
            "limit": str(self.page_limit),
        }
        seen_pages: set[str] = set()
        pages = records = 0
        nxt = None
        while url:
            body = self._page(url, params)
            pages += 1
            data = body.get("data", [])
            records += len(data)
            yield from data
            nxt = (body.get("paging") or {}).get("next")
            if not nxt or nxt in seen_pages:  # a repeated cursor would loop forever
                break
            seen_pages.add(nxt)
            url, params = nxt, None  # the next link carries every parameter
        if pages == 1 and not nxt and records >= self.page_limit:
            log.warning(
                "mapillary %s: %d records, the page limit, and no next page: the search is "
                "probably truncated; use a smaller tile_deg",
                tile,
                records,
            )
        log.debug("mapillary %s: %d records in %d pages", tile, records, pages)

    def _thumb_fetcher(self, url: str) -> Callable[[], bytes]:
        def fetch() -> bytes:
            try:
                resp = get_with_retries(
                    self._session(), url, policy=self.retry, headers=self._auth_for(url)
                )
            except RetriesExhaustedError as exc:
                raise FetchError(UNREACHABLE, str(exc)) from None
            if resp.status_code != 200:
                raise FetchError(UNREACHABLE, f"HTTP {resp.status_code} for {redact(url)}")
            return bytes(resp.content)

        return fetch

    def _item(self, record: dict[str, Any], ordinal: int) -> RawItem | SourceReject:
        image_id = str(record.get("id") or "")
        ref = f"{PREFIX}{image_id}" if image_id else f"{PREFIX}{self.bbox}#{ordinal}"
        if not image_id:
            return SourceReject(self.name, ref, CORRUPT, "record without an id")
        position = _lat_lon(record)
        if position is None:
            return SourceReject(self.name, ref, NO_GPS, "no computed_geometry in the API record")
        problem = coords_problem(*position)
        if problem:
            return SourceReject(self.name, ref, *problem)
        thumb = record.get("thumb_1024_url")
        if not thumb:
            return SourceReject(self.name, ref, UNREACHABLE, "no thumb_1024_url in the record")
        return RawItem(
            source=self.name,
            source_ref=ref,
            image_id=image_id,
            lat=position[0],
            lon=position[1],
            captured_at=captured_at_iso(record.get("captured_at")),
            sequence_id=_sequence_id(record.get("sequence")),
            fetch=self._thumb_fetcher(str(thumb)),
            raw_name=f"{image_id}.jpg",
            extra={"thumb_url": redact(str(thumb))},
        )

    def items(self) -> Iterator[RawItem | SourceReject]:
        seen: set[str] = set()
        repeats = 0
        for ordinal, record in enumerate(self.records()):
            if not isinstance(record, dict):
                continue
            image_id = str(record.get("id") or "")
            if image_id and image_id in seen:
                repeats += 1  # pages overlapping: the same image, not a second record
                continue
            seen.add(image_id)
            yield self._item(record, ordinal)
            if self.max_images is not None and len(seen) >= self.max_images:
                break
        if repeats:
            log.info(
                "mapillary %s: %d records repeated across pages, kept once", self.bbox, repeats
            )


@register_source("mapillary", lambda spec: spec.lower().startswith(PREFIX))
def create_mapillary_source(
    spec: str,
    page_limit: int = PAGE_LIMIT,
    tile_deg: float = TILE_DEG,
    max_images: int | None = None,
    backoff_s: float = 1.0,
    retries: int = 5,
    **_: object,
) -> MapillarySource:
    """`mapillary:minlon,minlat,maxlon,maxlat` (token from `MAPILLARY_TOKEN`)."""
    return MapillarySource(
        spec,
        page_limit=page_limit,
        tile_deg=tile_deg,
        max_images=max_images,
        retry=RetryPolicy(attempts=max(1, retries), backoff_s=backoff_s),
    )
