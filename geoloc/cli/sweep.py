"""`geoloc sweep`."""

from __future__ import annotations

import typer

from geoloc.cli._common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def _cmd() -> None:
        """Optuna sweep over training configs."""
        not_yet("sweep")
