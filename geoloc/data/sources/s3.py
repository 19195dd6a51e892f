"""The `s3` source: `s3://bucket/prefix` holding images and/or CSV/Parquet manifests.

- Every manifest under the prefix (`.csv`, `.tsv`, `.parquet`...) is read with the manifest
  source's `read_manifest`; its image column holds keys relative to the manifest's folder, or
  `s3://` / `http(s)://` URLs. Coordinates come from the manifest.
- Every image under the prefix that no manifest references is an item of its own, with its GPS
  read from EXIF at processing time (as for a local folder).

Bytes are not read here: each item carries a `fetch()` that downloads through
`geoloc.storage.s3` when ingestion asks for it, so listing a large prefix stays cheap.
The endpoint comes from the `endpoint_url` option or `AWS_ENDPOINT_URL` (MinIO and other
S3-compatible stores).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

from geoloc.data.rejects import (
    MISSING_FILE,
    NOT_IMAGE,
    PATH_ESCAPE,
    UNREACHABLE,
)
from geoloc.data.sources import FetchError, RawItem, SourceReject, register_source
from geoloc.data.sources.folder import IMAGE_SUFFIXES
from geoloc.data.sources.manifest import (
    MANIFEST_SUFFIXES,
    checked_rows,
    read_manifest_bytes,
)
from geoloc.data.sources.urls import http_fetcher
from geoloc.data.state import stable_hash
from geoloc.errors import DataError
from geoloc.storage import s3 as storage

log = logging.getLogger(__name__)


def _is_manifest(key: str) -> bool:
    return key.lower().endswith(MANIFEST_SUFFIXES)


def _is_image(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES


def _raw_name(bucket: str, key: str, etag: str = "") -> str:
    """A file name under data/raw/s3/, unique per object version and still readable.

    Ingestion reuses a raw file that already exists, so the ETag is part of the name: an object
    replaced in the bucket is fetched again instead of served from a stale copy.
    """
    base = PurePosixPath(key).name
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)[-80:]
    return f"{stable_hash(f'{bucket}/{key}@{etag}', 12)}_{safe or 'object'}"


def s3_fetcher(client: Any, bucket: str, key: str) -> Callable[[], bytes]:
    """A `fetch()` for one object; a missing key or failing store becomes a `FetchError`."""

    def fetch() -> bytes:
        try:
            return storage.get_bytes(client, bucket, key)
        except storage.StorageError as exc:
            raise FetchError(UNREACHABLE, str(exc)) from None

    return fetch


class S3Source:
    """Objects under one S3 prefix as `RawItem`s (listing only; bytes are fetched later)."""

    name = "s3"

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        try:
            self.url = storage.parse_s3_url(url)
        except storage.StorageError as exc:
            raise DataError(str(exc)) from None
        self.spec = url
        self.endpoint_url = endpoint_url
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = storage.create_client(self.endpoint_url)
        return self._client

    def _list(self) -> list[storage.ObjectInfo]:
        """Every object under the prefix; `DataError` when the store or bucket is unusable."""
        try:
            storage.check_bucket(self.client, self.url.bucket)
            objects = list(storage.list_objects(self.client, self.url.bucket, self.url.prefix))
        except storage.StorageError as exc:
            raise DataError(f"S3 source {exc}") from None
        if not objects:
            raise DataError(f"S3 source '{self.spec}': no objects under this prefix")
        return objects

    def _ref(self, key: str) -> str:
        return f"s3://{self.url.bucket}/{key}"

    def items(self) -> Iterator[RawItem | SourceReject]:
        objects = self._list()
        keys = {o.key: o.etag for o in objects}
        referenced: set[str] = set()
        for obj in objects:
            if _is_manifest(obj.key):
                yield from self._manifest_items(obj.key, keys, referenced)
        for obj in objects:
            if _is_manifest(obj.key) or obj.key in referenced:
                continue
            ref = self._ref(obj.key)
            if not _is_image(obj.key):
                suffix = PurePosixPath(obj.key).suffix or "(none)"
                detail = f"extension '{suffix}' is not an image type"
                yield SourceReject(self.name, ref, NOT_IMAGE, detail)
                continue
            yield RawItem(
                source=self.name,
                source_ref=ref,
                fetch=s3_fetcher(self.client, self.url.bucket, obj.key),
                raw_name=_raw_name(self.url.bucket, obj.key, obj.etag),
            )

    def _resolve_key(self, manifest_key: str, image: str, keys: dict[str, str]) -> str | None:
        """The object key a manifest's relative `image` names; None when it leaves the prefix.

        Bare ids (OSV-5M style) also try `<id>.jpg` and `images/<id>.jpg`, like local manifests.
        """
        folder = posixpath.dirname(manifest_key)
        joined = posixpath.normpath(posixpath.join(folder, image.lstrip("/")))
        if self.url.prefix:
            inside = joined.startswith(f"{self.url.prefix}/")
        else:
            inside = joined != ".." and not joined.startswith("../")
        if not inside:
            return None
        if PurePosixPath(joined).suffix or joined in keys:
            return joined
        for candidate in (f"{joined}.jpg", posixpath.join(folder, "images", f"{image}.jpg")):
            if candidate in keys:
                return candidate
        return joined

    def _manifest_items(
        self, manifest_key: str, keys: dict[str, str], referenced: set[str]
    ) -> Iterator[RawItem | SourceReject]:
        manifest_url = self._ref(manifest_key)
        try:
            data = storage.get_bytes(self.client, self.url.bucket, manifest_key)
        except storage.StorageError as exc:
            raise DataError(f"S3 source '{self.spec}': {exc}") from None
        table = read_manifest_bytes(data, manifest_url)  # DataError names the manifest
        for row in checked_rows(table, manifest_url, self.name):
            if isinstance(row, SourceReject):
                yield row
                continue
            fetch, raw_name, reject = self._row_fetch(manifest_key, row.image, keys, referenced)
            if reject is not None:
                yield SourceReject(self.name, row.ref, *reject)
                continue
            yield RawItem(
                source=self.name, source_ref=row.ref, fetch=fetch, raw_name=raw_name, **row.fields
            )

    def _row_fetch(
        self, manifest_key: str, image: str, keys: dict[str, str], referenced: set[str]
    ) -> tuple[Callable[[], bytes] | None, str | None, tuple[str, str] | None]:
        """(fetch, raw_name, None) for a manifest's image column, or (None, None, reject)."""
        low = image.lower()
        if low.startswith(("http://", "https://")):
            return http_fetcher(image), _raw_name("http", image.split("?", 1)[0]), None
        if low.startswith("s3://"):
            try:
                target = storage.parse_s3_url(image)
            except storage.StorageError as exc:
                return None, None, (MISSING_FILE, str(exc))
            if target.bucket == self.url.bucket:
                referenced.add(target.prefix)
            fetch = s3_fetcher(self.client, target.bucket, target.prefix)
            return fetch, _raw_name(target.bucket, target.prefix), None
        key = self._resolve_key(manifest_key, image, keys)
        if key is None:
            return None, None, (PATH_ESCAPE, f"'{image}' escapes the prefix {self.url}")
        if key not in keys:
            return None, None, (MISSING_FILE, f"{self._ref(key)} does not exist")
        referenced.add(key)
        fetch = s3_fetcher(self.client, self.url.bucket, key)
        return fetch, _raw_name(self.url.bucket, key, keys[key]), None


@register_source("s3", lambda spec: spec.lower().startswith("s3://"))
def create_s3_source(spec: str, endpoint_url: str | None = None, **_: object) -> S3Source:
    """`s3://bucket/prefix`; `endpoint_url` overrides `AWS_ENDPOINT_URL`."""
    return S3Source(spec, endpoint_url=endpoint_url)
