"""`geoloc sweep`: an Optuna sweep from the command line (the Prefect `sweep` flow does the same
with each trial as a `train` subflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from geoloc.cli._common import ConfigOption, SetOption
from geoloc.config import parse_overrides


def _load_space(path: Path) -> list[dict[str, Any]]:
    from geoloc.integrations.optuna import SweepError

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"search space file '{path}' could not be read: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("space", [])
    if not isinstance(data, list):
        raise SweepError(f"search space file '{path}' must hold a list of parameters")
    return data


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep(
        n_trials: Annotated[
            int,
            typer.Option(
                "--n-trials", "-n", help="Trials to run here (0: only create/resume the study)."
            ),
        ] = 10,
        config: ConfigOption = None,
        set_: SetOption = None,
        study: Annotated[str, typer.Option(help="Study name (resumes if it exists).")] = (
            "geoloc-sweep"
        ),
        storage: Annotated[
            str | None,
            typer.Option(help="Optuna storage URL (default: sqlite under runs/_sweeps)."),
        ] = None,
        objective: Annotated[str, typer.Option(help="p90 or multi (top-1 vs P90 km).")] = "p90",
        pruner: Annotated[
            str, typer.Option(help="median, hyperband, threshold or none.")
        ] = "median",
        prune_metric: Annotated[
            str, typer.Option(help="Per-epoch metric the pruner watches (lower is better).")
        ] = "val_p90_km",
        prune_threshold: Annotated[
            float | None, typer.Option(help="Threshold pruner: stop a trial above this value.")
        ] = None,
        space: Annotated[
            Path | None, typer.Option(help="YAML list of parameters (key, type, low, high...).")
        ] = None,
        seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    ) -> None:
        """Optuna sweep over training configs; every trial is a full run under runs/ (trained,
        reranked, reported and mirrored like `geoloc train`)."""
        from geoloc.compose.training import run_training
        from geoloc.integrations.optuna import run_sweep, sweep_config

        fields: dict[str, Any] = {
            "study": study,
            "storage": storage,
            "n_trials": n_trials,
            "objective": objective,
            "pruner": pruner,
            "prune_metric": prune_metric,
            "prune_threshold": prune_threshold,
            "sampler_seed": seed,
            "base_config": config,
            "base_overrides": parse_overrides(set_ or []),
        }
        if space is not None:
            fields["space"] = _load_space(space)
        result = run_sweep(sweep_config(fields), train_fn=run_training)
        table = result.trials
        typer.echo(table.to_string(index=False) if len(table) else "no trials")
        typer.echo(f"best: {result.best}")
        typer.echo(f"sweep summary: {result.out_dir}")
        if result.mlflow_run_id:
            typer.echo(f"MLflow parent run: {result.mlflow_run_id}")
        typer.echo(f"browse the study: optuna-dashboard {result.storage}")
