"""Where runs are tracked: the tracking URI, a health probe, a client, experiments, and the
tag names every mirrored run carries.

MLflow's active run is thread-local and its fluent API is process-global, so the package talks
through `MlflowClient` with explicit run ids; `global_tracking_uri` covers the one fluent call.
A SQLite store's first use in a process is serialised across processes (`prepare_store`): MLflow
creates and migrates its schema then, and concurrent migrations leave the file broken. Every
message that may carry a URI goes through `geoloc.errors.redact` (`TrackingError`, `error_text`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from geoloc.errors import GeolocError, redact
from geoloc.locks import file_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""MLflow's own default store: a SQLite file in the working directory."""

TAG_RUN_ID = "geoloc.run_id"
TAG_RUN_DIR = "geoloc.run_dir"
TAG_RUN_NAME = "geoloc.run_name"
TAG_STATUS = "geoloc.status"
TAG_KIND = "geoloc.kind"
TAG_ARTIFACTS_SHA = "geoloc.artifacts_sha256"
TAG_MODEL_SHA = "geoloc.model_sha256"
TAG_MODEL_VERSION = "geoloc.model_version"
TAG_LEADERBOARD_SHA = "geoloc.leaderboard_sha256"
TAG_SWEEP = "geoloc.sweep"
TAG_PREFECT_FLOW_RUN = "prefect.flow_run_id"
TAG_PARENT = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""Makes the MLflow 3 UI open our experiments in its "Model training" view (runs, metrics)
instead of the GenAI one (traces)."""

RUNS_VIEW_KEY = "geoloc-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
"""A view of the runs table that the UI loads from this experiment tag when the URL says
`?viewStateShareKey=geoloc-runs` (MLflow's own "Share" mechanism): its default columns are only
Source, Models and Dataset, so without it the table shows no metric at all."""
KEY_METRICS = ("rerank_median_km", "rerank_p90_km", "test_median_km", "test_p90_km",
               "best_p90_km", "best_val_acc", "test_geoscore")  # fmt: skip
"""The numbers a runs table shows first: after rerank, the model alone, the leaderboard's."""

PREFECT_FLOW_RUN_ENV = ("PREFECT__FLOW_RUN_ID", "PREFECT__RUNTIME__FLOW_RUN__ID")
"""Set by Prefect workers (and its runtime overrides) in the flow run's process; read, never
imported: `geoloc` does not depend on Prefect."""

PROBE_TIMEOUT_S = 5.0
"""A tracking server that does not answer its health check this fast counts as down; MLflow's own
client would otherwise retry for minutes before the first epoch."""

_GLOBAL_URI_LOCK = threading.RLock()
_PREPARED: set[str] = set()  # SQLite stores this process has opened (schema checked) once
_PREPARE_LOCK = threading.Lock()


class TrackingError(GeolocError):
    """The tracking server is unreachable or refused a request; the message says which (with
    any password in a URI masked)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(redact(str(message)))


def error_text(exc: BaseException) -> str:
    """One short line for logs and `summary.tracking.error` (server errors can be pages long;
    MLflow's messages name the request URL, password included: it is masked)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return redact(text.splitlines()[0])[:500] if text else type(exc).__name__


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """`explicit` (CLI flag or `tracking.tracking_uri`), else `MLFLOW_TRACKING_URI`, else
    `sqlite:///mlflow.db`; a relative SQLite path is made absolute so threads, subprocesses and
    a later `chdir` all reach the same file."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise `TrackingError` when an HTTP tracking server does not answer at all.

    Any HTTP answer counts as up (a proxy may hide `/health`); only refused connections and
    timeouts count as down. Local stores (SQLite, files) need no probe.
    """
    if not _is_http(uri):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingError(f"tracking server {uri} is unreachable ({type(exc).__name__})") from exc


def client_for(uri: str) -> MlflowClient:
    """An `MlflowClient` bound to `uri` (tracking and registry), independent of global state."""
    from mlflow import MlflowClient

    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    for store_uri in dict.fromkeys((uri, registry_uri)):
        prepare_store(store_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri)


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def prepare_store(uri: str) -> None:
    """Open a SQLite store once per process under an exclusive `<db>.lock`, so that concurrent
    first users (parallel trainings, syncs) take turns creating and migrating its schema.

    A store left half-migrated (by MLflow's own concurrent first use, before this lock) raises
    `TrackingError` with the fix instead of a migration traceback at every later sync.
    """
    path = sqlite_path(uri)
    if path is None or uri in _PREPARED:
        return
    from mlflow import MlflowClient

    with _PREPARE_LOCK, file_lock(path.with_name(path.name + ".lock")):
        if uri in _PREPARED:
            return
        _refuse_half_migrated(path, uri)
        try:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # creates/migrates the tracking tables
            client.search_registered_models(max_results=1)  # and the registry's
        except Exception as exc:
            _refuse_half_migrated(path, uri)
            raise TrackingError(
                f"MLflow store '{path}' cannot be opened: {error_text(exc)}"
            ) from exc
        _PREPARED.add(uri)


def _refuse_half_migrated(path: Path, uri: str) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ? ESCAPE '!'",
                ("!_alembic!_tmp!_%",),
            ).fetchall()
    except sqlite3.Error:
        return  # not a database MLflow made: MLflow's own error says so
    if rows:
        raise TrackingError(
            f"MLflow store '{path}' is half-migrated (table {rows[0][0]} left by an interrupted "
            f"schema upgrade): delete the file if it holds no runs yet, else drop its "
            f"_alembic_tmp_* tables and run `mlflow db upgrade {uri}`"
        )


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at `uri` for a fluent-only call, then restore
    it (the module global and the `MLFLOW_TRACKING_URI` variable MLflow mirrors it into)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        if mlflow.get_tracking_uri() == uri:
            yield
            return
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        global_before = tracking_utils._tracking_uri
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(global_before)  # None unsets the variable too
            if env_before is not None:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created (or restored from the bin) when needed; two processes
    creating it at once both end up with the same one."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, RUNS_VIEW_TAG: runs_view_state()}
            return client.create_experiment(name, tags=tags)
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if exp.tags.get(RUNS_VIEW_TAG) != runs_view_state():
        client.set_experiment_tag(exp.experiment_id, RUNS_VIEW_TAG, runs_view_state())
    return exp.experiment_id


def runs_view_state() -> str:
    """The shared view's state as the UI reads it (JSON): the key km metrics, then MLflow's
    default columns; every other setting stays the UI's default."""
    import json

    attributes = [f"attributes.`{name}`" for name in ("Source", "Models", "Dataset")]
    metrics = [f"metrics.`{name}`" for name in KEY_METRICS]
    return json.dumps({"selectedColumns": [*metrics, *attributes]})


def runs_page_of(mlflow_run_id: str | None, tracking_uri: str | None = None) -> str | None:
    """`runs_page_url` of the experiment holding `mlflow_run_id`; None when it cannot be found
    (nothing mirrored, the server down): a link is a courtesy, never an error."""
    if not mlflow_run_id:
        return None
    try:
        uri = resolve_tracking_uri(tracking_uri)
        probe(uri)
        return runs_page_url(client_for(uri).get_run(mlflow_run_id).info.experiment_id)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.debug("no runs page for %s: %s", mlflow_run_id, error_text(exc))
        return None


def run_page_of(mlflow_run_id: str | None, tracking_uri: str | None = None) -> str | None:
    """The run's page in the training view (`#/experiments/<id>/runs/<run>?workflowType=...`):
    MLflow's short `#/runs/<run>` route opens it in the GenAI view. None when not found."""
    if not mlflow_run_id:
        return None
    try:
        uri = resolve_tracking_uri(tracking_uri)
        probe(uri)
        exp_id = client_for(uri).get_run(mlflow_run_id).info.experiment_id
    except Exception as exc:  # noqa: BLE001 - a link is a courtesy, never an error
        log.debug("no run page for %s: %s", mlflow_run_id, error_text(exc))
        return None
    from geoloc.paths import mlflow_ui_url

    return (f"{mlflow_ui_url()}/#/experiments/{exp_id}/runs/{mlflow_run_id}"
            "?workflowType=machine_learning")  # fmt: skip


def runs_page_url(experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI, in its training view, with the key metric
    columns (the shared view above)."""
    from geoloc.paths import mlflow_ui_url

    return (f"{mlflow_ui_url()}/#/experiments/{experiment_id}/runs"
            f"?viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning")  # fmt: skip


def experiment_for(
    client: MlflowClient, name: str, parent_run_id: str | None
) -> tuple[str, str | None]:
    """(experiment id, parent run id to nest under). Children live in their parent's experiment
    (MLflow only nests runs within one); a parent this server does not know (the run is synced
    into another server than the sweep's) is dropped, and the run goes to `name`."""
    from mlflow.exceptions import MlflowException

    if parent_run_id:
        try:
            return client.get_run(parent_run_id).info.experiment_id, parent_run_id
        except MlflowException as exc:
            log.warning("parent MLflow run %s not found (%s); not nesting", parent_run_id,
                        error_text(exc))  # fmt: skip
    return ensure_experiment(client, name), None


def find_run(client: MlflowClient, experiment_id: str, geoloc_run_id: str) -> Run | None:
    """The MLflow run mirroring `geoloc_run_id` in the experiment (the oldest if a race ever
    created two), or None."""
    if "'" in geoloc_run_id:
        raise TrackingError(f"run id {geoloc_run_id!r} contains a quote")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_RUN_ID}` = '{geoloc_run_id}'",
        max_results=10,
        order_by=["attributes.start_time ASC"],
    )
    if len(runs) > 1:
        log.warning("%d MLflow runs carry %s=%s; using the oldest", len(runs), TAG_RUN_ID,
                    geoloc_run_id)  # fmt: skip
    return runs[0] if runs else None


def prefect_flow_run_id() -> str | None:
    """The Prefect flow run this process works for, from the environment Prefect sets."""
    for var in PREFECT_FLOW_RUN_ENV:
        value = os.environ.get(var)
        if value:
            return value
    return None
