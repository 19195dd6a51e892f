"""The `osv5m` source: OpenStreetView-5M as it is published, with no renaming.

```
osv5m/
  train.csv, test.csv     id, latitude, longitude, thumb_original_url, country, sequence,
                          captured_at, region, sub-region, city, land_cover, climate, soil,
                          drive_side, dist_sea, ... (one row per image)
  images/train/...        <id>.jpg anywhere below, as files or inside zip shards 00.zip, 01.zip
  images/test/...
```

The spec is the dataset folder (every split table in it: `train.csv`, `test.csv`) or one table
(`osv5m/train.csv`). The images of `<split>.csv` are looked up by id under `images/<split>/`
(else `images/`, or the `images` option): loose files and zip members alike, the zips read in
place (`geoloc.data.sources.archive`). The per-image attributes (country, region, ...) ride
along into the index. `thumb_original_url` is fetched only with `fetch_urls`, for ids with no
image on disk. A zip that cannot be opened is one `corrupt` reject naming it plus an entry in
`errors`; the other zips load, and the ids it may have held are `missing_file` rejects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from geoloc.data.rejects import CORRUPT, MISSING_FILE
from geoloc.data.sources import RawItem, SourceReject, register_source
from geoloc.data.sources.archive import ArchiveOrder, ImageLookup, ZipMember
from geoloc.data.sources.folder import IMAGE_SUFFIXES
from geoloc.data.sources.manifest import (
    MANIFEST_SUFFIXES,
    ManifestRow,
    checked_rows,
    has_columns,
    iter_manifest,
    table_columns,
    url_hint,
    url_raw_name,
)
from geoloc.data.sources.urls import HostBreaker, http_fetcher
from geoloc.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
REQUIRED = ("id", "latitude", "longitude")
# columns only OSV-5M tables have (its full and its filtered metadata): one of them is enough
SIGNATURE = (
    "thumb_original_url", "land_cover", "road_index", "drive_side", "climate", "soil",
    "dist_sea", "quadtree_10_1000", "unique_country", "sub-region",
)  # fmt: skip
_NOT_LOCAL = ("s3://", "http://", "https://", "mapillary:", "demo:")


def is_osv5m_table(path: Path) -> bool:
    """Whether `path` is a CSV/Parquet table with OSV-5M's columns (from its header only)."""
    if not path.name.lower().endswith(MANIFEST_SUFFIXES) or not path.is_file():
        return False
    cols = table_columns(path)
    lower = {c.lower() for c in cols}
    return has_columns(cols, *REQUIRED) and any(c in lower for c in SIGNATURE)


def split_tables(root: Path) -> list[Path]:
    """The OSV-5M tables of a dataset folder: `train.csv`/`test.csv`, else any such table."""
    named = [root / f"{split}.csv" for split in SPLITS]
    found = [p for p in named if is_osv5m_table(p)]
    if found:
        return found
    return [p for p in sorted(root.iterdir()) if p.is_file() and is_osv5m_table(p)]


def looks_like_osv5m(spec: str) -> bool:
    if spec == "demo" or spec.lower().startswith(_NOT_LOCAL):
        return False
    path = Path(spec)
    try:
        return bool(split_tables(path)) if path.is_dir() else is_osv5m_table(path)
    except OSError:
        return False


class OSV5MSource:
    """Rows of OSV-5M split tables as items, their images found by id on disk."""

    name = "osv5m"

    def __init__(
        self,
        spec: str,
        images: str | None = None,
        split: str | None = None,
        fetch_urls: bool = False,
    ) -> None:
        path = Path(spec)
        if path.is_dir():
            tables = split_tables(path)
            if split is not None:
                tables = [t for t in tables if t.stem.split("_")[0] == split]
            if not tables:
                which = f"{split}.csv" if split else "train.csv / test.csv"
                raise DataError(
                    f"'{spec}' holds no OSV-5M table: expected {which} with columns "
                    f"{', '.join(REQUIRED)}, thumb_original_url, country, ..."
                )
        elif path.is_file():
            if not is_osv5m_table(path):
                found = ", ".join(table_columns(path)) or "no columns"
                raise DataError(
                    f"'{spec}' is not an OSV-5M table: expected columns {', '.join(REQUIRED)} "
                    f"and OSV-5M's own (thumb_original_url, land_cover, ...), found {found}"
                )
            tables = [path]
        else:
            raise DataError(f"OSV-5M dataset '{spec}' does not exist")
        self.tables = tables
        self.images = Path(images) if images else None
        if self.images is not None and not self.images.is_dir():
            raise DataError(f"images folder '{images}' does not exist")
        self.fetch_urls = bool(fetch_urls)
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.image_dirs = {t: self._images_dir(t) for t in tables}

    def _images_dir(self, table: Path) -> Path | None:
        """Where the images of `table` are: the `images` option, images/<split>/, images/."""
        if self.images is not None:
            return self.images
        split = table.stem.split("_")[0]  # train_filtered.csv -> train
        for folder in (table.parent / "images" / split, table.parent / "images"):
            if folder.is_dir():
                return folder
        if not self.fetch_urls:
            raise DataError(
                f"OSV-5M table '{table}' has no images folder: expected "
                f"{table.parent / 'images' / split} (or {table.parent / 'images'}) holding "
                "<id>.jpg files or zip shards; give -o images=<folder>, or --fetch-urls to "
                "download thumb_original_url"
            )
        return None

    def items(self) -> Iterator[RawItem | SourceReject]:
        for table in self.tables:
            yield from self._table_items(table, self.image_dirs[table])

    def _table_items(self, table: Path, images: Path | None) -> Iterator[RawItem | SourceReject]:
        # the table a chunk at a time; refs name the id, the image is <id>.<ext>
        chunks = (c.assign(image=c["image_id"]) for c in iter_manifest(table, table.name))
        lookup = ImageLookup.scan(images, IMAGE_SUFFIXES) if images is not None else None
        if lookup is not None:
            yield from self._bad_archives(lookup)
            counts = (len(lookup.files), len(lookup.members), len(lookup.archives))
            log.info("%s: %d loose images and %d in %d zips under %s", table, *counts, images)
        breaker = HostBreaker(disk_hint=images or table.parent)
        zipped: ArchiveOrder[RawItem] = ArchiveOrder()  # each zip in stored order: one read
        not_fetched = 0
        for row in checked_rows(chunks, table.as_posix(), self.name):
            if isinstance(row, SourceReject):
                yield row
                continue
            common = dict(source=self.name, source_ref=row.ref, **row.fields)
            found = lookup.find(row.image) if lookup is not None else None
            refused = lookup.refused.get(row.image) if lookup is not None else None
            if found is None and refused is not None:
                yield SourceReject(self.name, row.ref, *refused)
            elif isinstance(found, ZipMember):
                item = RawItem(**common, local_path=found.archive, member=found.member)
                zipped.add(found, item)
            elif found is not None:
                yield RawItem(**common, local_path=found)
            elif row.url is not None and self.fetch_urls:
                fetch = http_fetcher(row.url, breaker=breaker)
                yield RawItem(**common, fetch=fetch, raw_name=url_raw_name(row.image, row.url))
            else:
                not_fetched += row.url is not None
                yield self._missing(row, lookup)
        yield from zipped.items()
        if not_fetched:
            self.notes.append(url_hint(not_fetched))

    def _bad_archives(self, lookup: ImageLookup) -> Iterator[SourceReject]:
        for path, reason in lookup.bad_archives.items():
            self.errors.append(
                f"zip '{path}' cannot be read ({reason}): the images in it are rejected as "
                "missing_file, the other zips were read; replace it and ingest again"
            )
            yield SourceReject(self.name, path.as_posix(), CORRUPT, f"not a readable zip: {reason}")

    def _missing(self, row: ManifestRow, lookup: ImageLookup | None) -> SourceReject:
        if lookup is None:
            detail = f"no image on disk for id {row.image} and no URL to fetch"
        else:
            detail = lookup.missing_detail(row.image)
            if row.url is not None and not self.fetch_urls:
                detail += "; its URL is fetched only with --fetch-urls"
        return SourceReject(self.name, row.ref, MISSING_FILE, detail)


@register_source("osv5m", looks_like_osv5m, priority=10)
def create_osv5m_source(
    spec: str,
    images: str | None = None,
    split: str | None = None,
    fetch_urls: bool = False,
    **_: object,
) -> OSV5MSource:
    """An OSV-5M folder or table; `images` overrides the images folder, `split` picks one
    table of a folder (`train`), `fetch_urls` downloads `thumb_original_url` for ids with no
    image on disk."""
    return OSV5MSource(spec, images=images, split=split, fetch_urls=fetch_urls)
