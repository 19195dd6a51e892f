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
import pickle
import stat
import tempfile
import zipfile
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Generic, TypeVar

import numpy as np

from geoloc.data.decode import Rejected
from geoloc.data.digests import DIGEST, DigestIndex, digest
from geoloc.data.rejects import (
    CORRUPT,
    DECOMPRESSION_BOMB,
    MISSING_FILE,
    NOT_REGULAR_FILE,
    PATH_ESCAPE,
)
from geoloc.errors import DiskFullError, is_disk_full

log = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_ARCHIVES = 4  # open zips kept per process (each holds its central directory in memory)
MAX_MEMBER_BYTES = 256 * 2**20  # a bigger "image" inside a zip is refused before it fills RAM


@dataclass(frozen=True)
class ZipMember:
    archive: Path
    member: str  # the member's name inside the archive
    order: int  # its position in the archive: reading in this order is sequential


class NameTable:
    """Image names -> integer columns saying where each lies, as a sorted digest array.

    A dict of 10^6 names to `Path` objects costs ~500 bytes a name; this keeps a 16-byte digest
    of the name (`geoloc.data.digests`: the digest stands for the name) and a few int32 columns,
    ~30 bytes. Names are appended, then `freeze` keeps one entry per name and sorts them for
    lookups through `DigestIndex`.
    """

    def __init__(self, width: int) -> None:
        self._keys = bytearray()  # 16 bytes a name, appended
        self._cols = [array("i") for _ in range(width)]
        self.index = DigestIndex(np.empty(0, DIGEST), np.empty((0, width), np.int32))

    def __len__(self) -> int:
        return len(self.index) + len(self._keys) // 16

    def add(self, name: str, *cols: int) -> None:
        self._keys += digest(name)
        for column, value in zip(self._cols, cols, strict=True):
            column.append(value)

    def column(self, i: int) -> np.ndarray:
        """Column `i` of the entries added and not frozen yet, in the order added."""
        return np.frombuffer(self._cols[i], np.int32)

    def freeze(self, priority: np.ndarray | None = None, taken: NameTable | None = None) -> int:
        """Keep the entry of lowest `priority` (default: the first added) of each name, and none
        whose name `taken` holds; returns how many entries were dropped as repeats. Each
        temporary is freed as soon as it is used: the peak is ~60 bytes a name."""
        keys = np.frombuffer(self._keys, DIGEST)
        ties = np.arange(len(keys)) if priority is None else priority
        order = np.lexsort((ties, keys))
        del ties, priority
        keys = keys[order]
        self._keys = bytearray()
        cols = np.empty((len(keys), len(self._cols)), np.int32)
        for i, column in enumerate(self._cols):
            cols[:, i] = np.frombuffer(column, np.int32)[order]
        self._cols = [array("i") for _ in self._cols]
        del order
        keep = np.ones(len(keys), bool)
        keep[1:] = keys[1:] != keys[:-1]
        if taken is not None:
            keep &= ~taken.index.contains(keys)
        dropped = int(len(keep) - keep.sum())
        if dropped:
            keys, cols = keys[keep], cols[keep]
        self.index = DigestIndex(keys, cols, presorted=True)
        return dropped

    def find(self, name: str) -> tuple[int, ...] | None:
        """The columns stored for `name`, None when it is not in the table."""
        at = self.index.position(digest(name))
        return None if at < 0 else tuple(self.index.values[at].tolist())


class _Codes:
    """Small integer codes for the few distinct values (folders, suffixes) names share."""

    def __init__(self) -> None:
        self.values: list = []
        self._codes: dict = {}

    def __call__(self, value: object) -> int:
        code = self._codes.get(value)
        if code is None:
            code = self._codes[value] = len(self.values)
            self.values.append(value)
        return code


@dataclass
class ImageLookup:
    """Where each image name (`<name>.<ext>` -> `name`) lies under `root`.

    Loose files win over zip members of the same name (cheaper to read); the first of equal
    names in sorted path order is kept and the others counted in `repeats`. `bad_archives`
    names the zips that could not be opened (truncated, not a zip) with the reason. The names
    are kept as `NameTable`s (~30 bytes an image), the folder walked one entry at a time.
    """

    root: Path
    suffixes: frozenset[str]
    files: NameTable = field(default_factory=lambda: NameTable(2))  # folder, suffix
    members: NameTable = field(default_factory=lambda: NameTable(3))  # place, suffix, order
    bad_archives: dict[Path, str] = field(default_factory=dict)
    archives: list[Path] = field(default_factory=list)
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)
    """name -> (reason, detail) of a file that is a link leading outside `root`
    (`path_escape`) or not a regular file (`not_regular_file`: a FIFO would block the read), or
    of a zip member that is hostile (see `_member_problem`)."""
    repeats: int = 0
    folders: list[Path] = field(default_factory=list)  # walked folders, in walk order
    _suffix: _Codes = field(default_factory=_Codes)
    _place: _Codes = field(default_factory=_Codes)  # (archive, text before, text after name)

    @classmethod
    def scan(cls, root: Path, suffixes: set[str] | frozenset[str]) -> ImageLookup:
        lookup = cls(Path(root), frozenset(s.lower() for s in suffixes))
        zips: list[tuple[int, str, Path]] = []
        refused: list[tuple[int, str, str, tuple[str, str]]] = []
        for folder, entry in _walk(str(lookup.root), lookup.folders):
            name = entry.name
            if name.startswith("."):
                continue
            stem, suffix = os.path.splitext(name)
            is_zip = name.lower().endswith(".zip")
            if not is_zip and suffix.lower() not in lookup.suffixes:
                continue
            if not _plain_file(entry) and (problem := lookup._problem(Path(entry.path))):
                refused.append((folder, name, stem, problem))
            elif is_zip:
                zips.append((folder, name, Path(entry.path)))
            else:
                lookup.files.add(stem, folder, lookup._suffix(suffix))
        for _, _, stem, problem in sorted(refused):  # the first in sorted path order
            lookup.refused.setdefault(stem, problem)
        lookup.repeats += lookup.files.freeze(priority=lookup._path_order())
        for _, _, path in sorted(zips):
            lookup._add_archive(path)
        lookup.repeats += lookup.members.freeze(taken=lookup.files)
        return lookup

    def _path_order(self) -> np.ndarray:
        """Each file's rank among equal names in sorted path order: folders in walk order, then
        the suffix (names `stem + suffix` of one stem sort as their suffixes do)."""
        values = self._suffix.values
        rank = np.empty(len(values), np.int64)
        rank[sorted(range(len(values)), key=values.__getitem__)] = np.arange(len(values))
        folder = self.files.column(0).astype(np.int64)
        return folder * max(len(values), 1) + rank[self.files.column(1)]

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

    def _add_archive(self, path: Path) -> None:
        index = len(self.archives)
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
            else:  # later repeats of a name (or of a loose file's) are dropped by `freeze`
                at = info.filename.rfind(name)
                place = (index, info.filename[:at], info.filename[at + len(name) :])
                self.members.add(stem, self._place(place), self._suffix(suffix), order)

    def find(self, name: str) -> Path | ZipMember | None:
        """The loose file or zip member named `name` (see `refused` for refused ones)."""
        if (file := self.files.find(name)) is not None:
            folder, suffix = file
            return self.folders[folder] / (name + self._suffix.values[suffix])
        if (member := self.members.find(name)) is not None:
            place, suffix, order = member
            archive, before, after = self._place.values[place]
            inner = before + name + self._suffix.values[suffix] + after
            return ZipMember(self.archives[archive], inner, order)
        return None

    def missing_detail(self, name: str) -> str:
        """Why `name` is not found: where it was looked for, and which zips were unreadable."""
        detail = f"no {name}.jpg (or other image type) under {self.root}"
        if self.bad_archives:
            bad = ", ".join(p.name for p in self.bad_archives)
            detail += f"; unreadable zip(s) there, it may be inside: {bad}"
        return detail


def _walk(root: str, folders: list[Path]) -> Iterator[tuple[int, os.DirEntry]]:
    """Each non-folder entry under `root` with the index of its folder in `folders`, which it
    fills: folders in `os.walk`'s order (sorted, top-down, hidden ones and links to folders not
    entered), their entries as `scandir` gives them, one at a time (a folder of 10^6 images is
    never held as a list of names)."""
    stack = [root]
    while stack:
        top = stack.pop()
        index = len(folders)
        folders.append(Path(top))
        subfolders: list[str] = []
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        yield index, entry
                    elif not entry.name.startswith("."):
                        subfolders.append(entry.name)
        except OSError:  # unreadable folder: skipped, as os.walk does
            pass
        for name in sorted(subfolders, reverse=True):
            path = os.path.join(top, name)
            if not os.path.islink(path):
                stack.append(path)


def _plain_file(entry: os.DirEntry) -> bool:
    """Whether `entry` is a regular file and no link, from the folder listing alone (such a file
    under a folder walked without following links lies inside the root: nothing to resolve)."""
    try:
        return not entry.is_symlink() and entry.is_file(follow_symlinks=False)
    except OSError:
        return False


class ArchiveOrder(Generic[T]):
    """Items put aside to be handed out archive by archive (in path order), each archive's in
    its members' stored order, so a worker reads one zip sequentially.

    Held on disk, not in memory: one pickle stream per archive in a temporary folder (under
    `TMPDIR`), at most `BUFFER` items in memory; handing out loads one archive's items at a
    time. An OSV-5M item with its attributes is ~1.5 KB as Python objects: the 5x10^6 zipped
    images of OSV-5M would hold ~7 GB. Items of equal archive and order keep the order added.
    """

    BUFFER = 16_384

    def __init__(self) -> None:
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._files: dict[Path, Path] = {}  # archive -> its pickle stream
        self._buffered: dict[Path, list[tuple[int, T]]] = {}
        self._count = 0

    def add(self, member: ZipMember, item: T) -> None:
        self._buffered.setdefault(member.archive, []).append((member.order, item))
        self._count += 1
        if self._count >= self.BUFFER:
            self._flush()

    def _flush(self) -> None:
        path = Path(tempfile.gettempdir()) / "geoloc-zipped-*"
        try:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="geoloc-zipped-")
            for archive, pairs in self._buffered.items():
                path = self._files.setdefault(
                    archive, Path(self._folder.name) / str(len(self._files))
                )
                with open(path, "ab") as fh:
                    pickle.dump(pairs, fh, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as exc:
            if self._folder is not None:
                self._folder.cleanup()
            if is_disk_full(exc):  # one line naming TMPDIR's folder, not a traceback
                raise DiskFullError.writing(path) from exc
            raise
        self._buffered, self._count = {}, 0

    def items(self) -> Iterator[T]:
        """Every item added, archive by archive; the temporary folder is removed at the end."""
        try:
            if self._folder is not None:
                self._flush()
            for archive in sorted(self._files.keys() | self._buffered.keys(), key=str):
                pairs = self._load(archive) + self._buffered.pop(archive, [])
                pairs.sort(key=lambda pair: pair[0])  # stable: equal orders keep table order
                yield from (item for _, item in pairs)
        finally:
            if self._folder is not None:
                self._folder.cleanup()
            self._folder, self._files, self._buffered = None, {}, {}

    def _load(self, archive: Path) -> list[tuple[int, T]]:
        pairs: list[tuple[int, T]] = []
        if archive in self._files:
            with open(self._files[archive], "rb") as fh:
                while True:
                    try:
                        pairs += pickle.load(fh)  # our own temporary file
                    except EOFError:
                        break
        return pairs


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
