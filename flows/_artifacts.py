"""Prefect artifacts shared by the flows: what a flow run page shows about its results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from geoloc.runs.digest import run_digest


def _cell(value: Any) -> Any:
    # NaN/inf are not JSON; the UI shows null as empty
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def publish_run(run_dir: Path) -> dict[str, Any]:
    """Link to the run's dashboard.html, a markdown summary and a key-metrics table.

    Returns the run digest (run id, status, metrics...) so the flow can return it too.
    """
    digest = run_digest(run_dir)
    if digest["dashboard"]:
        create_link_artifact(
            key="geoloc-run-dashboard",
            link=Path(digest["dashboard"]).as_uri(),
            link_text=f"dashboard of {digest['run_id']}",
            description="The run's dashboard.html (open on the machine that holds the run).",
        )
    create_markdown_artifact(
        key="geoloc-run-summary", markdown=digest["markdown"], description="Run summary"
    )
    create_table_artifact(
        key="geoloc-run-metrics",
        table=[{"metric": k, "value": _cell(v)} for k, v in digest["metrics"].items()],
        description=f"Key metrics of {digest['run_id']} (from summary.json)",
    )
    return {k: v for k, v in digest.items() if k != "markdown"}


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact from records, with non-finite numbers blanked."""
    table = [{k: _cell(v) for k, v in row.items()} for row in rows]
    create_table_artifact(key=key, table=table, description=description)
