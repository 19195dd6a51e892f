"""`geoloc train`."""

from __future__ import annotations

import typer

from geoloc.cli._common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("train")
    def _cmd() -> None:
        """Train a model and write runs/<run_id>/."""
        not_yet("train")
