"""`geoloc train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoloc.cli._common import ConfigOption, SetOption


def register(app: typer.Typer) -> None:
    @app.command("train")
    def _cmd(
        config: ConfigOption = None,
        overrides: SetOption = None,
        resume: Annotated[
            Path | None,
            typer.Option(
                "--resume",
                help="Continue an interrupted run from RUN_DIR/checkpoints/last.pt (its "
                "config.json is the base config unless --config is given).",
                metavar="RUN_DIR",
            ),
        ] = None,
        nproc: Annotated[
            int | None,
            typer.Option(
                "--nproc",
                min=1,
                help="Processes for DistributedDataParallel on this host (train.nproc; gloo on "
                "CPU, NCCL on GPU); --set train.batch_size is the global batch.",
            ),
        ] = None,
    ) -> None:
        """Train a model and write runs/<run_id>/; prints the run directory last."""
        from geoloc.config import load_config
        from geoloc.errors import GeolocError
        from geoloc.runs.layout import RunPaths
        from geoloc.train.run import train_run

        if resume is not None and config is None:
            run_config = RunPaths(resume).config
            if not run_config.is_file():
                raise GeolocError(f"--resume '{resume}': no config.json (not a run directory)")
            config = str(run_config)
        extra = [f"train.nproc={nproc}"] if nproc is not None else []
        cfg = load_config(config, [*(overrides or []), *extra])
        run_dir = train_run(cfg, resume=resume)
        typer.echo(str(run_dir))
