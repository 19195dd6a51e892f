"""`sweep` flow: an Optuna sweep whose trials each run the `train` flow as a subflow.

Every trial is a `train` child flow run in the UI and a full run under `runs/<run_id>/` (report,
dashboard, artifacts, MLflow child run of the sweep's parent). Settings are validated (space,
base config, storage) before any trial; the sweep summary is published as artifacts.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import geoloc.integrations.optuna
from flows._artifacts import publish_link, publish_table
from flows.train import train_fn
from geoloc.integrations.optuna import SweepConfig, SweepResult
from geoloc.paths import runs_url
from geoloc.presentation.digest import served_link_line, table_records


@task(name="validate-sweep", cache_policy=NO_CACHE)
def validate_sweep(settings: dict[str, Any]) -> SweepConfig:
    return geoloc.integrations.optuna.check_sweep(settings)


def publish_sweep(result: SweepResult) -> None:
    """The trials table, the best params and the sweep folder `runs/_sweeps/<study>/`: linked
    where `geoloc serve` publishes it (`GEOLOC_DASHBOARD_URL`; browsers refuse `file://` links
    from a web page), else named by its path."""
    columns = tuple(str(c) for c in result.trials.columns)
    publish_table(
        "geoloc-sweep-trials",
        table_records(result.trials, columns) if len(result.trials) else [],
        f"Trials of study {result.study_name}",
    )
    url = runs_url(result.out_dir)
    url = f"{url}/" if url else None  # the folder's listing: trials.csv, summary.md, plots...
    where = served_link_line("sweep folder", result.out_dir, f"_sweeps/{result.out_dir.name}/", url)
    create_markdown_artifact(
        key="geoloc-sweep-best",
        markdown=geoloc.integrations.optuna.best_markdown(result.best) + "\n" + where + "\n",
        description=f"Best of study {result.study_name}",
    )
    publish_link(
        "geoloc-sweep-summary", url, f"sweep summary of {result.study_name}",
        "trials.csv, best.json, summary.md and plots, served by `geoloc serve`.",
    )  # fmt: skip


@flow(name="sweep", log_prints=True)
def sweep(
    n_trials: int = 10,
    study: str = "geoloc-sweep",
    storage: str | None = None,
    objective: Literal["p90", "multi"] = "p90",
    pruner: Literal["median", "hyperband", "threshold", "none"] = "median",
    prune_metric: str = "val_p90_km",
    prune_threshold: float | None = None,
    space: list[dict[str, Any]] | None = None,
    seed: int = 0,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `n_trials` trials of an Optuna study (created, or resumed when it exists).

    Args:
        n_trials: Trials this flow run adds to the study.
        study: Study name; the same name and storage resume it (or share it between workers).
        storage: Optuna storage URL (default: sqlite under $GEOLOC_RUNS_DIR/_sweeps).
        objective: p90 (minimise val P90 km) or multi (top-1 vs P90 km, Pareto front).
        pruner: median, hyperband, threshold or none.
        prune_metric: Per-epoch metric the pruner watches (lower is better).
        prune_threshold: Threshold pruner: stop a trial whose metric is above this.
        space: Search space, a list of {key, type, low, high, log, choices} (default: built-in).
        seed: Seed of the sampler.
        preset: Base training config: a preset or a YAML/JSON file.
        overrides: Config keys fixed for every trial, e.g. {"epochs": 3}.
    """
    settings: dict[str, Any] = {
        "n_trials": n_trials,
        "study": study,
        "storage": storage,
        "objective": objective,
        "pruner": pruner,
        "prune_metric": prune_metric,
        "prune_threshold": prune_threshold,
        "sampler_seed": seed,
        "base_config": preset,
        "base_overrides": overrides or {},
    }
    if space is not None:
        settings["space"] = space
    cfg = validate_sweep(settings)
    # in the flow body, not a task: each trial's `train` call becomes a child flow run
    result = geoloc.integrations.optuna.run_sweep(cfg, train_fn=train_fn)
    publish_sweep(result)
    return {
        "study": result.study_name,
        "storage": result.storage,
        "states": result.trials["state"].value_counts().to_dict() if len(result.trials) else {},
        "best": result.best,
        "out_dir": str(result.out_dir),
        "mlflow_run_id": result.mlflow_run_id,
    }
