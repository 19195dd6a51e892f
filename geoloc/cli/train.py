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
        register_model: Annotated[
            bool,
            typer.Option(
                "--register",
                help="Register the model as `geoloc` even when it does not beat the champion "
                "(tracking.register_model=true; the default, auto, registers only winners).",
            ),
        ] = False,
    ) -> None:
        """Train a model and write runs/<run_id>/, then rerank, report and mirror it (as the
        `train` flow does); prints the run directory last. Under torchrun every process is a
        rank (`torchrun --nproc_per_node N -m geoloc train ...`)."""

        from geoloc.compose.training import is_main_process, run_training
        from geoloc.compute import torchrun_env
        from geoloc.config import load_config
        from geoloc.errors import GeolocError
        from geoloc.runfolder.layout import RunPaths

        if resume is not None and config is None:
            run_config = RunPaths(resume).config
            if not run_config.is_file():
                raise GeolocError(f"--resume '{resume}': no config.json (not a run directory)")
            config = str(run_config)
        env = torchrun_env()
        world = env.world_size if nproc is None and env.launched else None  # torchrun's ranks
        extra = [f"train.nproc={nproc or world}"] if (nproc or world) else []
        if register_model:
            extra.append("tracking.register_model=true")
        cfg = load_config(config, [*(overrides or []), *extra])
        run_dir = run_training(cfg, resume=resume)
        if is_main_process():
            typer.echo(str(run_dir))
