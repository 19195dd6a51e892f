"""Images on disk as loose files or zip members, found by name and read in place.

Published datasets ship images as `<id>.jpg` somewhere under a folder, often packed in zip
shards (OSV-5M: `images/train/00.zip`, `01.zip`, ...). `ImageLookup` walks such a folder once,
opening each zip once to map the image names it holds (by file name without extension) to
members; nothing is extracted. Ingest workers then read a member's bytes with `read_bytes`
through a small per-process cache of open archives, so reading a zip's members in their stored
order costs one open per archive and worker.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from geoloc.data.decode import Rejected
from geoloc.data.rejects import (
    CORRUPT,
    DECOMPRESSION_BOMB,
    MISSING_FILE,
    NOT_REGULAR_FILE,
    PATH_ESCAPE,
)

log = logging.getLogger(__name__)

OPEN_ARCHIVES = 4  # open zips kept per process (each holds its central directory in memory)
MAX_MEMBER_BYTES = 256 * 2**20  # a bigger "image" inside a zip is refused before it fills RAM


@dataclass(frozen=True)
class ZipMember:
    archive: Path
    member: str  # the member's name inside the archive
    order: int  # its position in the archive: reading in this order is sequential


@dataclass
class ImageLookup:
    """Where each image name (`<name>.<ext>` -> `name`) lies under `root`.

    Loose files win over zip members of the same name (cheaper to read); the first of equal
    names in sorted path order is kept and the others counted in `repeats`. `bad_archives`
    names the zips that could not be opened (truncated, not a zip) with the reason.
    """

    root: Path
    suffixes: frozenset[str]
    files: dict[str, Path] = field(default_factory=dict)
    members: dict[str, ZipMember] = field(default_factory=dict)
    bad_archives: dict[Path, str] = field(default_factory=dict)
    archives: list[Path] = field(default_factory=list)
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)
    """name -> (reason, detail) of a file that is a link leading outside `root`
    (`path_escape`) or not a regular file (`not_regular_file`: a FIFO would block the read), or
    of a zip member that is hostile (see `_member_problem`)."""
    repeats: int = 0

    @classmethod
    def scan(cls, root: Path, suffixes: set[str] | frozenset[str]) -> ImageLookup:
        lookup = cls(Path(root), frozenset(s.lower() for s in suffixes))
        zips: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(lookup.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                is_zip = name.lower().endswith(".zip")
                if not is_zip and os.path.splitext(name)[1].lower() not in lookup.suffixes:
                    continue
                if (problem := lookup._problem(path)) is not None:
                    lookup.refused.setdefault(os.path.splitext(name)[0], problem)
                elif is_zip:
                    zips.append(path)
                else:
                    lookup._add_file(path)
        for path in zips:
            lookup._add_archive(path)
        return lookup

    def _problem(self, path: Path) -> tuple[str, str] | None:
        """Why `path` cannot be read as part of this dataset: its real path (links resolved)
        lies outside `root`, or it is not a regular file; None when it can."""
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            return PATH_ESCAPE, f"'{path}' links outside the dataset folder {self.root}"
        try:
            mode = os.stat(real).st_mode
        except OSError as exc:
            return MISSING_FILE, f"'{path}' cannot be read: {exc.strerror}"
        if not stat.S_ISREG(mode):
            return NOT_REGULAR_FILE, f"'{path}' is not a regular file (a pipe, socket or device)"
        return None

    def _add_file(self, path: Path) -> None:
        stem = os.path.splitext(path.name)[0]
        if stem in self.files:
            self.repeats += 1
        else:
            self.files[stem] = path

    def _add_archive(self, path: Path) -> None:
        self.archives.append(path)
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            self.bad_archives[path] = f"{type(exc).__name__}: {exc}"
            log.error("zip %s cannot be read (%s): its images are missing", path, exc)
            return
        for order, info in enumerate(infos):
            name = PurePosixPath(info.filename).name
            if info.is_dir() or name.startswith(".") or "__MACOSX/" in info.filename:
                continue
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in self.suffixes:
                continue
            if (problem := _member_problem(info)) is not None:
                reason, why = problem
                self.refused.setdefault(stem, (reason, f"member '{info.filename}' of {path} {why}"))
            elif stem in self.files or stem in self.members:
                self.repeats += 1
            else:
                self.members[stem] = ZipMember(path, info.filename, order)

    def find(self, name: str) -> Path | ZipMember | None:
        """The loose file or zip member named `name` (see `refused` for refused ones)."""
        return self.files.get(name) or self.members.get(name)

    def missing_detail(self, name: str) -> str:
        """Why `name` is not found: where it was looked for, and which zips were unreadable."""
        detail = f"no {name}.jpg (or other image type) under {self.root}"
        if self.bad_archives:
            bad = ", ".join(p.name for p in self.bad_archives)
            detail += f"; unreadable zip(s) there, it may be inside: {bad}"
        return detail


def _member_problem(info: zipfile.ZipInfo) -> tuple[str, str] | None:
    """Why a zip member is not read as an image, from its central-directory entry alone: a name
    that leads out of the archive (`../`, absolute; an unzip tool would write it elsewhere), a
    symbolic link or other non-regular entry (its "bytes" are a link target or nothing), or a
    declared size no photo has (a decompression bomb); None when it may be read."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or ".." in PurePosixPath(name).parts or name[1:2] == ":":
        return PATH_ESCAPE, "has a name leading out of the archive"
    kind = stat.S_IFMT(info.external_attr >> 16)  # unix mode; 0 when the tool stored none
    if kind == stat.S_IFLNK:
        return NOT_REGULAR_FILE, "is a symbolic link entry"
    if kind and kind != stat.S_IFREG:
        return NOT_REGULAR_FILE, f"is not a regular file (mode {oct(kind)})"
    if info.file_size > MAX_MEMBER_BYTES:
        return DECOMPRESSION_BOMB, f"declares {info.file_size} bytes unpacked"
    return None


# -------------------------------------------------------------------------------------------
# reading (in ingest worker processes)
# -------------------------------------------------------------------------------------------

_open: OrderedDict[tuple[str, int, int], zipfile.ZipFile] = OrderedDict()
_owner_pid: int | None = None


def _archive(path: str) -> zipfile.ZipFile:
    """An open `ZipFile` for `path` from this process's cache (reopened when the file changed).

    A forked worker forgets its parent's handles: they share a file offset with the parent.
    """
    global _owner_pid
    if _owner_pid != os.getpid():
        _open.clear()
        _owner_pid = os.getpid()
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key in _open:
        _open.move_to_end(key)
        return _open[key]
    zf = zipfile.ZipFile(path)
    _open[key] = zf
    while len(_open) > OPEN_ARCHIVES:
        _open.popitem(last=False)[1].close()
    return zf


def read_bytes(path: str | Path, member: str | None = None) -> bytes:
    """The bytes of a file, or of `member` inside the zip at `path`.

    A missing or unreadable file raises `OSError` (as `Path.read_bytes`); a zip or member that
    cannot be read raises `Rejected` naming both.
    """
    if member is None:
        return Path(path).read_bytes()
    where = f"{member} in {path}"
    try:
        zf = _archive(str(path))
        info = zf.getinfo(member)
        if info.file_size > MAX_MEMBER_BYTES:
            raise Rejected(DECOMPRESSION_BOMB, f"{where}: {info.file_size} bytes unpacked")
        with zf.open(info) as fh:
            data = fh.read(MAX_MEMBER_BYTES + 1)
    except KeyError:
        raise Rejected(MISSING_FILE, f"{where}: no such member (the zip changed?)") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError,
            ValueError) as exc:  # fmt: skip
        raise Rejected(CORRUPT, f"{where}: {type(exc).__name__}: {exc}") from exc
    if len(data) > MAX_MEMBER_BYTES:
        raise Rejected(DECOMPRESSION_BOMB, f"{where}: more than {MAX_MEMBER_BYTES} bytes unpacked")
    return data
