"""Writing processed images into tar shards (ingest): one job's shards, appended and resumable.

The shard format, and every reader, is `geoloc.data.imagestore`; this module is the only writer.
A writer only appends; on a restart it cuts each shard back to what the journal (or manifest)
committed, so a killed-and-resumed ingest writes the very shards an uninterrupted one does. The
content a job stored is kept as digests (`_Members`), so equal content is stored once.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc.data.digests import DigestIndex, digests
from geoloc.data.imagestore import (
    BLOCK,
    END_OF_ARCHIVE,
    LOCATION_COLUMNS,
    Member,
    ShardError,
    member_name,
    padded,
    tar_header,
)
from geoloc.errors import DiskFullError, is_disk_full


class _Members:
    """sha256 -> `Member` of the content one job stored. The last `FOLD` in a dict, older ones
    folded into a `DigestIndex` (40 bytes a member instead of ~350 as Python objects: 10^6
    images would hold ~350 MB)."""

    FOLD = 65_536

    def __init__(self) -> None:
        self.recent: dict[str, Member] = {}
        self.folded = DigestIndex(values=np.empty((0, 3), np.int64))  # shard no., offset, length
        self.shards: dict[str, int] = {}

    def get(self, sha256: str) -> Member | None:
        if (m := self.recent.get(sha256)) is not None:
            return m
        shard, offset, length = self.folded.find(digests([sha256]))[0]
        if shard < 0:
            return None
        return Member(list(self.shards)[shard], member_name(sha256), int(offset), int(length))

    def add(self, sha256: str, member: Member) -> None:
        self.recent[sha256] = member
        if len(self.recent) >= self.FOLD:
            ids = [self.shards.setdefault(m.shard, len(self.shards)) for m in self.recent.values()]
            values = np.array([(i, m.offset, m.length) for i, m in zip(ids, self.recent.values(),
                                                                        strict=True)])  # fmt: skip
            self.folded.add(digests(self.recent), values.reshape(-1, 3))
            self.recent = {}


class ShardWriter:
    """Appends JPEGs to one job's shards `<prefix>-<seq>.tar` in `folder`, one at a time.

    `known` are the members this job already stored (its journal and the manifest): equal
    content is not stored twice, and on start every shard of the job is cut back to what they
    account for (bytes a killed ingest wrote after its last journal commit), so a resumed ingest
    writes the very bytes an uninterrupted one would. `commit` makes what was added durable
    (call it before journaling the rows); `close` ends the current shard's archive.
    A known member past the end of its shard (a shard cut after it was written) is a
    `ShardError`, unless `drop_lost`: then that content is simply stored again.
    """

    def __init__(self, folder: Path, prefix: str, max_bytes: int,
                 known: Iterable[Member] = (), *, drop_lost: bool = False) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_bytes = int(max_bytes)
        self.by_sha = _Members()
        self._fh: Any = None
        self._name = ""
        self._size = 0
        self._seq = -1
        self.folder.mkdir(parents=True, exist_ok=True)
        self._recover(list(known), drop_lost)

    def _shards(self) -> dict[int, Path]:
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d+)\.tar$")
        found = {}
        for path in self.folder.glob(f"{self.prefix}-*.tar"):
            match = pattern.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def _recover(self, known: list[Member], drop_lost: bool) -> None:
        shards = self._shards()
        sizes = {path.name: path.stat().st_size for path in shards.values()}
        ends: dict[str, int] = {}
        for m in known:
            if not m.shard.startswith(f"{self.prefix}-"):
                continue
            if m.end > sizes.get(m.shard, 0):
                if drop_lost:
                    continue
                raise ShardError(
                    f"shard '{self.folder / m.shard}' has {sizes.get(m.shard, 0)} bytes but its "
                    f"member {m.member} needs {m.end}: it was cut after it was written; "
                    "ingest again with --fresh to store the lost images anew"
                )
            ends[m.shard] = max(ends.get(m.shard, 0), m.end)
            sha = m.member.removesuffix(".jpg")
            if self.by_sha.get(sha) is None:
                self.by_sha.add(sha, m)
        live = [seq for seq, path in shards.items() if ends.get(path.name, 0) > 0]
        self._seq = max(live, default=-1)
        for seq, path in sorted(shards.items()):
            end = ends.get(path.name, 0)
            if end == 0:  # never committed: written after the last journal part
                path.unlink()
                continue
            if sizes[path.name] != end:
                os.truncate(path, end)
            if seq != self._seq:  # a finished shard ends its archive again
                with open(path, "ab") as fh:
                    fh.write(END_OF_ARCHIVE)
        if self._seq >= 0:
            self._name = f"{self.prefix}-{self._seq:05d}.tar"
            self._fh = open(self.folder / self._name, "r+b")  # noqa: SIM115 - closed in close()
            self._fh.seek(0, os.SEEK_END)
            self._size = self._fh.tell()

    def _roll(self) -> None:
        self._finish()
        self._seq += 1
        self._name = f"{self.prefix}-{self._seq:05d}.tar"
        self._fh = open(self.folder / self._name, "wb")  # noqa: SIM115 - closed in close()
        self._size = 0

    def _finish(self) -> None:
        if self._fh is not None:
            self._fh.write(END_OF_ARCHIVE)
            self.commit()
            self._fh.close()
            self._fh = None

    def add(self, sha256: str, data: bytes) -> Member:
        """Store `data` (whose sha256 is `sha256`) unless this job holds it already."""
        stored = self.by_sha.get(sha256)
        if stored is not None:
            return stored
        need = BLOCK + padded(len(data))
        if self._fh is None or (self._size and self._size + need > self.max_bytes):
            self._roll()
        name = member_name(sha256)
        try:
            self._fh.write(tar_header(name, len(data)) + data + bytes(-len(data) % BLOCK))
        except OSError as exc:
            self._raise_if_full(exc, need)
            raise
        member = Member(self._name, name, self._size + BLOCK, len(data))
        self._size += need
        self.by_sha.add(sha256, member)
        return member

    def commit(self) -> None:
        """Make every added member durable (before the journal says they exist)."""
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as exc:
                self._raise_if_full(exc)
                raise

    def _raise_if_full(self, exc: OSError, needed: int | None = None) -> None:
        """A full disk as one line naming the shard; other errors go on as they are."""
        if is_disk_full(exc):
            where = self.folder / self._name
            raise DiskFullError.writing(where, needed=needed, written=self._size) from exc

    def close(self) -> None:
        """End the current shard's archive (a later resume cuts the end marker off again)."""
        self._finish()

    def abort(self) -> None:
        """Close without ending the archive (after a failure; the next start cleans up)."""
        if self._fh is not None:
            # unflushed bytes on a full disk fail to close: the next start cuts them anyway
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


def members_of(frame: pd.DataFrame) -> list[Member]:
    """The stored members a journal or manifest frame records (rows with a shard)."""
    if frame.empty or not set(LOCATION_COLUMNS) <= set(frame.columns):
        return []
    part = frame.dropna(subset=["shard"])
    return [
        Member(str(s), str(m), int(o), int(n))
        for s, m, o, n in zip(
            part["shard"], part["member"], part["offset"], part["length"], strict=True
        )  # fmt: skip
    ]
