"""`geoloc mlflow ...`: mirror runs and the leaderboard into MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

mlflow_app = typer.Typer(help="Mirror runs into MLflow.", no_args_is_help=True)

ExperimentOption = Annotated[
    str | None,
    typer.Option("--experiment", "-e", help="MLflow experiment (default: the run's config)."),
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
    ),
]


@mlflow_app.command("sync")
def sync(
    run_dirs: Annotated[
        list[Path] | None,
        typer.Argument(help="Run directories (default: every run under $GEOLOC_RUNS_DIR)."),
    ] = None,
    experiment: ExperimentOption = None,
    tracking_uri: TrackingUriOption = None,
    model: Annotated[
        bool, typer.Option("--model/--no-model", help="Log the model (the geoloc pyfunc).")
    ] = True,
    register: Annotated[
        bool | None,
        typer.Option(
            "--register/--no-register",
            help="Register the model as `geoloc` (default: the run's tracking.register_model; "
            "auto registers a run that beats the champion).",
        ),
    ] = None,
) -> None:
    """Mirror existing runs into MLflow (idempotent: found by run id, updated, never duplicated)."""
    from geoloc.errors import redact
    from geoloc.integrations.mlflow import resolve_tracking_uri, sync_runs

    results = sync_runs(
        run_dirs or None, experiment=experiment, tracking_uri=tracking_uri, log_model=model,
        register=register,
    )
    if not results:
        typer.echo("no runs to sync")
        return
    for result in results:
        typer.echo(result.line())
    counts: dict[str, int] = {}
    for result in results:
        counts[result.action] = counts.get(result.action, 0) + 1
    order = ("created", "updated", "unchanged", "failed")
    typer.echo(
        ", ".join(f"{counts.get(a, 0)} {a}" for a in order)
        + f" -> {redact(resolve_tracking_uri(tracking_uri))}"
    )
    if counts.get("failed"):
        raise typer.Exit(1)


@mlflow_app.command("leaderboard")
def leaderboard(
    aggregate: Annotated[
        Path | None,
        typer.Argument(help="The _aggregate folder (default: $GEOLOC_RUNS_DIR/_aggregate)."),
    ] = None,
    experiment: Annotated[str, typer.Option("--experiment", "-e")] = "geoloc-leaderboard",
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Log the leaderboard written by `geoloc aggregate` on a `leaderboard` MLflow run."""
    from geoloc.integrations.mlflow import log_leaderboard

    run_id = log_leaderboard(aggregate, experiment=experiment, tracking_uri=tracking_uri)
    typer.echo(f"leaderboard run {run_id}")
