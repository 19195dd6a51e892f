"""`pipeline` flow: index -> train (rerank evaluation, report) -> aggregate, as subflows.

Each step is the flow of its own deployment, so a pipeline run shows the same tasks, caching and
artifacts as running the steps one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows._artifacts import publish_leaderboard, publish_run
from flows.aggregate import aggregate
from flows.index import index
from flows.train import train


@flow(name="pipeline", log_prints=True)
def pipeline(
    source: str = "demo",
    index_preset: str | None = "demo",
    index_overrides: dict[str, Any] | None = None,
    demo_n: int = 12000,
    preset: str | None = "demo",
    epochs: int | None = None,
    tracking: bool | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the index, train one run on it, and refresh the leaderboard.

    Args:
        source: Index source: `demo`, a folder, a manifest, `s3://...` or `mapillary:...`.
        index_preset: Index config preset or file.
        index_overrides: Any other IndexConfig key.
        demo_n: Number of demo images (source=demo).
        preset: Training config preset or file.
        epochs: Training epochs (default: the preset's).
        tracking: Mirror the run and the leaderboard into MLflow (default: the preset's).
        overrides: Any other RunConfig key, short or dotted.
    """
    built = index(
        source=source, index_preset=index_preset, overrides=index_overrides, demo_n=demo_n
    )
    run = train(preset=preset, epochs=epochs, tracking=tracking, overrides=overrides,
                leaderboard=False)  # fmt: skip
    board = aggregate(tracking=tracking is not False)
    publish_run(Path(run["run_dir"]))  # the run's links and numbers on the pipeline's page too
    publish_leaderboard(board)
    return {"index": built, "run": run, "leaderboard": board}


def main() -> None:
    """`python -m flows.pipeline` (what `make demo` runs): the whole chain on the demo data,
    then where to look. Without PREFECT_API_URL, Prefect runs it on a temporary local server;
    with `make up` running, the flow run shows in the Prefect UI."""
    import os

    # as infra/stack.sh: the temporary server's telemetry heartbeat fails offline or on a busy
    # SQLite file and prints a traceback in the middle of the demo
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from geoloc.errors import redact
    from geoloc.integrations.mlflow import runs_page_of
    from geoloc.paths import aggregate_dir

    result = pipeline()
    run = result["run"]
    board = aggregate_dir() / "dashboard.html"
    tracking_uri = redact(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    lines = [
        "",
        f"run:          {run['run_dir']} ({run['status']})",
        f"dashboard:    {run.get('dashboard') or 'not written'}",
        f"report:       {Path(run['run_dir']) / 'REPORT.md'}",
        f"leaderboard:  {board}",
        f"over HTTP:    .venv/bin/geoloc serve  (http://127.0.0.1:8765/{Path(run['run_dir']).name}"
        "/dashboard.html, http://127.0.0.1:8765/_aggregate/dashboard.html)",
        f"MLflow UI:    make mlflow-ui   (tracking store {tracking_uri}), then",
        f"  runs:       {runs_page_of(run.get('mlflow_run_id')) or 'not mirrored'}",
        f"  this run:   {run.get('mlflow_url') or 'not mirrored'}",
        "Prefect UI:   make up          (server, work pool, deployments and a worker;"
        " http://127.0.0.1:4200)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
