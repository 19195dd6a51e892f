"""Prefect artifacts shared by the flows: what a flow run page shows about its results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from geoloc.integrations.mlflow import run_page_of
from geoloc.presentation.digest import run_digest
from geoloc.runfolder.summary import read_summary


def _cell(value: Any) -> Any:
    # NaN/inf are not JSON; the UI shows null as empty
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mlflow_run_id(run_dir: Path) -> str | None:
    """The MLflow run the run folder was mirrored to (summary.json `tracking`), if any."""
    return (read_summary(run_dir).get("tracking") or {}).get("mlflow_run_id")


def publish_run(run_dir: Path) -> dict[str, Any]:
    """A markdown page of the run (result after rerank beside the model alone, training, where
    to look) and, when `GEOLOC_DASHBOARD_URL` says where `geoloc serve` publishes the runs, a
    link to its dashboard (browsers do not open `file://` links from a web page).

    Returns the run digest (run id, status, metrics...) so the flow can return it too.
    """
    digest = run_digest(run_dir, mlflow_url=run_page_of(mlflow_run_id(run_dir)))
    create_markdown_artifact(
        key="geoloc-run-summary",
        markdown=digest["markdown"],
        description=f"Run {digest['run_id']}: result and where to look",
    )
    if digest["dashboard_url"]:
        create_link_artifact(
            key="geoloc-run-dashboard",
            link=digest["dashboard_url"],
            link_text=f"dashboard of {digest['run_id']}",
            description="The run's dashboard.html, served by `geoloc serve`.",
        )
    if digest["mlflow_url"]:
        create_link_artifact(
            key="geoloc-mlflow-run",
            link=digest["mlflow_url"],
            link_text=f"MLflow run {digest['mlflow_run_id']}",
            description="The run in the MLflow UI (params, metric charts, the logged model).",
        )
    return {k: v for k, v in digest.items() if k != "markdown"}


def publish_link(key: str, url: str | None, text: str, description: str) -> None:
    """A link artifact when there is a web address for it (nothing for a bare file path)."""
    if url:
        create_link_artifact(key=key, link=url, link_text=text, description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact from records, with non-finite numbers blanked."""
    table = [{k: _cell(v) for k, v in row.items()} for row in rows]
    create_table_artifact(key=key, table=table, description=description)


def publish_leaderboard(board: dict[str, Any]) -> None:
    """The leaderboard table that an `aggregate` subflow returned, on the calling flow run's
    page too (a train or pipeline run shows where its run landed without opening the subflow)."""
    if board.get("table") is not None:
        publish_table("geoloc-leaderboard", board["table"], board.get("description", ""))
