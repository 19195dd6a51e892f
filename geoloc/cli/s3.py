"""`geoloc s3 ...`."""

from __future__ import annotations

import typer

from geoloc.cli._common import not_yet

s3_app = typer.Typer(
    help="Move runs and the data index to S3-compatible storage.", no_args_is_help=True
)


@s3_app.command("push")
def push() -> None:
    """Upload a run directory or the index."""
    not_yet("s3 push")


@s3_app.command("pull")
def pull() -> None:
    """Download a run directory or the index."""
    not_yet("s3 pull")
