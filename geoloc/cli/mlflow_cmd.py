"""`geoloc mlflow ...`."""

from __future__ import annotations

import typer

from geoloc.cli._common import not_yet

mlflow_app = typer.Typer(help="Mirror runs into MLflow.", no_args_is_help=True)


@mlflow_app.command("sync")
def sync() -> None:
    """Mirror existing runs into MLflow (idempotent)."""
    not_yet("mlflow sync")
