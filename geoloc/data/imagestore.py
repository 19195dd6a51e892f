"""Processed images in tar shards: the format, and how every reader gets them back.

A shard is a plain, WebDataset-style tar (`data/processed/shards/<job>-<seq>.tar`, about
`IndexConfig.shard_size_mb` each) whose members are the cleaned JPEGs named by their content,
`<sha256>.jpg`. Why tar and not Parquet with an image column (`benchmarks/bench_shard_format.py`,
docs/data.md): a tar can be appended to and cut back, so an interrupted ingest resumes by
truncating the shard to what its journal committed; a random read is one `pread` at the offset
the manifest records; a sequential pass is a few large range reads, locally or from S3; and any
`tar` tool can list or extract it.

Each image's place is recorded in the manifest (and so in `images.parquet`): `shard` (file name),
`member`, `offset` (of the member's data in the file) and `length`; `path` is the shard file
relative to the data root. Rows without a shard (indexes built from one file per image) name
their file in `path`; readers handle both.

The one writer (`geoloc.data.shardwriter.ShardWriter`, ingest) never rewrites committed bytes: a
shard only grows, and is cut back only to what a journal or manifest already recorded. Readers
check each member's bytes against its name (the sha256), so a shard cut short or damaged is an
error naming the shard and the member, and the other shards read on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc.errors import DataError

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
"""Shards live in `data/processed/shards/` and, in a pushed index, under `<prefix>/shards/`."""
BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
SPAN_BYTES = 16 << 20
"""A sequential read fetches at most this many bytes at once (one pread or one S3 range GET)."""
GAP_BYTES = 1 << 20
"""Members closer than this in a shard are fetched by the same read (skipped bytes are cheaper
than another request)."""
LOCATION_COLUMNS = ("shard", "member", "offset", "length")
_SHA_NAME = re.compile(r"^([0-9a-f]{64})\.jpg$")


class ShardError(DataError):
    """A shard is missing, cut short, or holds bytes that are not what was stored."""


@dataclass(frozen=True)
class Member:
    """One stored image: member `member` of shard file `shard`, `length` bytes at `offset`."""

    shard: str
    member: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        """Where the member's padded data ends: the shard is complete up to here."""
        return self.offset + padded(self.length)


def padded(n: int) -> int:
    return n + (-n % BLOCK)


def member_name(sha256: str) -> str:
    return f"{sha256}.jpg"


def shard_relpath(name: str) -> str:
    """A shard's `path` in the manifest: relative to the data root."""
    return f"processed/{SHARDS_DIR}/{name}"


def tar_header(name: str, length: int) -> bytes:
    """The 512-byte ustar header of a member (no time, owner or mode noise: same bytes, same
    shard)."""
    info = tarfile.TarInfo(name)
    info.size = length
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _Files:
    """Open shard files of this process (reopened after a fork: workers own their handles)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}

    def pread(self, path: Path, start: int, length: int) -> bytes:
        if self._pid != os.getpid():
            self._pid, self._fds = os.getpid(), {}
        key = os.fspath(path)
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise ShardError(f"shard '{path}' is missing") from None
            except OSError as exc:
                raise ShardError(f"shard '{path}' cannot be opened: {exc}") from None
            if len(self._fds) >= 64:  # bounded: one pass reads shards one after another
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[key] = fd
        return os.pread(fd, length, start)


class _S3Shards:
    """Range reads of shards under a pushed index (`s3://bucket/prefix/shards/<name>`)."""

    def __init__(self, url: str) -> None:
        from geoloc.storage import s3

        self.url = s3.parse_s3_url(url)
        self._pid = -1
        self._client: Any = None

    def where(self, shard: str) -> str:
        return f"s3://{self.url.bucket}/{self.url.key(f'{SHARDS_DIR}/{shard}')}"

    def read(self, shard: str, start: int, length: int) -> bytes:
        from geoloc.storage import s3

        if self._pid != os.getpid():  # one client per process: boto3 clients do not fork
            self._pid, self._client = os.getpid(), s3.create_client()
        key = self.url.key(f"{SHARDS_DIR}/{shard}")
        try:
            return s3.get_range(self._client, self.url.bucket, key, start, length)
        except s3.ObjectMissingError:
            raise ShardError(f"shard '{self.where(shard)}' is missing") from None
        except s3.StorageError as exc:
            raise ShardError(f"shard '{self.where(shard)}' could not be read: {exc}") from None


def content_file_order(table: pd.DataFrame, codes: np.ndarray, names: list[str]) -> np.ndarray:
    """A rank per file (`names`, indexed by `codes`) that follows content, not names.

    Shards of one ingest job keep their sequence; jobs are ordered by the digest of their first
    image (the job's id carries its source's path when that lies outside the data root, and
    would otherwise order the same photos differently in two data folders); loose files come
    last, by their path relative to the data root. Storage order, and so a streamed split's
    plan, is then the same wherever the same photos were ingested.
    """
    identity = np.arange(len(names))
    if "shard" not in table.columns or "sha256" not in table.columns or not len(table):
        return identity
    is_member = table["shard"].notna().to_numpy()
    rows = pd.DataFrame({"code": codes[is_member],
                         "offset": table["offset"].to_numpy()[is_member],
                         "sha256": table["sha256"].astype(str).to_numpy()[is_member]})  # fmt: skip
    first = rows.sort_values(["code", "offset"]).drop_duplicates("code").set_index("code")
    keys: list[tuple[Any, ...]] = []
    jobs: dict[str, tuple[int, str]] = {}  # job -> (lowest seq, its first image's digest)
    parsed: dict[int, tuple[str, int]] = {}
    for code in first.index:
        job, _, seq = Path(names[code]).stem.rpartition("-")
        parsed[code] = (job, int(seq) if seq.isdigit() else 0)
        seen = jobs.get(job)
        if seen is None or parsed[code][1] < seen[0]:
            jobs[job] = (parsed[code][1], str(first.at[code, "sha256"]))
    for code, name in enumerate(names):
        if code in parsed:
            job, seq = parsed[code]
            keys.append((0, jobs[job][1], job, seq, name))
        else:
            keys.append((1, "", "", 0, name))
    order = sorted(identity, key=lambda c: keys[c])
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = identity
    return rank


class ImageLocations:
    """Where the image of each row of an index table is, and how to read it.

    `shards_url` (an `s3://bucket/prefix` that `geoloc s3 push --index` wrote) reads shards from
    object storage instead of `data_root/processed/shards/`. Loose files (rows without a shard)
    are always read below `data_root`. Per-row data is kept in numpy arrays without Python
    objects (file codes, offsets, lengths, member digests), so loader workers forked from the
    main process share it instead of copying it page by page (10^6 rows: ~60 MB).
    """

    def __init__(self, table: pd.DataFrame, data_root: Path, shards_url: str | None = None):
        self.data_root = Path(data_root)
        n = len(table)
        codes, names = pd.factorize(table["path"].astype(str), sort=True)
        rank = content_file_order(table, codes, [str(name) for name in names])
        self.codes = rank[codes].astype(np.int32)  # (N,) file of each row, in content order
        self.files = [str(name) for _, name in sorted(zip(rank, names, strict=True))]
        self.shard_of_file: list[str | None] = [None] * len(self.files)
        self.offsets = np.full(n, -1, dtype=np.int64)
        self.lengths = np.full(n, -1, dtype=np.int64)
        self.is_member = np.zeros(n, dtype=bool)
        self.digests = np.zeros((n, 32), dtype=np.uint8)  # sha256 a `<sha256>.jpg` member names
        self._names: dict[int, str] = {}  # members not named by their content (rare)
        if "shard" in table.columns:
            self._read_members(table)
        self.s3 = _S3Shards(shards_url) if shards_url else None
        self._files = _Files()

    def _read_members(self, table: pd.DataFrame) -> None:
        shard = table["shard"]
        self.is_member = shard.notna().to_numpy()
        rows = np.flatnonzero(self.is_member)
        self.offsets[rows] = table["offset"].to_numpy()[rows].astype(np.int64)
        self.lengths[rows] = table["length"].to_numpy()[rows].astype(np.int64)
        files, first = np.unique(self.codes[rows], return_index=True)
        for code, name in zip(files, shard.to_numpy()[rows[first]], strict=True):
            self.shard_of_file[int(code)] = str(name)
        members = table["member"].astype(str).to_numpy()[rows]
        named = pd.Series(members).str.fullmatch(_SHA_NAME.pattern).to_numpy()
        if named.any():
            raw = bytes.fromhex("".join(m[:64] for m in members[named]))
            self.digests[rows[named]] = np.frombuffer(raw, np.uint8).reshape(-1, 32)
        self._names = {int(r): str(m) for r, m in zip(rows[~named], members[~named], strict=True)}

    def __len__(self) -> int:
        return len(self.codes)

    def sharded(self, i: int) -> bool:
        return bool(self.is_member[i])

    def path(self, i: int) -> str:
        """Row `i`'s file (its shard, or its own image) relative to the data root."""
        return self.files[self.codes[i]]

    def member(self, i: int) -> str | None:
        """Row `i`'s member name in its shard (None for a file of its own)."""
        if not self.is_member[i]:
            return None
        return self._names.get(int(i)) or f"{self.digests[i].tobytes().hex()}.jpg"

    def shard_where(self, i: int) -> str:
        """The shard of row `i` as a user finds it (a local path or an s3:// URL)."""
        if self.s3 is not None:
            return self.s3.where(str(self.shard_of_file[self.codes[i]]))
        return os.fspath(self.data_root / self.path(i))

    def describe(self, i: int) -> str:
        """`member M of shard S` or `image 'file'`: what an error about row `i` names."""
        if self.sharded(i):
            return f"member {self.member(i)} of shard '{self.shard_where(i)}'"
        return f"image '{self.data_root / self.path(i)}'"

    def file(self, i: int) -> Path | None:
        """The file of a row stored on its own (None for shard members)."""
        return None if self.sharded(i) else self.data_root / self.path(i)

    def _read(self, i: int, start: int, length: int) -> bytes:
        if self.s3 is not None:
            return self.s3.read(str(self.shard_of_file[self.codes[i]]), start, length)
        return self._files.pread(self.data_root / self.path(i), start, length)

    def read(self, i: int) -> bytes:
        """The stored bytes of row `i`; `ShardError` naming the shard and member if unusable."""
        if not self.sharded(i):
            return (self.data_root / self.path(i)).read_bytes()
        data = self._read(i, int(self.offsets[i]), int(self.lengths[i]))
        return self._checked(i, data)

    def _checked(self, i: int, data: bytes) -> bytes:
        if len(data) < self.lengths[i]:
            raise ShardError(
                f"{self.describe(i)}: the shard is cut short (the member needs bytes "
                f"{self.offsets[i]}-{self.offsets[i] + self.lengths[i]}, got {len(data)} of "
                f"{self.lengths[i]})"
            )
        if int(i) not in self._names and hashlib.sha256(data).digest() != self.digests[i].tobytes():
            raise ShardError(f"{self.describe(i)}: bytes do not match the member's sha256 "
                             "(corrupt shard)")  # fmt: skip
        return data

    def storage_order(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """`rows` (default: all) sorted as they lie in storage: by shard file, then offset."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        order = np.lexsort((self.offsets[rows], self.codes[rows]))
        return rows[order]

    def iter_bytes(
        self, rows: Sequence[int] | np.ndarray
    ) -> Iterator[tuple[int, bytes | ShardError]]:
        """`(row, bytes)` for `rows` in the order given, read sequentially: runs of members that
        lie close together in one shard come from one read of up to `SPAN_BYTES`. An unusable
        member yields its `ShardError` instead of bytes (the rows after it still come)."""
        rows = np.asarray(rows, dtype=np.int64)  # kept as an array: 10^6 rows, not 10^6 ints
        i = 0
        while i < len(rows):
            j = self._run_end(rows, i)
            yield from self._read_run([int(r) for r in rows[i:j]])
            i = j

    def _run_end(self, rows: np.ndarray, i: int) -> int:
        first = int(rows[i])
        if not self.sharded(first):
            return i + 1
        j, end = i + 1, self.offsets[first] + self.lengths[first]
        while j < len(rows):
            r = int(rows[j])
            off = self.offsets[r]
            if (self.codes[r] != self.codes[first] or not self.sharded(r) or off < end
                    or off - end > GAP_BYTES
                    or off + self.lengths[r] - self.offsets[first] > SPAN_BYTES):  # fmt: skip
                break
            end = off + self.lengths[r]
            j += 1
        return j

    def _read_run(self, run: list[int]) -> Iterator[tuple[int, bytes | ShardError]]:
        first = run[0]
        try:
            if len(run) == 1:
                yield first, self.read(first)
                return
            start = int(self.offsets[first])
            last = run[-1]
            blob = self._read(first, start, int(self.offsets[last] + self.lengths[last]) - start)
        except (ShardError, OSError) as exc:  # the shard is gone or unreadable: every member
            for r in run:
                yield r, ShardError(f"{self.describe(r)}: {exc}")
            return
        for r in run:
            lo = int(self.offsets[r]) - start
            try:
                yield r, self._checked(r, blob[lo : lo + int(self.lengths[r])])
            except ShardError as exc:
                yield r, exc


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def shard_problems(table: pd.DataFrame, data_root: Path) -> list[str]:
    """One line per shard a table's rows need that is missing or shorter than its members
    need (a cheap `stat` per shard; member bytes are checked when they are read)."""
    if "shard" not in table.columns:
        return []
    part = table.dropna(subset=["shard"])
    need = (part["offset"] + part["length"]).groupby(part["path"]).agg(["max", "size"])
    return _problems({str(k): (int(e), int(c)) for k, (e, c) in need.iterrows()}, data_root)


def manifest_shard_problems(parquet: Path, data_root: Path) -> list[str]:
    """`shard_problems` of a manifest or images.parquet, read a row group at a time (memory
    flat in N: one entry per shard)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(parquet)
    if "shard" not in pf.schema_arrow.names:
        return []
    need: dict[str, tuple[int, int]] = {}
    for batch in pf.iter_batches(columns=["path", "shard", "offset", "length"]):
        frame = batch.to_pandas().dropna(subset=["shard"])
        ends = (frame["offset"] + frame["length"]).groupby(frame["path"]).agg(["max", "size"])
        for rel, (end, count) in ends.iterrows():
            old_end, old_count = need.get(str(rel), (0, 0))
            need[str(rel)] = (max(old_end, int(end)), old_count + int(count))
    return _problems(need, data_root)


def _problems(need: dict[str, tuple[int, int]], data_root: Path) -> list[str]:
    problems = []
    for rel, (end, count) in sorted(need.items()):
        path = Path(data_root) / str(rel)
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            problems.append(f"shard '{path}' is missing ({count} images)")
        elif size < end:
            problems.append(
                f"shard '{path}' is cut short: {size} bytes, its {count} images need {end}"
            )
    return problems


def index_shards(images_parquet: Path) -> list[str]:
    """The shard files an index's images.parquet reads from (none for one-file-per-image data)."""
    import pyarrow.parquet as pq

    try:
        if "shard" not in pq.read_schema(images_parquet).names:
            return []
        column = pq.read_table(images_parquet, columns=["shard"])["shard"]
    except (OSError, ValueError) as exc:
        raise DataError(f"index file '{images_parquet}' cannot be read: {exc}") from exc
    return sorted({str(v) for v in column.unique().to_pylist() if v})
