"""`train` flow: one training run, then rerank evaluation, report, MLflow sync and artifacts.

Parameters are the `RunConfig` of `geoloc train`: flat ones for common keys (a form in the UI),
`preset` for the base config and `overrides` for any other key; all of them are validated by
`geoloc.config.load_config` before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import geoloc.infer.rerank
import geoloc.integrations.mlflow
import geoloc.runs.report
import geoloc.train.run
from flows._artifacts import publish_run
from geoloc.compose import TRAIN_PARAMS, run_config_from_params
from geoloc.config import RunConfig, flatten

EpochCallback = Callable[[int, dict[str, Any]], None]


@task(name="validate-config", cache_policy=NO_CACHE)
def validate_config(
    preset: str | None, params: dict[str, Any], overrides: dict[str, Any] | None
) -> RunConfig:
    return run_config_from_params(preset, params, overrides)


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(
    cfg: RunConfig, run_dir: Path | None, callbacks: Sequence[EpochCallback] = ()
) -> Path:
    return geoloc.train.run.train_run(cfg, run_dir=run_dir, callbacks=callbacks, progress=False)


@task(name="evaluate-rerank", cache_policy=NO_CACHE)
def evaluate_rerank(run_dir: Path, cfg: RunConfig) -> str:
    return geoloc.infer.rerank.rerank_run(
        run_dir, cfg=cfg.rerank, report=False, progress=False
    ).best_variant


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(run_dir: Path) -> None:
    geoloc.runs.report.write_report(run_dir)


# the tracking server is I/O: retry it, and only it
@task(name="sync-mlflow", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def sync_mlflow(run_dir: Path) -> str | None:
    return geoloc.integrations.mlflow.sync_run(run_dir).mlflow_run_id


@flow(name="train", log_prints=True)
def train(
    preset: str | None = "geosoft",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    loss: Literal["ce", "geosoft"] | None = None,
    tau_km: float | None = None,
    arch: str | None = None,
    width: int | None = None,
    hierarchy: bool | None = None,
    hardneg: bool | None = None,
    image_size: int | None = None,
    max_steps_per_epoch: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    name: str | None = None,
    rerank: bool | None = None,
    tracking: bool | None = None,
    overrides: dict[str, Any] | None = None,
    run_dir: str | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train one model on the canonical index and publish its results.

    Args:
        preset: Base config: a preset (geosoft, ce, demo) or a YAML/JSON file.
        epochs: Training epochs.
        batch_size: Global batch size.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        loss: Loss on the child head.
        tau_km: GeoSoft temperature in km.
        arch: Backbone from the model registry.
        width: MultiScaleCNN channels of the first stage.
        hierarchy: Train a parent head jointly with the child head.
        hardneg: Hard-negative oversampling on/off.
        image_size: Model input side in pixels.
        max_steps_per_epoch: Cap on steps per epoch (0: no cap).
        device: auto, cpu, cuda or cuda:N.
        seed: Seed of the run.
        name: Human name of the run.
        rerank: Evaluate reranking after training.
        tracking: Mirror the run into MLflow.
        overrides: Any other config key, short or dotted, e.g. {"train.warmup_epochs": 1}.
        run_dir: Write the run here instead of $GEOLOC_RUNS_DIR/<new run id>.
        callbacks: In-process only (sweeps): callables (epoch, metrics) after each epoch.
    """
    params = {k: v for k, v in locals().items() if k in TRAIN_PARAMS}
    cfg = validate_config(preset, params, overrides)
    out = train_model(cfg, Path(run_dir) if run_dir else None, callbacks or ())
    if cfg.rerank.enabled:
        evaluate_rerank(out, cfg)
    write_report(out)
    if cfg.tracking.enabled:
        # after rerank and report: the MLflow run gets the final summary and files. A tracking
        # outage (after retries) never turns a finished run into a failed flow run; the error
        # is in summary.json `tracking.error`, and `geoloc mlflow sync` catches up later.
        synced = sync_mlflow(out, return_state=True)
        if synced.is_failed():
            get_run_logger().warning("MLflow sync failed: %s", synced.message)
    return publish_run(out)


def train_fn(
    cfg: RunConfig, *, run_dir: Path | None = None, callbacks: Sequence[EpochCallback] = ()
) -> Path:
    """`geoloc.train.run.train_run`'s signature, run as the `train` flow (a subflow inside a flow).

    Sweeps pass it as `geoloc.integrations.optuna.run_sweep(cfg, train_fn=train_fn)`: every trial becomes a
    `train` flow run with its rerank evaluation, report and artifacts.
    """
    result = train(
        preset=None,
        overrides=flatten(cfg),
        run_dir=str(run_dir) if run_dir else None,
        callbacks=list(callbacks),
    )
    return Path(result["run_dir"])
