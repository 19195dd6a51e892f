"""`index` flow: demo images -> ingest (fetch + process) -> build the canonical index.

Each stage is a task cached by the fingerprint of its inputs (`geoloc.compose.stage_cache`):
a re-run with unchanged inputs, or after a later failure, skips it. A stage whose outputs were
deleted runs again even when its key is cached; remote sources are never cached (their content
is unknown until listed; ingestion resumes from its journal instead). Cache records live next
to the data, in `data/state/stage-cache/`, so they follow `GEOLOC_DATA_DIR` and vanish with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

import geoloc.data.demo
import geoloc.data.index
import geoloc.data.ingest
from flows._artifacts import publish_table
from geoloc.compose import params as flow_params
from geoloc.compose import stage_cache
from geoloc.config import IndexConfig
from geoloc.data.demo import DemoReport
from geoloc.data.index import IndexReport
from geoloc.data.ingest import IngestReport
from geoloc.paths import DataPaths


def _demo_key(_: TaskRunContext, p: dict[str, Any]) -> str:
    return stage_cache.demo_key(p["out_dir"], p["n"], p["seed"], p["sigma_deg"])


def _ingest_key(_: TaskRunContext, p: dict[str, Any]) -> str | None:
    return stage_cache.ingest_key(p["spec"], p["paths"], p["cfg"], p["options"])


def _index_key(_: TaskRunContext, p: dict[str, Any]) -> str:
    return stage_cache.index_key(p["paths"], p["cfg"])


@task(name="validate-index-config", cache_policy=NO_CACHE)
def validate_config(preset: str | None, overrides: dict[str, Any] | None) -> IndexConfig:
    return flow_params.index_config_from_params(preset, overrides)


@task(name="make-demo", cache_key_fn=_demo_key)
def make_demo(out_dir: Path, n: int, seed: int, sigma_deg: float) -> DemoReport:
    return geoloc.data.demo.make_demo(out_dir, n=n, seed=seed, sigma_deg=sigma_deg)


# remote ingestion (object storage, HTTP) is the one stage worth retrying: the flow sets retries
# for remote sources only. A retry resumes from the ingest journal, it does not start over.
@task(name="ingest", cache_key_fn=_ingest_key, retry_delay_seconds=10)
def ingest(spec: str, paths: DataPaths, cfg: IndexConfig, options: dict[str, Any]) -> IngestReport:
    return geoloc.data.ingest.ingest(spec, paths, cfg, **options)


@task(name="build-index", cache_key_fn=_index_key)
def build_index(paths: DataPaths, cfg: IndexConfig) -> IndexReport:
    return geoloc.data.index.build_index(paths, cfg)


@flow(name="index", log_prints=True)
def index(
    source: str = "demo",
    index_preset: str | None = "demo",
    overrides: dict[str, Any] | None = None,
    demo_n: int = 12000,
    demo_seed: int = 0,
    source_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the canonical index under $GEOLOC_DATA_DIR/index.

    Args:
        source: `demo` (offline demo images), a folder, a manifest file, `s3://bucket/prefix` or
            `mapillary:minlon,minlat,maxlon,maxlat`.
        index_preset: Index config: a preset (demo) or a YAML/JSON file; empty for defaults.
        overrides: Any other IndexConfig key, e.g. {"resolution": 3}.
        demo_n: Number of demo images (source=demo).
        demo_seed: Seed of the demo images (source=demo).
        source_options: Extra options of the source (e.g. {"limit": 1000}).
    """
    cfg = validate_config(index_preset, overrides)
    paths = DataPaths.default()
    if source == "demo":
        _stage(make_demo, "demo", paths)(paths.demo, demo_n, demo_seed, 0.5)
    retries = 2 if stage_cache.is_remote_source(source) else 0
    _stage(ingest, "ingest", paths, retries=retries)(source, paths, cfg, source_options or {})
    _stage(build_index, "index", paths)(paths, cfg)
    fingerprint = geoloc.data.index.index_fingerprint(paths)
    publish_table(
        "geoloc-index",
        [{"source": source, "index": str(paths.index), "fingerprint": fingerprint}],
        "The canonical index this flow run built or reused",
    )
    return {"index_dir": str(paths.index), "fingerprint": fingerprint}


def _stage(stage_task: Any, stage: str, paths: DataPaths, **options: Any) -> Any:
    """The stage's task keeping its cache under the data tree; refreshed if outputs vanished."""
    return stage_task.with_options(
        result_storage=stage_cache.stage_cache_dir(paths),
        refresh_cache=not stage_cache.stage_outputs_present(stage, paths),
        **options,
    )
