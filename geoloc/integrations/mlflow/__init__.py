"""MLflow mirror of every run, the `geoloc` model registry entry, and the leaderboard.

The run directory is the source of truth; MLflow is a mirror where people compare runs. So:

- Mirroring never stops or slows training. `LiveMirror` (an epoch callback the composer builds)
  hands each epoch to a background thread through a bounded queue, swallows every tracking
  failure, records it in `summary.tracking` (`mirrored: false`, `error`, the run id kept) and
  goes quiet; `sync_run` after the run, or `geoloc mlflow sync` (`sync_runs`) later, catches up.
- Secrets stay out: a password in `tracking.tracking_uri` is moved to MLflow's own
  `MLFLOW_TRACKING_PASSWORD` by the config, and every message passes `geoloc.errors.redact`.
- Mirroring is idempotent. A run is found by its `geoloc.run_id` tag and updated, never duplicated
  (`writers`); artifacts and the model are uploaded again only when their digest changed.
- MLflow's fluent API is process-global, so everything here uses `MlflowClient` with explicit run
  ids (`store`); the model's `Model.log` runs under a lock that points it at our URI.

Modules: `store` (where: URI, probe, client, experiments, tags), `contents` (what a run
directory says), `writers` (idempotent writes to one run), `registry` (model, champion),
`pyfunc_model` (the registered model: `geoloc predict` as a pyfunc),
`mirror` (`sync_run`/`sync_runs`), `live` (`LiveMirror`), `sweeps` (parent runs),
`leaderboard`. Only this package imports mlflow, lazily: importing it does not load MLflow.
"""

from geoloc.integrations.mlflow.leaderboard import log_leaderboard
from geoloc.integrations.mlflow.live import LiveMirror
from geoloc.integrations.mlflow.mirror import (
    SyncResult,
    discover_runs,
    record_tracking,
    sync_run,
    sync_runs,
)
from geoloc.integrations.mlflow.registry import (
    CHAMPION_ALIAS,
    MODEL_NAME,
    update_champion,
)
from geoloc.integrations.mlflow.store import (
    TAG_KIND,
    TAG_PARENT,
    TAG_PREFECT_FLOW_RUN,
    TAG_RUN_ID,
    TAG_SWEEP,
    TrackingError,
    resolve_tracking_uri,
    run_page_of,
    runs_page_of,
)
from geoloc.integrations.mlflow.sweeps import (
    end_run,
    log_sweep_summary,
    start_parent_run,
    sweep_parent_run,
)

__all__ = [
    "CHAMPION_ALIAS",
    "MODEL_NAME",
    "TAG_KIND",
    "TAG_PARENT",
    "TAG_PREFECT_FLOW_RUN",
    "TAG_RUN_ID",
    "TAG_SWEEP",
    "LiveMirror",
    "SyncResult",
    "TrackingError",
    "discover_runs",
    "end_run",
    "log_leaderboard",
    "log_sweep_summary",
    "record_tracking",
    "resolve_tracking_uri",
    "run_page_of",
    "runs_page_of",
    "start_parent_run",
    "sweep_parent_run",
    "sync_run",
    "sync_runs",
    "update_champion",
]
