"""Helpers shared by the CLI sub-modules (not by the library)."""

from __future__ import annotations

from typing import Annotated

import typer

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: key=value (repeatable)."),
]
ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config", "-c", help="YAML/JSON config file, or a preset name (demo, geosoft, ce)."
    ),
]
