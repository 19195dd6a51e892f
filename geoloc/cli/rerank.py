"""`geoloc rerank`."""

from __future__ import annotations

import typer

from geoloc.cli._common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("rerank")
    def _cmd() -> None:
        """Rerank evaluation of a run."""
        not_yet("rerank")

    @app.command("predict")
    def _predict() -> None:
        """Predict locations for images with a trained run."""
        not_yet("predict")
