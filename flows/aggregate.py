"""`aggregate` flow: rank every run under $GEOLOC_RUNS_DIR, publish the leaderboard.

Writes `runs/_aggregate/` (CSV, Parquet, dashboard), a leaderboard table artifact and, when
tracking is on, the leaderboard in MLflow (the tracking server is the one I/O worth retrying).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import geoloc.integrations.mlflow
import geoloc.presentation.leaderboard
from flows._artifacts import publish_link, publish_table
from geoloc.paths import runs_url
from geoloc.presentation.digest import leaderboard_records
from geoloc.presentation.leaderboard_table import AggregateResult


@task(name="aggregate-runs", cache_policy=NO_CACHE)
def aggregate_runs(runs_root: Path | None) -> AggregateResult:
    return geoloc.presentation.leaderboard.aggregate_runs(runs_root)


@task(name="log-leaderboard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def log_leaderboard(result: AggregateResult) -> str:
    return geoloc.integrations.mlflow.log_leaderboard(result)


@flow(name="aggregate", log_prints=True)
def aggregate(runs_root: str | None = None, tracking: bool = True, top: int = 50) -> dict[str, Any]:
    """Rank the runs and publish the leaderboard.

    Args:
        runs_root: Folder of runs (default: $GEOLOC_RUNS_DIR).
        tracking: Also log the leaderboard to MLflow.
        top: Rows of the leaderboard table artifact.
    """
    result = aggregate_runs(Path(runs_root) if runs_root else None)
    records = leaderboard_records(result.table, limit=top)
    description = f"Leaderboard: {len(result.ranked)} ranked, {len(result.skipped)} skipped runs"
    publish_table("geoloc-leaderboard", records, description)
    if result.dashboard_path is not None:
        publish_link(
            "geoloc-leaderboard-dashboard",
            runs_url(result.dashboard_path),
            "leaderboard dashboard",
            "runs/_aggregate/dashboard.html, served by `geoloc serve`",
        )
    mlflow_run_id = None
    if tracking:
        # MLflow mirrors the files written above: its outage (after retries) is a warning
        logged = log_leaderboard(result, return_state=True)
        if logged.is_failed():
            get_run_logger().warning("MLflow leaderboard not logged: %s", logged.message)
        else:
            mlflow_run_id = logged.result()
    return {
        "ranked": len(result.ranked),
        "skipped": [{"run_id": s.run_id, "reason": s.reason} for s in result.skipped],
        "csv": str(result.csv_path) if result.csv_path else None,
        "mlflow_run_id": mlflow_run_id,
        "table": records,  # the calling flow shows it too (`publish_leaderboard`)
        "description": description,
    }
