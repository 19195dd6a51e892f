"""A sweep's parent run in MLflow: trials nest under it (`tracking.parent_run_id`), its summary
files are logged on it. A sweep never fails for the mirror: every call here returns None/False
and logs a warning instead of raising."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from geoloc.integrations.mlflow.store import (
    TAG_KIND,
    TAG_PREFECT_FLOW_RUN,
    TAG_SWEEP,
    TrackingError,
    client_for,
    ensure_experiment,
    error_text,
    prefect_flow_run_id,
    probe,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)


def start_parent_run(
    name: str,
    experiment: str = "geoloc",
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str | None:
    """Create a parent run (a sweep) whose children are the trial runs (`tracking.parent_run_id`).

    Returns its id, or None when tracking is unavailable.
    """
    try:
        uri = resolve_tracking_uri(tracking_uri)
        probe(uri)
        client = client_for(uri)
        exp_id = ensure_experiment(client, experiment)
        all_tags = {TAG_KIND: "parent", **{k: str(v) for k, v in (tags or {}).items()}}
        if flow_run := prefect_flow_run_id():
            all_tags[TAG_PREFECT_FLOW_RUN] = flow_run
        return client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow parent run %s not created: %s", name, error_text(exc))
        return None


def end_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> bool:
    """Terminate an MLflow run by id (a sweep's parent when the sweep ends); False on failure."""
    try:
        client_for(resolve_tracking_uri(tracking_uri)).set_terminated(run_id, status=status)
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow run %s not terminated: %s", run_id, error_text(exc))
        return False


def sweep_parent_run(
    study: str, experiment: str = "geoloc", tracking_uri: str | None = None
) -> str | None:
    """The parent run of sweep `study`: found by its `geoloc.sweep` tag, so a resumed study or a
    second worker adds its trials under the same parent, else created. None when tracking is
    unavailable."""
    try:
        uri = resolve_tracking_uri(tracking_uri)
        probe(uri)
        client = client_for(uri)
        if "'" in study:
            raise TrackingError(f"study name {study!r} contains a quote")
        found = client.search_runs(
            [ensure_experiment(client, experiment)],
            filter_string=f"tags.`{TAG_SWEEP}` = '{study}' and tags.`{TAG_KIND}` = 'parent'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow parent run of sweep %s unavailable: %s", study, error_text(exc))
        return None
    if found:
        return found[0].info.run_id
    return start_parent_run(
        f"sweep-{study}", experiment, tags={TAG_SWEEP: study}, tracking_uri=tracking_uri
    )


def log_sweep_summary(
    parent_run_id: str, files: Sequence[Path], tracking_uri: str | None = None
) -> bool:
    """Log a sweep's summary files (trials table, best.json, summary.md, plots) under `sweep/`
    on its parent run and mark it finished; False (and a warning) when the mirror fails."""
    try:
        client = client_for(resolve_tracking_uri(tracking_uri))
        for path in files:
            if Path(path).is_file():
                client.log_artifact(parent_run_id, str(path), "sweep")
        client.set_terminated(parent_run_id, status="FINISHED")
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("sweep summary not logged on MLflow run %s: %s", parent_run_id,
                    error_text(exc))  # fmt: skip
        return False
