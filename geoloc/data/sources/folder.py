"""The `folder` source: a directory tree of images whose GPS position is in EXIF.

The `demo` source is the same reader over `data/raw/demo/` (spec `demo` or `demo:<folder>`),
labelled `demo` in the manifest so demo images stay recognisable downstream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from geoloc.data.rejects import MISSING_FILE, NOT_IMAGE, NOT_REGULAR_FILE, PATH_ESCAPE
from geoloc.data.sources import RawItem, SourceReject, register_source
from geoloc.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
_NOT_FOLDER_PREFIXES = ("s3://", "http://", "https://", "mapillary:", "demo:")
_MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".csv.gz")


class FolderSource:
    """Every non-hidden file below `root` (sorted); non-image extensions are refused early.

    Nothing listed is dropped without a record: a dangling symlink is a `missing_file` reject, a
    symlink (to a file or a whole folder) leading outside `root` a `path_escape` one.
    """

    def __init__(self, root: Path, name: str = "folder", ref_prefix: str | None = None) -> None:
        self.name = name
        self.root = Path(root)
        # source_ref = <prefix>/<relative path>; the folder as given keeps refs of two
        # different folders apart in the manifest
        self.ref_prefix = ref_prefix if ref_prefix is not None else self.root.as_posix()
        if not self.root.exists():
            raise DataError(f"folder '{root}' does not exist")
        if not self.root.is_dir():
            raise DataError(f"'{root}' is not a folder")
        self._real_root = self.root.resolve()

    def items(self) -> Iterator[RawItem | SourceReject]:
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            ref = f"{self.ref_prefix.rstrip('/')}/{rel.as_posix()}"
            if path.is_dir() and (not path.is_symlink() or self._inside(path)):
                continue  # its files are listed one by one (a link inside: under the real path)
            problem = self._problem(path)
            if problem is not None:
                yield SourceReject(self.name, ref, *problem)
            else:
                yield RawItem(source=self.name, source_ref=ref, local_path=path)

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve(strict=True).is_relative_to(self._real_root)
        except (OSError, RuntimeError):  # dangling or looping link
            return False

    def _problem(self, path: Path) -> tuple[str, str] | None:
        """(reason, detail) for a listed path that cannot be an image of this folder."""
        if path.is_symlink() and not path.exists():
            target = os.readlink(path)
            return MISSING_FILE, f"symlink to '{target}' leads nowhere (missing or a loop)"
        if not self._inside(path):
            kind = "a folder" if path.is_dir() else "a file"
            return PATH_ESCAPE, f"links to {kind} outside '{self.root}'"
        if not path.is_file():
            return NOT_REGULAR_FILE, "not a regular file (a pipe, socket or device)"
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return NOT_IMAGE, f"extension '{path.suffix or '(none)'}' is not an image type"
        return None


def _is_folder_spec(spec: str) -> bool:
    low = spec.lower()
    return (
        not low.startswith(_NOT_FOLDER_PREFIXES)
        and not low.endswith(_MANIFEST_SUFFIXES)
        and spec != "demo"
    )


@register_source("demo", lambda spec: spec == "demo" or spec.startswith("demo:"))
def create_demo_source(spec: str, **_: object) -> FolderSource:
    """`demo` -> `$GEOLOC_DATA_DIR/raw/demo`; `demo:<folder>` -> that folder."""
    from geoloc.paths import DataPaths

    folder = spec.partition(":")[2] or str(DataPaths.default().demo)
    if not Path(folder).is_dir():
        raise DataError(f"demo folder '{folder}' does not exist: run `geoloc data demo` first")
    return FolderSource(Path(folder), name="demo", ref_prefix="raw/demo")


@register_source("folder", _is_folder_spec)
def create_folder_source(spec: str, **_: object) -> FolderSource:
    return FolderSource(Path(spec))
