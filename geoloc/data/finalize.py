"""The manifest contract, and the merge of ingest journals into it in bounded memory.

`finalize_journals` turns one or more job journals (`geoloc.data.state.Journal`) into this
job's rows of `data/processed/manifest.parquet` and `data/index/rejects.parquet`. At 10^6 images
the merge used to read the whole journal as one frame, keep a Python set of every sha256, id
and source ref, and build the manifest at once: memory grew linearly in N (2.1x for 3x rows).
Here no per-row Python object outlives a slice:

- every per-row set (the listing's order, content and ids seen, the refs this job replaces) is a
  sorted array of 16-byte blake2b digests (`geoloc.data.digests`; no collision to expect
  below ~10^18 rows);
- journal rows travel in source order a slice of `slice_rows` rows at a time, read from their
  parts; accepted rows go to temp parquet runs;
- the manifest's order by `image_id` is an external sort: every row's rank is computed from the
  id column alone, rows are spread over rank buckets of one slice each on disk, and each bucket
  is sorted and appended to the output as a row group.

What still grows with N: 16 bytes a row of listing digests (held by the caller), 8 of the
chosen row of each listed key (`geoloc.data.journal_rows`), ~40 of digest sets (content ->
ordinal, ids seen; the ids themselves are read back from the runs, this job's refs wait in a
file) and the copies of adding to them, and the refused rows (the rejects table is merged
whole). What does not: the 65,536-row slice and its copies (~250 MB of the merge's peak).
Deduplication follows source order exactly as before: the first accepted content and the first
use of an id win.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geoloc.atomic import atomic_path, temp_path, write_parquet
from geoloc.data import rejects as R
from geoloc.data.attributes import ATTRIBUTE_COLUMNS, attribute_dtype
from geoloc.data.digests import DigestIndex, digests, ref_digests
from geoloc.data.journal_rows import listing_index, row_slices, select_rows
from geoloc.data.tables import iter_frames, release_memory
from geoloc.heap import bound_heap_growth
from geoloc.paths import DataPaths

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "image_id",
    "path",
    "lat",
    "lon",
    "sha256",
    "width",
    "height",
    "source",
    "source_ref",
    "captured_at",
    "sequence_id",
    "shard",
    "member",
    "offset",
    "length",
]
SLICE_ROWS = 65_536  # journal rows (and manifest rows per sort bucket) in memory at once
HEAP_MMAP_THRESHOLD = 256 << 10
"""glibc's mmap threshold in an ingest process (`geoloc.heap.bound_heap_growth`): arrays from
256 KB (a slice's columns, the digest sets and their growth copies) are mapped and handed back
when freed. With glibc's default the threshold climbs to the largest array freed, and later
arrays fragment the heap: the 10^6-row merge peaked ~40 MB higher, and the journaling's arrays
stayed resident into the merge."""


# --------------------------------------------------------------------------------------------
# The manifest contract
# --------------------------------------------------------------------------------------------


def _timestamps(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True, errors="coerce", format="mixed").astype(
        "datetime64[ns, UTC]"
    )


def empty_manifest() -> pd.DataFrame:
    return normalise_manifest(pd.DataFrame({c: [] for c in MANIFEST_COLUMNS}))


def normalise_manifest(df: pd.DataFrame, attributes: Sequence[str] | None = None) -> pd.DataFrame:
    """Contract dtypes and column order of `data/processed/manifest.parquet`.

    Optional attribute columns (`ATTRIBUTE_COLUMNS`) follow the contract ones, each only when
    some row has a value, or exactly `attributes` when given (slices of one file must agree).
    """
    if attributes is None:
        attributes = [c for c in ATTRIBUTE_COLUMNS if c in df and df[c].notna().any()]
    missing = [c for c in (*attributes, "shard", "member", "offset", "length") if c not in df]
    df = df.assign(**dict.fromkeys(missing))
    out = df[MANIFEST_COLUMNS + list(attributes)].copy()
    for col in attributes:
        out[col] = out[col].astype(attribute_dtype(col))
    for col in ("image_id", "path", "sha256", "source", "source_ref"):
        out[col] = out[col].astype("str")
    for col in ("shard", "member"):  # null for images stored one file each (older manifests)
        out[col] = out[col].astype("object").where(out[col].notna(), None)
    for col in ("offset", "length"):
        out[col] = out[col].fillna(-1).astype("int64")
    for col in ("lat", "lon"):
        out[col] = out[col].astype("float64")
    for col in ("width", "height"):
        out[col] = out[col].astype("int64")
    out["captured_at"] = _timestamps(out["captured_at"])
    out["sequence_id"] = out["sequence_id"].astype("str")  # missing stays missing (NaN/null)
    return out.reset_index(drop=True)


def read_processed_manifest(paths: DataPaths) -> pd.DataFrame:
    if not paths.processed_manifest.is_file():
        return empty_manifest()
    return pd.read_parquet(paths.processed_manifest)


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeCounts:
    """What a merge found; `read == accepted + rejected + duplicates`."""

    read: int
    accepted: int
    duplicates: int
    reasons: dict[str, int]

    @property
    def rejected(self) -> int:
        return self.read - self.accepted - self.duplicates


class _Accepted:
    """Accepted rows so far: temp parquet runs in ordinal order, their sha256s and ids seen
    (digests), and which attribute columns hold a value. The ids themselves are read back from
    the runs when needed (~20 bytes a row not held through the merge)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs: list[Path] = []
        self.starts: list[int] = []  # the first ordinal of each run
        self.count = 0
        self.sha = DigestIndex(values=np.empty(0, np.int32))  # sha256 -> ordinal holding it
        self.id_seen = DigestIndex()
        self.attributes: set[str] = set()

    def add_run(self, frame: pd.DataFrame, sha: np.ndarray, ids: np.ndarray) -> None:
        if not len(frame):
            return
        frame = normalise_manifest(frame)  # typed columns, so every run writes as parquet
        self.sha.add(sha, np.arange(self.count, self.count + len(frame), dtype=np.int32))
        self.id_seen.add(ids)
        self.attributes |= {c for c in ATTRIBUTE_COLUMNS if c in frame and frame[c].notna().any()}
        path = temp_path(self.folder / f"run-{len(self.runs)}.parquet")
        self.runs.append(path)
        self.starts.append(self.count)
        frame.to_parquet(path, index=False)
        self.count += len(frame)

    def _ids_of_run(self, run: int) -> pa.Array:
        column = pq.read_table(self.runs[run], columns=["image_id"]).column(0)
        return column.combine_chunks().cast(pa.string())

    def image_ids(self, ordinals: np.ndarray) -> dict[int, str]:
        """The image_id of each of `ordinals` (kept rows a duplicate points at: few), read back
        from its run, each run once."""
        want = np.unique(ordinals)
        run_of = np.searchsorted(np.asarray(self.starts), want, side="right") - 1
        found: dict[int, str] = {}
        for run in np.unique(run_of):
            ids = self._ids_of_run(int(run))
            for o in want[run_of == run].tolist():
                found[o] = ids[o - self.starts[run]].as_py()
        return found

    def all_ids(self) -> pa.ChunkedArray:
        """Every accepted image_id in ordinal order, read back from the runs."""
        return pa.chunked_array([self._ids_of_run(r) for r in range(len(self.runs))], pa.string())


def _keep_base(paths: DataPaths, replace: DigestIndex, acc: _Accepted, slice_rows: int) -> None:
    """The manifest's rows of other jobs, streamed into the accepted runs first."""
    if not paths.processed_manifest.is_file():
        return
    for frame in iter_frames(paths.processed_manifest, batch_rows=slice_rows):
        if not len(frame):
            continue
        frame = frame[~replace.contains(ref_digests(frame["source"], frame["source_ref"]))]
        acc.add_run(frame.reset_index(drop=True), digests(frame["sha256"].astype(str)),
                    digests(frame["image_id"].astype(str)))  # fmt: skip


def _decide(
    sha: np.ndarray,
    ids: np.ndarray,
    holder: np.ndarray,
    id_taken: np.ndarray,
    image_ids: list[str],
    held: dict[int, str],
) -> tuple[np.ndarray, list[str]]:
    """Per accepted journal row, in source order: 0 keep, 1 duplicate (same content as an
    image kept earlier), 2 duplicate_id (its id taken by other content); with the detail.

    A row refused for its id claims neither its content nor its id, so this is a loop."""
    code = np.zeros(len(sha), np.int8)
    details = [""] * len(sha)
    kept_sha: dict[bytes, str] = {}  # this slice's kept content -> image_id
    kept_ids: set[bytes] = set()
    for i, (s, d) in enumerate(zip(sha.tolist(), ids.tolist(), strict=True)):
        if holder[i] >= 0 or s in kept_sha:
            code[i] = 1
            first = kept_sha[s] if s in kept_sha else held[int(holder[i])]
            details[i] = f"same content as image {first}"
        elif id_taken[i] or d in kept_ids:
            code[i] = 2
            details[i] = f"image_id {image_ids[i]} already used by different content"
        else:
            kept_sha[s] = image_ids[i]
            kept_ids.add(d)
    return code, details


def _column(frame: pd.DataFrame, name: str, default: Any = None) -> pd.Series:
    return frame[name] if name in frame else pd.Series(default, index=frame.index, dtype=object)


_ACCEPTED_COLUMNS = ["sha256", "path", "lat", "lon", "width", "height", "source", "source_ref"]
"""Journal columns every accepted row carries (read as manifest columns below)."""


def _dedup_slice(
    frame: pd.DataFrame, acc: _Accepted
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, pd.DataFrame]:
    """One slice of journal rows in source order: the kept rows as manifest columns (with
    their sha256 and id digests), and the refused rows as rejects (duplicates included)."""
    ok = (frame["status"] == "accepted").to_numpy(dtype=bool, na_value=False)
    # a journal part of rejects only has no accepted-row columns: add them, empty
    good = frame[ok].reindex(columns=frame.columns.union(_ACCEPTED_COLUMNS, sort=False))
    given = _column(good, "image_id")
    given = given.astype(object).where(given.notna(), "")  # missing: the content's sha prefix
    image_ids = [str(g) if g != "" else h[:16] for g, h in zip(given, good["sha256"],
                                                                strict=True)]  # fmt: skip
    sha, ids = digests(good["sha256"]), digests(image_ids)
    holder = acc.sha.find(sha)  # the ordinal of an earlier kept row of the same content
    held = acc.image_ids(holder[holder >= 0])
    code, details = _decide(sha, ids, holder, acc.id_seen.contains(ids), image_ids, held)
    refused = frame.loc[~ok].reindex(columns=R.COLUMNS)
    dropped = code > 0
    dedup = pd.DataFrame({
        "source": good["source"][dropped], "source_ref": good["source_ref"][dropped],
        "reason": np.where(code[dropped] == 1, R.DUPLICATE, R.DUPLICATE_ID),
        "detail": [d for d, c in zip(details, code, strict=True) if c], "stage": "dedup",
    })  # fmt: skip
    keep = good[~dropped]
    captured = _column(keep, "captured_at")
    captured = captured.where(captured.notna() & (captured.astype(str) != ""),
                              _column(keep, "exif_captured_at"))  # fmt: skip
    out = pd.DataFrame({
        "image_id": np.asarray(image_ids, dtype=object)[~dropped], "path": keep["path"],
        "lat": keep["lat"], "lon": keep["lon"], "sha256": keep["sha256"],
        "width": keep["width"], "height": keep["height"], "source": keep["source"],
        "source_ref": keep["source_ref"], "captured_at": captured,
        "sequence_id": _column(keep, "sequence_id"), "shard": _column(keep, "shard"),
        "member": _column(keep, "member"), "offset": _column(keep, "offset", -1),
        "length": _column(keep, "length", -1),
    } | {c: keep[c] for c in ATTRIBUTE_COLUMNS if c in keep})  # fmt: skip
    return out.reset_index(drop=True), sha[~dropped], ids[~dropped], pd.concat([refused, dedup])


def _arrow_schema(frame: pd.DataFrame) -> pa.Schema:
    """The file's schema from a normalised frame; all-null object columns are strings."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    for i, f in enumerate(schema):
        if pa.types.is_null(f.type):
            schema = schema.set(i, pa.field(f.name, pa.string()))
    return schema


def _write_sorted(acc: _Accepted, path: Path, slice_rows: int) -> None:
    """Every accepted run into `path`, sorted by image_id: an external bucket sort by rank."""
    if not acc.count:
        write_parquet(path, empty_manifest())
        return
    attributes = [c for c in ATTRIBUTE_COLUMNS if c in acc.attributes]
    acc.sha, acc.id_seen = DigestIndex(), DigestIndex()  # done with: free them
    ids = acc.all_ids()
    rank = np.empty(acc.count, np.int32)
    rank[pc.sort_indices(ids).to_numpy()] = np.arange(acc.count, dtype=np.int32)  # ids distinct
    del ids
    n_buckets = -(-acc.count // slice_rows)
    buckets = [temp_path(acc.folder / f"bucket-{b}.arrow") for b in range(n_buckets)]
    writers: list[Any] = [None] * n_buckets
    schema: pa.Schema | None = None
    start = 0
    try:
        for run in acc.runs:
            frame = normalise_manifest(pd.read_parquet(run), attributes)
            schema = schema or _arrow_schema(frame)
            r = rank[start : start + len(frame)]
            start += len(frame)
            table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
            table = table.append_column("_rank", pa.array(r))
            which = r // slice_rows
            for b in np.unique(which):
                if writers[b] is None:
                    writers[b] = pa.ipc.new_stream(str(buckets[b]), table.schema)
                writers[b].write_table(table.filter(pa.array(which == b)))
            run.unlink()
        for w in writers:
            w.close()
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as out:
            for bucket in buckets:
                with pa.ipc.open_stream(str(bucket)) as reader:
                    table = reader.read_all()
                bucket.unlink()
                table = table.take(pc.sort_indices(table["_rank"])).drop_columns(["_rank"])
                out.write_table(table.cast(schema), row_group_size=max(len(table), 1))
    finally:
        for bucket in buckets:
            bucket.unlink(missing_ok=True)
    release_memory()


def _merge_rejects(
    path: Path, new: list[pd.DataFrame], replace: DigestIndex, gone: set[tuple[str, str]]
) -> None:
    """rejects.parquet without this job's previous rows (and gone ones), plus `new`."""
    old = R.read_rejects(path)
    if len(old):
        drop = replace.contains(ref_digests(old["source"], old["source_ref"]))
        if gone:
            drop |= np.array([k in gone for k in zip(old["source"], old["source_ref"],
                                                     strict=True)])  # fmt: skip
        old = old[~drop]
    frames = [f for f in new if len(f)]
    R.write_rejects(path, old, pd.concat(frames, ignore_index=True) if frames else
                    pd.DataFrame(columns=R.COLUMNS))  # fmt: skip


def finalize_journals(
    journals: Sequence[Path],
    listed: np.ndarray,
    paths: DataPaths,
    *,
    first_listed_wins: bool = False,
    slice_rows: int = SLICE_ROWS,
) -> MergeCounts:
    """Deduplicate the journals' rows in listing order and merge them into manifest + rejects.

    `listed` holds the digest (`digests`) of every listed key in source order; a key listed
    twice takes its last place (its first with `first_listed_wins`). Rows of keys not listed
    are left out; this job's earlier rows in both tables are replaced, never appended twice.
    """
    bound_heap_growth(HEAP_MMAP_THRESHOLD)
    sel = select_rows(journals, listing_index(listed, first_listed_wins))
    replace = DigestIndex(sel.keys, presorted=True)  # this job's refs: replaced in both tables
    sel.keys, gone = sel.keys[:0], sel.gone
    folder = paths.state / "merge"  # temp runs and buckets (not a job journal under ingest/)
    folder.mkdir(parents=True, exist_ok=True)
    acc = _Accepted(folder)
    refused: list[pd.DataFrame] = []  # a frame per slice: ~10x smaller than as dicts
    reasons: Counter[str] = Counter()
    duplicates = 0
    replaced = temp_path(folder / "replace.npy")  # not held through the merge: 16 bytes a row
    try:
        _keep_base(paths, replace, acc, slice_rows)
        with open(replaced, "wb") as fh:  # a file object: np.save would add ".npy" to a name
            np.save(fh, replace.keys, allow_pickle=False)
        del replace
        n_base = acc.count
        for rows in row_slices(sel, slice_rows):
            kept, sha, ids, slice_refused = _dedup_slice(rows, acc)
            acc.add_run(kept, sha, ids)
            counted = slice_refused["reason"].value_counts()
            duplicates += int(counted.pop(R.DUPLICATE)) if R.DUPLICATE in counted else 0
            reasons.update({str(k): int(v) for k, v in counted.items()})
            refused.append(slice_refused)
        n_read = len(sel.part)
        del sel  # what the sort needs is in the runs and their ids
        _write_sorted(acc, paths.processed_manifest, slice_rows)
        replace = DigestIndex(np.load(replaced, allow_pickle=False), presorted=True)
    finally:
        for run in acc.runs:
            run.unlink(missing_ok=True)
        replaced.unlink(missing_ok=True)
    _merge_rejects(paths.rejects, refused, replace, gone)
    return MergeCounts(
        read=n_read,
        accepted=acc.count - n_base,
        duplicates=duplicates,
        reasons=dict(sorted(reasons.items())),
    )
