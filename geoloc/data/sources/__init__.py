"""Where images with GPS come from: a registry of sources behind one interface.

A source turns a spec string (a folder, a manifest file, `s3://bucket/prefix`,
`mapillary:minlon,minlat,maxlon,maxlat`) into a stream of `RawItem`s and `SourceReject`s.
Ingestion then fetches remote bytes into `data/raw/<source>/` (I/O, threads, retries) and
processing decodes local files in worker processes. Sources never decode images.
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
    local_path: Path | None = None
    fetch: Callable[[], bytes] | None = None  # remote bytes; may raise FetchError
    raw_name: str | None = None  # file name under data/raw/<source>/ for fetched bytes
    extra: dict[str, Any] = field(default_factory=dict)


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
    name: str

    def items(self) -> Iterator[RawItem | SourceReject]:
        """Yield every candidate; raise `DataError` only when the input as a whole is unusable."""
        ...


SourceFactory = Callable[..., Source]
_REGISTRY: dict[str, tuple[Callable[[str], bool], SourceFactory]] = {}


def register_source(
    name: str, matches: Callable[[str], bool]
) -> Callable[[SourceFactory], SourceFactory]:
    """Register a factory `f(spec, **options) -> Source` for specs where `matches(spec)`."""

    def deco(factory: SourceFactory) -> SourceFactory:
        _REGISTRY[name] = (matches, factory)
        return factory

    return deco


def _load_builtin() -> None:
    # importing registers them; optional backends import their libraries lazily
    from geoloc.data.sources import folder, manifest, mapillary, s3  # noqa: F401


def source_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_source(spec: str, **options: Any) -> Source:
    """The source whose matcher accepts `spec` (first registered wins for ambiguous specs)."""
    _load_builtin()
    for _name, (matches, factory) in _REGISTRY.items():
        if matches(spec):
            return factory(spec, **options)
    raise DataError(
        f"source '{spec}' is not understood: expected a folder, a .csv/.parquet manifest, "
        f"s3://bucket/prefix or mapillary:minlon,minlat,maxlon,maxlat "
        f"(sources: {', '.join(sorted(_REGISTRY))})"
    )
