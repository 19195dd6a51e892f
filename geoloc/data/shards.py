"""Ingestion over many source shards at once: process each shard alone, then merge them in order.

A big collection arrives as many folders or manifests. `process_shard` lists one shard and
fetches + decodes it into its own journal (`data/state/ingest/<job>/`); shards share nothing but
the content-addressed `data/processed/` tree, where equal bytes land on the same file, so any
number of them can run at the same time, in processes on one host or on Dask workers that see the
same data folder. `merge_shards` then finalizes all journals at once, in the order the shards
were given, so deduplication across shards, the manifest and the rejects are the same as
ingesting the shards one after another, whichever shard finished first.

No orchestrator here: `flows/index_sharded.py` fans `process_shard` out over a Dask cluster,
`ingest_shards` does the same with a local process pool.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from geoloc.config import IndexConfig
from geoloc.data.finalize import finalize_journals
from geoloc.data.ingest import IngestReport, JournaledSource, journal_source
from geoloc.errors import DataError
from geoloc.locks import file_lock
from geoloc.paths import DataPaths

log = logging.getLogger(__name__)


def process_shard(
    spec: str, paths: DataPaths, cfg: IndexConfig, options: dict[str, Any] | None = None
) -> JournaledSource:
    """Fetch and process one shard into its journal; the manifest is left alone.

    One process per shard (`cfg.workers` is ignored): the parallelism is across shards, and a
    Dask worker process may not start processes of its own. Resumes from the journal.
    """
    t0 = time.perf_counter()
    job = journal_source(spec, paths, cfg.model_copy(update={"workers": 1}), **(options or {}))
    log.info("shard %s: %d items journaled in %.1fs", spec, len(job.listed),
             time.perf_counter() - t0)  # fmt: skip
    return job


def merge_shards(shards: Sequence[JournaledSource], paths: DataPaths) -> IngestReport:
    """Finalize every shard's journal into manifest + rejects, deduplicating in shard order.

    Idempotent: the shards' previous rows are replaced, never appended twice.
    """
    if not shards:
        raise DataError("no shards to merge: give at least one source")
    listed = np.concatenate([s.listed for s in shards])  # a key listed twice: its first place
    with file_lock(paths.state / "ingest.lock"):
        counts = finalize_journals([s.journal for s in shards], listed, paths,
                                   first_listed_wins=True)  # fmt: skip
    report = IngestReport(
        spec=" + ".join(s.spec for s in shards),
        source=",".join(sorted({s.source for s in shards})),
        read=counts.read, accepted=counts.accepted, rejected=counts.rejected,
        duplicates=counts.duplicates, reasons=counts.reasons,
    )  # fmt: skip
    log.info("merged %d shards: %s", len(shards), report)
    return report


def ingest_shards(
    specs: Sequence[str],
    paths: DataPaths,
    cfg: IndexConfig,
    *,
    workers: int = 2,
    options: dict[str, Any] | None = None,
) -> IngestReport:
    """`process_shard` on `workers` local processes, then `merge_shards` (no orchestrator)."""
    t0 = time.perf_counter()
    if workers <= 1:
        jobs = [process_shard(spec, paths, cfg, options) for spec in specs]
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(process_shard, spec, paths, cfg, options) for spec in specs]
            jobs = [f.result() for f in futures]
    report = merge_shards(jobs, paths)
    seconds = time.perf_counter() - t0
    resumed = sum(job.resumed for job in jobs)
    return IngestReport(**{**report.__dict__, "resumed": resumed, "seconds": seconds})
