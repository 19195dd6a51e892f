"""The `mp16` source: MP-16 / YFCC / im2gps3k metadata tables as they are published.

`IMG_ID` is the image's path relative to the images folder (`a4/b1/123.jpg` in MP-16, a plain
file name in im2gps3k), `LAT`/`LON` its position; the places365 tables' `country_code`,
`region` and `city` ride along into the index. The images folder is the `images` option, else
the one beside the table where the first ids are found: the table's own folder, `images/`, or
another sub-folder (`im2gps3ktest/`). Everything else is the manifest source's: a missing file
is a `missing_file` reject, `../` a `path_escape`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from geoloc.data.sources import register_source
from geoloc.data.sources.manifest import (
    MANIFEST_SUFFIXES,
    ManifestSource,
    has_columns,
    table_columns,
)
from geoloc.errors import DataError

log = logging.getLogger(__name__)

REQUIRED = ("IMG_ID", "LAT", "LON")
PROBE_ROWS = 50  # ids tried per candidate folder when guessing where the images are


def is_mp16_table(path: Path) -> bool:
    """Whether `path` is a CSV/Parquet table with MP-16's `IMG_ID`, `LAT`, `LON` columns."""
    if not path.name.lower().endswith(MANIFEST_SUFFIXES) or not path.is_file():
        return False
    return has_columns(table_columns(path), *REQUIRED)


def looks_like_mp16(spec: str) -> bool:
    if "://" in spec or spec.startswith(("mapillary:", "demo:")):
        return False
    try:
        return is_mp16_table(Path(spec))
    except OSError:
        return False


def guess_images_root(folder: Path, image_paths: list[str]) -> Path:
    """The folder beside a table under which most of `image_paths` exist (ties: the first of
    the table's folder, `images/`, other sub-folders in name order)."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    candidates = [folder] + sorted(subfolders, key=lambda p: (p.name != "images", p.name))

    def hits(root: Path) -> int:
        return sum((root / rel).is_file() for rel in image_paths)

    best = max(candidates, key=hits)  # max keeps the first of equal counts
    return best if hits(best) else folder


class MP16Source(ManifestSource):
    """An MP-16-style table; the manifest source with MP-16's images folder found for it."""

    name = "mp16"

    def __init__(self, path: Path, images: Path | None = None, fetch_urls: bool = False) -> None:
        if path.is_file() and not is_mp16_table(path):
            found = ", ".join(table_columns(path)) or "no columns"
            raise DataError(
                f"'{path}' is not an MP-16 table: expected columns {', '.join(REQUIRED)}, "
                f"found {found}"
            )
        super().__init__(path, base_dir=images, fetch_urls=fetch_urls)
        if images is None:
            ids = self.table["image"].dropna().head(PROBE_ROWS)
            probes = [str(v).lstrip("/") for v in ids if not pd.isna(v)]
            self.base_dir = guess_images_root(self.path.parent, probes)
            self.breaker.disk_hint = self.base_dir
        if self.base_dir != self.path.parent:
            log.info("%s: images are looked up under %s", self.path, self.base_dir)


@register_source("mp16", looks_like_mp16, priority=10)
def create_mp16_source(
    spec: str,
    images: str | None = None,
    base_dir: str | None = None,
    fetch_urls: bool = False,
    **_: object,
) -> MP16Source:
    """An MP-16 / YFCC / im2gps3k table; `images` (or `base_dir`) is the images folder."""
    folder = images or base_dir
    if folder is not None and not Path(folder).is_dir():
        raise DataError(f"images folder '{folder}' does not exist")
    return MP16Source(Path(spec), Path(folder) if folder else None, fetch_urls)
