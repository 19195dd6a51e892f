"""Ingestion: a source spec -> `data/raw/<source>/` (fetched bytes) -> `data/processed/`.

One call is one *job*, identified by the spec, the source options and the processing settings.
Cleaned images go into the job's tar shards `data/processed/shards/<job>-<seq>.tar`
(`geoloc.data.imagestore`, `IndexConfig.shard_size_mb` each), not one file per image.
The job journals finished items under `data/state/ingest/<job>/` chunk by chunk, after the
shard bytes they point at are on disk, so an interrupted ingest resumes where it stopped (its
shards cut back to what the journal holds); finalising is idempotent: it replaces this job's
rows in `data/processed/manifest.parquet` and `data/index/rejects.parquet`, never appends twice.
Counts always satisfy `read = accepted + rejected + duplicates`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc.atomic import sweep_stale_temps, temp_path
from geoloc.config import IndexConfig
from geoloc.data import rejects as R
from geoloc.data.digests import DigestIndex, digest, digests
from geoloc.data.finalize import HEAP_MMAP_THRESHOLD, SLICE_ROWS, finalize_journals
from geoloc.data.finalize import (  # the manifest contract, imported from here too
    MANIFEST_COLUMNS as MANIFEST_COLUMNS,
)
from geoloc.data.finalize import empty_manifest as empty_manifest
from geoloc.data.finalize import normalise_manifest as normalise_manifest
from geoloc.data.finalize import read_processed_manifest as read_processed_manifest
from geoloc.data.imagestore import LOCATION_COLUMNS, SHARDS_DIR, shard_relpath
from geoloc.data.process import ProcessTask, process_one
from geoloc.data.shardwriter import ShardWriter, members_of
from geoloc.data.sources import FetchError, RawItem, SourceReject, create_source
from geoloc.data.state import Journal, maybe_fault, stable_hash
from geoloc.errors import DataError
from geoloc.heap import bound_heap_growth
from geoloc.locks import file_lock
from geoloc.paths import DataPaths
from geoloc.progress import track

log = logging.getLogger(__name__)

FETCH_THREADS = 8
DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class IngestReport:
    """What one ingest did; `read == accepted + rejected + duplicates`."""

    spec: str
    source: str
    read: int
    accepted: int
    rejected: int
    duplicates: int
    reasons: dict[str, int] = field(default_factory=dict)
    resumed: int = 0  # items already journaled by an earlier, interrupted run
    seconds: float = 0.0
    errors: tuple[str, ...] = ()  # parts of the source that could not be read (a corrupt zip)
    notes: tuple[str, ...] = ()  # hints from the source (e.g. URLs not fetched)


def _key(source: str, ref: str) -> str:
    return f"{source}\t{ref}"


def _meta(entry: RawItem | SourceReject) -> dict[str, Any]:
    base = {"key": _key(entry.source, entry.source_ref), "source": entry.source}
    base["source_ref"] = entry.source_ref
    if isinstance(entry, RawItem):
        base.update(
            image_id=entry.image_id, captured_at=entry.captured_at, sequence_id=entry.sequence_id
        )
        base.update(entry.attributes)  # optional columns (geoloc.data.attributes)
    return base


def _raw_target(paths: DataPaths, item: RawItem) -> Path:
    name = item.raw_name or stable_hash(item.source_ref) + ".jpg"
    return paths.raw / item.source / name


def _fetch_one(item: RawItem, target: Path) -> tuple[Path | None, tuple[str, str] | None]:
    """Download to `target` unless a finished copy is there; (path, None) or (None, reject)."""
    if target.is_file():
        return target, None
    try:
        data = item.fetch() if item.fetch else b""
    except FetchError as exc:
        return None, (exc.reason or R.UNREACHABLE, exc.detail)
    except DataError:  # the network is down: one error for the ingest, not one per item
        raise
    except Exception as exc:  # a source bug must not kill the whole ingest
        return None, (R.UNREACHABLE, f"{type(exc).__name__}: {exc}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target, None


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit when the ingest process dies (even by SIGKILL).

    Forked workers hold the task pipe open themselves, so they would never see EOF and would
    linger forever after a hard kill of the parent.
    """
    import threading

    try:  # Linux: the kernel signals us when the parent dies
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="geoloc-parent-watch").start()


class _Runner:
    """Turns a chunk of pending entries into journal rows (fetch: threads, decode: processes)."""

    def __init__(self, paths: DataPaths, cfg: IndexConfig, writer: ShardWriter) -> None:
        self.paths = paths
        self.cfg = cfg
        self.writer = writer
        self.threads = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="geoloc-fetch")
        self.procs: Executor | None = None
        if cfg.workers > 1:
            import multiprocessing as mp

            # fork: works from any __main__ (stdin, notebooks, flow runners); the pool starts
            # before the fetch threads do
            self.procs = ProcessPoolExecutor(
                cfg.workers,
                mp_context=mp.get_context("fork"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
            self.procs.submit(int).result()

    def close(self) -> None:
        self.threads.shutdown(cancel_futures=True)
        if self.procs is not None:
            self.procs.shutdown(cancel_futures=True)

    def prefetch(self, chunk: list[RawItem | SourceReject]) -> dict[int, Future]:
        """Start downloading the chunk's remote items (threads); returns futures by item id."""
        return {
            id(e): self.threads.submit(_fetch_one, e, _raw_target(self.paths, e))
            for e in chunk
            if isinstance(e, RawItem) and e.local_path is None
        }

    def run(
        self, chunk: list[RawItem | SourceReject], downloads: dict[int, Future] | None = None
    ) -> list[dict[str, Any]]:
        """Journal rows of a chunk; `downloads` from `prefetch` (started now when missing)."""
        rows: dict[str, dict[str, Any]] = {}
        tasks: list[ProcessTask] = []
        downloads = self.prefetch(chunk) if downloads is None else downloads
        for entry in chunk:
            meta = _meta(entry)
            if isinstance(entry, SourceReject):
                rows[meta["key"]] = meta | dict(
                    status="rejected", reason=entry.reason, detail=entry.detail, stage="source"
                )
                continue
            local = entry.local_path
            if local is None:
                local, problem = downloads[id(entry)].result()
                if problem:
                    reason, detail = problem
                    rows[meta["key"]] = meta | dict(
                        status="rejected", reason=reason, detail=detail, stage="fetch"
                    )
                    continue
            rows[meta["key"]] = meta
            tasks.append(
                ProcessTask(
                    key=meta["key"],
                    path=str(local),
                    member=entry.member,
                    lat=entry.lat,
                    lon=entry.lon,
                    max_side=self.cfg.max_side,
                    max_pixels=self.cfg.max_pixels,
                )
            )
        results: Iterable[dict[str, Any]]
        if self.procs is None:
            results = map(process_one, tasks)
        else:
            results = self.procs.map(process_one, tasks, chunksize=8)
        try:
            for res in results:
                rows[res["key"]].update(res)
        except BrokenProcessPool as exc:  # a codec crashed a worker (segfault, OOM kill)
            first, last = tasks[0].path if tasks else "?", tasks[-1].path if tasks else "?"
            raise DataError(
                f"a processing worker died on one of the files {first} ... {last}: {exc}; "
                f"finished chunks are kept, rerun with --workers 1 to find the file"
            ) from exc
        out = [rows[_key(e.source, e.source_ref)] for e in chunk]
        for row in out:  # into the shard in source order: same input, same shard bytes
            if "jpeg" in row:
                m = self.writer.add(row["sha256"], row.pop("jpeg"))
                row.update(path=shard_relpath(m.shard), shard=m.shard, member=m.member,
                           offset=m.offset, length=m.length)  # fmt: skip
        return out


def job_id(spec: str, cfg: IndexConfig, options: dict[str, Any]) -> str:
    """Same spec, options and processing settings -> same job (and so the same journal)."""
    return stable_hash(
        {"spec": spec, "options": options, "max_side": cfg.max_side, "max_pixels": cfg.max_pixels}
    )


def _resolve_spec(spec: str, paths: DataPaths) -> str:
    return f"demo:{paths.demo}" if spec == "demo" else spec


def job_spec(spec: str, paths: DataPaths) -> str:
    """What names a source's ingest job: never the data folder's absolute path.

    `demo`, and a local folder or manifest under the data root (`data/raw/photos`), are named
    relative to that root, so two data folders ingesting their own copy of the same photos get
    the same job, and so the same shard names. A source elsewhere keeps its absolute path: it is
    what tells two different folders apart for the journal's resume (their shard names differ
    then, their storage order and fingerprint do not: `ImageLocations`, `index_fingerprint`).
    """
    if spec == "demo" or "://" in spec:
        return spec
    try:
        local = Path(spec).expanduser().resolve()
        if not local.exists():
            return spec
        return f"data:{local.relative_to(paths.root.resolve()).as_posix()}"
    except (OSError, ValueError):  # outside the data root (or not a path at all)
        return spec


@dataclass(frozen=True)
class JournaledSource:
    """A source listed and processed into its job journal, not yet merged into the manifest.

    Journaling touches only the job's own journal and content-addressed files, so several jobs
    can run at once (`geoloc.data.shards`); the merge (`geoloc.data.finalize`) is the one step
    that must take turns.
    """

    spec: str
    source: str
    listed: np.ndarray  # digest of every listed key in source order; deduplication follows it
    journal: Path
    resumed: int = 0
    errors: tuple[str, ...] = ()  # the source's `errors` (parts it could not read)
    notes: tuple[str, ...] = ()


def journal_source(
    spec: str,
    paths: DataPaths,
    cfg: IndexConfig,
    *,
    fresh: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    on_chunk: Callable[[int], None] | None = None,
    **source_options: Any,
) -> JournaledSource:
    """List `spec` and fetch + process what its journal does not hold yet (resumable).

    The listing is streamed chunk by chunk (only a 16-byte digest of each item's key is kept,
    for the order the merge deduplicates in), so memory grows by 16 bytes per listed item.
    """
    bound_heap_growth(HEAP_MMAP_THRESHOLD)  # before the listing's and shard writer's arrays
    resolved = _resolve_spec(spec, paths)
    source = create_source(resolved, **source_options)
    # the same photos under another data folder are the same job: no absolute path in its name
    journal = Journal(paths.state / "ingest" / job_id(job_spec(spec, paths), cfg, source_options))
    journal.lock()  # the same source ingested twice at once: the second waits, then resumes
    if fresh:
        journal.clear()
    # temp files of writers killed mid-write (an earlier, interrupted ingest) go first
    for folder in (paths.processed, paths.raw / getattr(source, "name", ""), journal.folder):
        sweep_stale_temps(folder, recursive=True)
    done_rows = journal.read(columns=["key", "stage", *LOCATION_COLUMNS])
    # the keys done, as digests (16 bytes a key, not a Python set of strings)
    keys = done_rows["key"] if len(done_rows) else pd.Series([], dtype=object)
    done = DigestIndex(np.unique(digests(keys)), presorted=True)
    # a source's reject is not final: a file missing last time may be there now
    again = keys[done_rows["stage"] == "source"] if "stage" in done_rows else keys[:0]
    redo = DigestIndex(np.unique(digests(again)), presorted=True)
    del keys, again
    if len(done):
        log.info("ingest %s: resuming, %d items already done", spec, len(done) - len(redo))
    writer = _shard_writer(paths, cfg, journal.folder.name, done_rows, fresh)
    del done_rows
    runner = _Runner(paths, cfg, writer)
    listed: list[np.ndarray] = []  # key digests in source order, a block at a time
    block: list[str] = []
    resumed = 0

    def pending_chunks() -> Iterator[list[RawItem | SourceReject]]:
        nonlocal resumed
        chunk: list[RawItem | SourceReject] = []
        for entry in source.items():
            key = _key(entry.source, entry.source_ref)
            block.append(key)
            if len(block) == SLICE_ROWS:
                listed.append(digests(block))
                block.clear()
            if len(done) and _already_done(digest(key), entry, done, redo):
                resumed += 1
                continue
            chunk.append(entry)
            if len(chunk) == chunk_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        listed.append(digests(block))

    finished = False
    try:
        # a bar in a terminal, log lines under an orchestrator (no terminal)
        with track(desc=f"ingest {spec}", unit="img", leave=True) as bar:
            chunks = pending_chunks()
            chunk = next(chunks, None)
            downloads = runner.prefetch(chunk) if chunk else {}
            while chunk is not None:
                # the next chunk is listed and downloads while this one is decoded
                upcoming_chunk = next(chunks, None)
                upcoming = runner.prefetch(upcoming_chunk) if upcoming_chunk else {}
                rows = runner.run(chunk, downloads)
                writer.commit()  # the shard bytes first, then the journal that points at them
                parts = journal.append(rows)
                bar.update(len(chunk))
                chunk, downloads = upcoming_chunk, upcoming
                if on_chunk is not None:
                    on_chunk(parts)
                maybe_fault("ingest", parts)
        finished = True
    finally:
        runner.close()
        writer.close() if finished else writer.abort()
        journal.unlock()
    return JournaledSource(
        spec=spec,
        source=getattr(source, "name", spec),
        listed=np.concatenate(listed) if listed else digests([]),
        journal=journal.folder,
        resumed=resumed,
        errors=tuple(getattr(source, "errors", ())),
        notes=tuple(getattr(source, "notes", ())),
    )


def _already_done(
    key: bytes, entry: RawItem | SourceReject, done: DigestIndex, redo: DigestIndex
) -> bool:
    """Whether a resumed job did this key already (its source reject is redone once the item
    is there: a file missing last time may be there now)."""
    if done.position(key) < 0:
        return False
    return not (redo.position(key) >= 0 and isinstance(entry, RawItem))


def _shard_writer(
    paths: DataPaths, cfg: IndexConfig, job: str, done_rows: pd.DataFrame, fresh: bool
) -> ShardWriter:
    """The job's shard writer, knowing what the job stored before (its journal and its rows in
    the manifest): equal content is not stored again, and bytes no record points at are cut."""
    known = members_of(done_rows)
    if paths.processed_manifest.is_file():
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        names = set(pq.read_schema(paths.processed_manifest).names)
        if "shard" in names:
            table = pq.read_table(paths.processed_manifest, columns=["shard", "member", "offset",
                                                                     "length"])  # fmt: skip
            shard = pc.fill_null(table["shard"], "")
            table = table.filter(pc.starts_with(shard, f"{job}-"))
            known += members_of(table.to_pandas())
    folder = paths.processed / SHARDS_DIR
    return ShardWriter(folder, job, cfg.shard_size_mb << 20, known, drop_lost=fresh)


def ingest(
    spec: str,
    paths: DataPaths,
    cfg: IndexConfig,
    *,
    fresh: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    on_chunk: Callable[[int], None] | None = None,
    **source_options: Any,
) -> IngestReport:
    """Ingest everything `spec` names into `data/processed/` (resumable through `data/state/`).

    `fresh` forgets the journal of this job first. `on_chunk(parts_done)` is called after each
    journal part is committed (progress, or injecting an interruption in tests).
    """
    t0 = time.perf_counter()
    job = journal_source(spec, paths, cfg, fresh=fresh, chunk_size=chunk_size,
                         on_chunk=on_chunk, **source_options)  # fmt: skip
    with file_lock(paths.state / "ingest.lock"):
        counts = finalize_journals([job.journal], job.listed, paths)
    report = IngestReport(spec=spec, source=job.source, read=counts.read,
                          accepted=counts.accepted, rejected=counts.rejected,
                          duplicates=counts.duplicates, reasons=counts.reasons,
                          resumed=job.resumed, seconds=time.perf_counter() - t0,
                          errors=job.errors, notes=job.notes)  # fmt: skip
    log.info("ingest %s: %s", spec, report)
    return report
