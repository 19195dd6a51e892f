"""Mirroring a run directory after the fact: `sync_run` for one, `sync_runs` for many.

The run directory is the source of truth; a sync finds the run by its `geoloc.run_id` tag and
adds what MLflow lacks, so running it again changes nothing. `summary.tracking` records the
outcome, so a run whose live mirror failed is caught up by `geoloc mlflow sync` later.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.errors import GeolocError, redact
from geoloc.integrations.mlflow.contents import (
    dataset_input,
    final_points,
    history_points,
    read_config,
    run_params,
    run_tags,
    tracking_config,
)
from geoloc.integrations.mlflow.registry import sync_model, update_champion
from geoloc.integrations.mlflow.store import (
    TrackingError,
    client_for,
    error_text,
    experiment_for,
    probe,
    resolve_tracking_uri,
)
from geoloc.integrations.mlflow.writers import (
    open_run,
    sync_artifacts,
    sync_inputs,
    sync_metrics,
    sync_params,
    sync_status,
    sync_tags,
)
from geoloc.locks import file_lock
from geoloc.paths import runs_dir
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary, settle_abandoned, update_summary

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

SYNC_LOCK = ".sync.lock"
"""Held while a run folder is mirrored (one sync of a run at a time on this host)."""


@dataclass
class SyncResult:
    """What `sync_run` did: `action` is created, updated, unchanged or failed."""

    run_dir: Path
    run_id: str
    action: str
    mlflow_run_id: str | None = None
    changes: list[str] = field(default_factory=list)
    model_version: str | None = None
    error: str | None = None

    def line(self) -> str:
        """One line for the CLI (a password in a URI of the error is masked)."""
        what = f" ({', '.join(self.changes)})" if self.changes else ""
        where = f" mlflow={self.mlflow_run_id}" if self.mlflow_run_id else ""
        err = f": {self.error}" if self.error else ""
        return redact(f"{self.action:9s} {self.run_id}{where}{what}{err}")


def record_tracking(
    run_dir: Path, mirrored: bool, mlflow_run_id: str | None, error: str | None
) -> None:
    """Write `summary.tracking` when it changes (an unchanged summary keeps re-syncs no-ops).

    A failure that never reached the MLflow run (`mlflow_run_id` None) keeps the id already
    recorded, so the next sync still knows which run to resume; the error text is redacted.
    """
    new = {"mirrored": mirrored, "mlflow_run_id": mlflow_run_id,
           "error": None if error is None else redact(error)}  # fmt: skip
    try:
        current = read_summary(Path(run_dir)).get("tracking")
        if new["mlflow_run_id"] is None and not mirrored and isinstance(current, dict):
            new["mlflow_run_id"] = current.get("mlflow_run_id")
        if current != new:
            update_summary(Path(run_dir), tracking=new)
    except GeolocError as exc:
        log.warning("could not record tracking state in %s: %s", run_dir, exc)


def sync_run(
    run_dir: Path,
    *,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    log_model: bool = True,
    register: bool | str | None = None,
    parent_run_id: str | None = None,
) -> SyncResult:
    """Mirror one run directory into MLflow (create or update; idempotent).

    Defaults come from the run's config.json `tracking` section. Raises `GeolocError` when the
    run has no usable summary or the tracking server fails; `summary.tracking` says the outcome,
    except for a run still `running`: its trainer owns summary.json (and mirrors it live), so a
    sync mirrors what is there and leaves the file alone.
    """
    run_dir = Path(run_dir).resolve()
    # concurrent syncs of one run take turns: the second finds the MLflow run and model version
    # the first recorded instead of creating its own
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(run_dir / SYNC_LOCK))
        except OSError as exc:  # a read-only run folder: nothing to race with on this side
            log.debug("no sync lock in %s (%s)", run_dir, exc)
        return _sync_run(run_dir, experiment, tracking_uri, log_model, register, parent_run_id)


def _sync_run(
    run_dir: Path, experiment: str | None, tracking_uri: str | None, log_model: bool,
    register: bool | None, parent_run_id: str | None,
) -> SyncResult:  # fmt: skip
    summary = read_summary(run_dir)
    config = read_config(run_dir)
    tcfg = tracking_config(config)
    uri = resolve_tracking_uri(tracking_uri or tcfg.tracking_uri)
    register = tcfg.register_model if register is None else register
    mlflow_run_id: str | None = None
    try:
        probe(uri)
        client = client_for(uri)
        exp_id, parent = experiment_for(
            client, experiment or tcfg.experiment, parent_run_id or tcfg.parent_run_id
        )
        run, created = open_run(client, exp_id, summary, run_dir, parent)
        mlflow_run_id = run.info.run_id
        result = SyncResult(run_dir, summary["run_id"], "created" if created else "updated",
                            mlflow_run_id)  # fmt: skip
        _mirror_contents(client, uri, run, run_dir, summary, config, log_model, register, result)
    except Exception as exc:
        if summary.get("status") != "running":
            record_tracking(run_dir, False, mlflow_run_id, error_text(exc))
        if isinstance(exc, GeolocError):
            raise
        raise TrackingError(
            f"mirroring {run_dir.name} into {uri} failed: {error_text(exc)}"
        ) from exc
    if not created and not result.changes:
        result.action = "unchanged"
    return result


def _mirror_contents(
    client: MlflowClient,
    uri: str,
    run: Run,
    run_dir: Path,
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    log_model: bool,
    register: bool | str,
    result: SyncResult,
) -> None:
    """Params, tags, metrics, model, status, then artifacts with summary.json last."""
    if n := sync_params(client, run, run_params(config)):
        result.changes.append(f"{n} params")
    if n := sync_tags(client, run, run_tags(run_dir, summary, config)):
        result.changes.append(f"{n} tags")
    if sync_inputs(client, run, dataset_input(summary, config)):
        result.changes.append("dataset")
    if n := sync_metrics(client, run, history_points(run_dir) + final_points(summary)):
        result.changes.append(f"{n} metric points")
    if log_model and summary.get("status") == "completed":
        try:
            version = sync_model(client, uri, run, run_dir, register, summary)
        except GeolocError as exc:  # a run without a loadable checkpoint is still mirrored
            log.warning("model of %s not logged: %s", run_dir, error_text(exc))
            version = None
        if version is not None:
            result.model_version = version
            result.changes.append(f"model v{version}")
        if register:
            update_champion(client)
    if sync_status(client, run, summary):
        result.changes.append(f"status {summary.get('status')}")
    # the local record first, so the uploaded summary.json already says `mirrored: true`
    if summary.get("status") != "running":
        record_tracking(run_dir, True, run.info.run_id, None)
    fresh = client.get_run(run.info.run_id)
    if sync_artifacts(client, fresh, run_dir):
        result.changes.append("artifacts")


def discover_runs(root: Path | None = None) -> list[Path]:
    """Run directories under `root` (default `$GEOLOC_RUNS_DIR`) that have a summary.json."""
    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        return []
    runs = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_")) and RunPaths(p).summary.is_file()
    )
    for run_dir in runs:  # a trainer killed before its end: `failed`, not `running` forever
        settle_abandoned(run_dir)
    return runs


def sync_runs(run_dirs: Iterable[Path] | None = None, **kwargs: Any) -> list[SyncResult]:
    """`sync_run` for each directory (default: every run under `$GEOLOC_RUNS_DIR`); a failure
    of one run is reported in its result and does not stop the others."""
    results = []
    for run_dir in discover_runs() if run_dirs is None else [Path(p) for p in run_dirs]:
        try:
            results.append(sync_run(run_dir, **kwargs))
        except GeolocError as exc:
            results.append(SyncResult(Path(run_dir), Path(run_dir).name, "failed", error=str(exc)))
    return results
