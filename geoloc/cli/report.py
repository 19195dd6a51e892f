"""`geoloc report`."""

from __future__ import annotations

import typer

from geoloc.cli._common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("report")
    def _cmd() -> None:
        """Write plots, REPORT.md and dashboard.html for a run."""
        not_yet("report")

    @app.command("aggregate")
    def _aggregate() -> None:
        """Rank all runs into runs/_aggregate/."""
        not_yet("aggregate")
