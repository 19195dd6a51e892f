"""`index-sharded` flow: many source shards processed in parallel on Dask, then one index.

Each shard (a folder, a manifest, an s3 prefix...) is one `process-shard` task; `prefect-dask`
runs them on a Dask cluster: a local one with `GEOLOC_DASK_WORKERS` worker processes (default
2), or an existing cluster at `GEOLOC_DASK_ADDRESS` whose workers see the same
`GEOLOC_DATA_DIR`. Then `merge-shards` and `build-index` run once. Same index as ingesting the
shards one after another (`geoloc.data.shards`).
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

import geoloc.data.index
import geoloc.data.shards
from flows._artifacts import publish_table
from flows.index import _stage, build_index, validate_config
from geoloc.config import IndexConfig
from geoloc.data.ingest import IngestReport, JournaledSource
from geoloc.paths import DataPaths


def dask_runner() -> DaskTaskRunner:
    """The Dask cluster the shards fan out to (environment, read when the flow is defined)."""
    address = os.environ.get("GEOLOC_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    workers = int(os.environ.get("GEOLOC_DASK_WORKERS", "2"))
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
    )


# journals make a rerun resume where a shard stopped: no Prefect cache needed
@task(name="process-shard", cache_policy=NO_CACHE)
def process_shard(
    spec: str, paths: DataPaths, cfg: IndexConfig, options: dict[str, Any]
) -> JournaledSource:
    return geoloc.data.shards.process_shard(spec, paths, cfg, options)


@task(name="merge-shards", cache_policy=NO_CACHE)
def merge_shards(shards: list[JournaledSource], paths: DataPaths) -> IngestReport:
    return geoloc.data.shards.merge_shards(shards, paths)


@flow(name="index-sharded", log_prints=True, task_runner=dask_runner())
def index_sharded(
    shards: list[str],
    index_preset: str | None = "demo",
    overrides: dict[str, Any] | None = None,
    source_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest every shard in parallel, merge them in the given order, build the index.

    Args:
        shards: Source specs (folders, manifests, `s3://...`), one task each; their order decides
            which copy of a duplicate image is kept.
        index_preset: Index config: a preset (demo) or a YAML/JSON file; empty for defaults.
        overrides: Any other IndexConfig key, e.g. {"resolution": 3}.
        source_options: Extra options given to every shard's source.
    """
    cfg = validate_config(index_preset, overrides)
    paths = DataPaths.default()
    jobs = process_shard.map(shards, unmapped(paths), unmapped(cfg), unmapped(source_options or {}))
    report = merge_shards(jobs.result(), paths)
    _stage(build_index, "index", paths)(paths, cfg)
    fingerprint = geoloc.data.index.index_fingerprint(paths)
    publish_table(
        "geoloc-index-sharded",
        [{"shards": len(shards), "accepted": report.accepted, "rejected": report.rejected,
          "duplicates": report.duplicates, "fingerprint": fingerprint}],
        "Shards merged into the canonical index",
    )  # fmt: skip
    return {"index_dir": str(paths.index), "fingerprint": fingerprint,
            "accepted": report.accepted}  # fmt: skip
