"""`train` flow: one training run, then rerank evaluation, report, MLflow sync, artifacts and
the refreshed leaderboard (`aggregate` as a subflow; `leaderboard=False` skips it).

Parameters are the `RunConfig` of `geoloc train`: flat ones for common keys (a form in the UI),
`preset` for the base config and `overrides` for any other key; all of them are validated by
`geoloc.config.load_config` before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._artifacts import publish_leaderboard, publish_run
from flows.aggregate import aggregate
from geoloc.compose.params import run_config_from_params, with_train_params
from geoloc.compose.training import RETRYABLE_STEPS, run_training
from geoloc.config import RunConfig, flatten
from geoloc.progress import EpochCallback


@task(name="validate-config", cache_policy=NO_CACHE)
def validate_config(
    preset: str | None, params: dict[str, Any], overrides: dict[str, Any] | None
) -> RunConfig:
    return run_config_from_params(preset, params, overrides)


def as_task(name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run one composer step as a Prefect task; only the remote-I/O steps are retried."""
    retries = 2 if name in RETRYABLE_STEPS else 0
    unit = task(name=name, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=5)(fn)
    return unit(*args, **kwargs)


@flow(name="train", log_prints=True)
@with_train_params
def train(
    preset: str | None = "geosoft",
    overrides: dict[str, Any] | None = None,
    run_dir: str | None = None,
    leaderboard: bool = True,
    callbacks: list[Any] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Train one model on the canonical index and publish its results.

    Args:
        preset: Base config: a preset (geosoft, ce, demo) or a YAML/JSON file.
        {train_params}
        overrides: Any other config key, short or dotted, e.g. {"train.warmup_epochs": 1}.
        run_dir: Write the run here instead of $GEOLOC_RUNS_DIR/<new run id>.
        leaderboard: Then refresh the leaderboard (the `aggregate` flow, as a subflow).
        callbacks: In-process only (sweeps): callables (epoch, metrics) after each epoch.
    """
    cfg = validate_config(preset, params, overrides)
    # train -> rerank -> report -> MLflow sync, each step a task (geoloc.compose)
    out = run_training(cfg, run_dir=Path(run_dir) if run_dir else None,
                       callbacks=callbacks or (), progress=False, step=as_task)  # fmt: skip
    published = publish_run(out)
    if leaderboard:
        published["leaderboard"] = aggregate(tracking=cfg.tracking.enabled)
        publish_leaderboard(published["leaderboard"])
    return published


def train_fn(
    cfg: RunConfig, *, run_dir: Path | None = None, callbacks: Sequence[EpochCallback] = ()
) -> Path:
    """`geoloc.compose.training.run_training`'s signature, run as the `train` flow (a subflow).

    Sweeps pass it as `run_sweep(cfg, train_fn=train_fn)`: every trial becomes a `train` flow
    run with its rerank evaluation, report and artifacts.
    """
    result = train(
        preset=None,
        overrides=flatten(cfg),
        run_dir=str(run_dir) if run_dir else None,
        leaderboard=False,  # not per trial: `aggregate/nightly` or `geoloc aggregate` ranks them
        callbacks=list(callbacks),
    )
    return Path(result["run_dir"])
