"""Where images with GPS come from: a registry of sources behind one interface.

A source turns a spec string (a folder, a manifest file, a published dataset such as OSV-5M
or MP-16, `s3://bucket/prefix`, `mapillary:minlon,minlat,maxlon,maxlat`) into a stream of
`RawItem`s and `SourceReject`s. Ingestion then fetches remote bytes into `data/raw/<source>/`
(I/O, threads, retries) and processing decodes local files (or zip members) in worker
processes. Sources never decode images.

`create_source(spec, format="auto")` picks the source: sources registered with a higher
`priority` look inside local files (a CSV header, a folder's tables) and are asked first, so a
downloaded OSV-5M or MP-16 is recognised by its columns; `format=<name>` names it instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from geoloc.errors import DataError


@dataclass
class RawItem:
    """One candidate image. Exactly one of `local_path` / `fetch` is set."""

    source: str  # registry name: folder, manifest, s3, mapillary, demo
    source_ref: str  # what a human needs to find it again: path, URL, s3 key
    image_id: str | None = None  # id given by the source; None -> derived from content hash
    lat: float | None = None  # None -> read from EXIF at processing time
    lon: float | None = None
    captured_at: str | None = None  # ISO 8601 when known
    sequence_id: str | None = None
    local_path: Path | None = None  # a file, or the zip holding `member`
    member: str | None = None  # a member of the zip at `local_path`, read in place
    fetch: Callable[[], bytes] | None = None  # remote bytes; may raise FetchError
    raw_name: str | None = None  # file name under data/raw/<source>/ for fetched bytes
    extra: dict[str, Any] = field(default_factory=dict)
    # optional per-image attributes kept into the index (`geoloc.data.attributes`)
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceReject:
    """A record the source itself refuses (bad coordinates, path escaping the folder...)."""

    source: str
    source_ref: str
    reason: str
    detail: str = ""


class FetchError(Exception):
    """A remote item could not be fetched (unreachable URL, 404, missing key)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Source(Protocol):
    """Optionally also `errors` (parts of the input that could not be read at all, e.g. a
    corrupt zip: the ingest finishes, then the CLI exits 1) and `notes` (hints), lists of str
    filled while `items()` runs."""

    name: str

    def items(self) -> Iterator[RawItem | SourceReject]:
        """Yield every candidate; raise `DataError` only when the input as a whole is unusable."""
        ...


SourceFactory = Callable[..., Source]
_REGISTRY: dict[str, tuple[Callable[[str], bool], SourceFactory, int]] = {}
AUTO = "auto"


def register_source(
    name: str, matches: Callable[[str], bool], *, priority: int = 0
) -> Callable[[SourceFactory], SourceFactory]:
    """Register a factory `f(spec, **options) -> Source` for specs where `matches(spec)`.

    Matchers of higher `priority` are asked first (those that read a file's header to
    recognise a published layout); equal priorities keep registration order.
    """

    def deco(factory: SourceFactory) -> SourceFactory:
        _REGISTRY[name] = (matches, factory, priority)
        return factory

    return deco


def _load_builtin() -> None:
    # importing registers them; optional backends import their libraries lazily
    from geoloc.data.sources import (  # noqa: F401
        folder,
        manifest,
        mapillary,
        mp16,
        osv5m,
        s3,
    )


def detect_format(spec: str) -> str | None:
    """The name of the source `format="auto"` picks for `spec`, None when none matches."""
    _load_builtin()
    ranked = sorted(_REGISTRY.items(), key=lambda kv: -kv[1][2])  # stable: registration order
    return next((name for name, (matches, _, _) in ranked if matches(spec)), None)


def create_source(spec: str, format: str = AUTO, **options: Any) -> Source:  # noqa: A002
    """The source `format` names, or with `auto` the one whose matcher accepts `spec`."""
    _load_builtin()
    if format != AUTO:
        if format not in _REGISTRY:
            raise DataError(
                f"format '{format}' is not known: expected {AUTO}, {', '.join(sorted(_REGISTRY))}"
            )
        return _REGISTRY[format][1](spec, **options)
    name = detect_format(spec)
    if name is not None:
        return _REGISTRY[name][1](spec, **options)
    raise DataError(
        f"source '{spec}' is not understood: expected a folder, a .csv/.parquet manifest, "
        f"s3://bucket/prefix or mapillary:minlon,minlat,maxlon,maxlat "
        f"(sources: {', '.join(sorted(_REGISTRY))})"
    )
