"""`geoloc data ...` and `geoloc index ...`."""

from __future__ import annotations

import typer

from geoloc.cli._common import not_yet

data_app = typer.Typer(
    help="Get images with GPS into data/raw -> data/processed.", no_args_is_help=True
)
index_app = typer.Typer(
    help="Build the canonical H3 index under data/index/.", no_args_is_help=True
)


@data_app.command("demo")
def demo() -> None:
    """Write the offline demo dataset (Blue Marble crops at GeoNames cities)."""
    not_yet("data demo")


@data_app.command("ingest")
def ingest(source: str) -> None:
    """Ingest SOURCE: a folder, a CSV/Parquet manifest, s3://bucket/prefix or mapillary:bbox."""
    not_yet("data ingest")


@index_app.command("build")
def build() -> None:
    """Build images/splits/labels/h3_features under data/index/."""
    not_yet("index build")
