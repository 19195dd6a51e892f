"""Running a sweep: each trial trains one suggested config as a full run under
`runs/<run_id>/` and is scored from its `summary.json`; pruned trials leave a run with
`status: pruned`; crashed trials are marked failed with their reason and the sweep goes on.

The function that trains one config is injected (`TrainFn`): the CLI passes
`geoloc.train.run.train_run`, the Prefect `sweep` flow passes one that runs the `train` flow as a
subflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.config import RunConfig, load_config
from geoloc.errors import GeolocError, TrialPruned
from geoloc.integrations.optuna.settings import SweepConfig, prunes, sweep_config, validate_sweep
from geoloc.integrations.optuna.study import create_study
from geoloc.integrations.optuna.summary import SweepResult, write_sweep_summary
from geoloc.paths import runs_dir
from geoloc.runfolder.layout import new_run_id

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

TrainFn = Callable[..., Path]
"""`train_fn(cfg, *, run_dir, callbacks) -> run_dir`, like `geoloc.train.run.train_run`."""


def trial_config(trial: optuna.Trial, cfg: SweepConfig, parent_run_id: str | None) -> RunConfig:
    """Base config + fixed overrides + this trial's suggestions."""
    suggested = {spec.key: spec.suggest(trial) for spec in cfg.space}
    overrides: dict[str, Any] = {**cfg.base_overrides, **suggested}
    overrides["name"] = f"{cfg.study}-t{trial.number}"[:64]
    if parent_run_id:
        overrides["tracking.parent_run_id"] = parent_run_id
    return load_config(cfg.base_config, overrides)


def _pruning_callback(trial: optuna.Trial, metric: str) -> Callable[[int, dict], None]:
    def report(epoch: int, metrics: dict[str, Any]) -> None:
        value = metrics.get(metric)
        if value is None:
            return
        trial.report(float(value), step=epoch)
        if trial.should_prune():
            raise TrialPruned(f"pruned at epoch {epoch} ({metric}={float(value):.1f})")

    return report


def objective_values(summary: Mapping[str, Any], objective: str) -> float | tuple[float, float]:
    """The trial's value(s) from its summary.json."""
    p90, acc = summary.get("best_p90_km"), summary.get("best_val_acc")
    if p90 is None or (objective == "multi" and acc is None):
        raise GeolocError(f"run {summary.get('run_id')} has no validation metrics to score")
    return (float(acc), float(p90)) if objective == "multi" else float(p90)


def run_trial(
    trial: optuna.Trial,
    cfg: SweepConfig,
    train_fn: TrainFn,
    parent_run_id: str | None = None,
) -> float | tuple[float, float]:
    """Train one suggested config as a full run and return its objective value(s)."""
    import optuna

    from geoloc.runfolder.summary import read_summary

    run_cfg = trial_config(trial, cfg, parent_run_id)
    run_dir = runs_dir() / new_run_id(run_cfg.name)
    trial.set_user_attr("run_id", run_dir.name)
    trial.set_user_attr("run_dir", str(run_dir))
    # the per-epoch reports also feed optuna-dashboard's curves when nothing prunes, but
    # distributed runs (train.nproc > 1) take no epoch callbacks
    reports = cfg.objective != "multi" and (prunes(cfg) or run_cfg.train.nproc == 1)
    callbacks = [_pruning_callback(trial, cfg.prune_metric)] if reports else []
    try:
        train_fn(run_cfg, run_dir=run_dir, callbacks=callbacks)
    except TrialPruned as exc:
        trial.set_user_attr("reason", str(exc))
        raise optuna.TrialPruned(str(exc)) from exc
    except Exception as exc:
        trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        link_trial(trial, run_dir)
    summary = read_summary(run_dir)
    if summary.get("status") == "pruned":
        raise optuna.TrialPruned(summary.get("failure_reason") or "pruned")
    return objective_values(summary, cfg.objective)


def link_trial(trial: optuna.Trial, run_dir: Path) -> None:
    """Where to look at a trial, as its user attributes (optuna-dashboard lists them): the
    run's dashboard (web address under `geoloc serve`, else the file) and its MLflow run."""
    from geoloc.paths import mlflow_run_url, runs_url
    from geoloc.runfolder.layout import RunPaths
    from geoloc.runfolder.summary import read_summary

    rp = RunPaths(run_dir)
    if rp.dashboard.is_file():
        trial.set_user_attr("dashboard", runs_url(rp.dashboard) or str(rp.dashboard))
    try:
        tracking = read_summary(run_dir).get("tracking") or {}
    except GeolocError:
        return  # the run never started: no summary, nothing more to link
    if url := mlflow_run_url(tracking.get("mlflow_run_id")):
        trial.set_user_attr("mlflow_run", url)


def fixed_settings(cfg: SweepConfig, base: RunConfig) -> dict[str, Any]:
    """What every trial of the study shares (study user attributes): the base config, its
    overrides, the training length and the pruning, so a study says what its numbers mean."""
    return {
        "objective": cfg.objective,
        "base_config": cfg.base_config or "defaults",
        "base_overrides": dict(cfg.base_overrides),
        "searched": [p.key for p in cfg.space],
        "epochs": base.train.epochs,
        "max_steps_per_epoch": base.train.max_steps_per_epoch,
        "pruner": cfg.pruner,
        "runs_dir": str(runs_dir()),
    }


def parent_run(cfg: SweepConfig, base: RunConfig) -> str | None:
    """The sweep's MLflow parent run when the base config tracks (trials become its children);
    the same one for every worker and every resume of the study."""
    if not base.tracking.enabled:
        return None
    from geoloc.integrations.mlflow import sweep_parent_run

    return sweep_parent_run(cfg.study, base.tracking.experiment, base.tracking.tracking_uri)


def check_sweep(settings: SweepConfig | Mapping[str, Any]) -> SweepConfig:
    """Everything that can fail before a trial, as one `SweepError`: the settings, the space,
    the base config, the storage and resuming the study with this objective."""
    cfg = settings if isinstance(settings, SweepConfig) else sweep_config(settings)
    validate_sweep(cfg)
    create_study(cfg)
    return cfg


def run_sweep(
    cfg: SweepConfig,
    *,
    train_fn: TrainFn,
    parent_run_id: str | None = None,
) -> SweepResult:
    """Validate, open/resume the study, run `n_trials` trials, write the sweep summary.

    With tracking on in the base config, trials are children of the sweep's MLflow parent run
    (`parent_run_id`, else found or created by study name) and the summary files are logged on
    it. `train_fn` trains, reranks, reports and mirrors one trial: the composer's
    `geoloc.compose.training.run_training` (CLI) or the `train` flow (`flows.train.train_fn`).
    """
    base = validate_sweep(cfg)
    study = create_study(cfg)
    parent = parent_run_id or parent_run(cfg, base)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        return run_trial(trial, cfg, train_fn, parent)

    for key, value in fixed_settings(cfg, base).items():
        study.set_user_attr(key, value)
    try:
        # a crashed trial is recorded as FAIL with its reason; the sweep goes on
        study.optimize(objective, n_trials=cfg.n_trials, catch=(Exception,), gc_after_trial=True)
    except BaseException:
        # interrupted (Ctrl-C, a cancelled flow run): the summary still says where the study is
        try:
            write_sweep_summary(study, cfg)
        except Exception as exc:  # noqa: BLE001 - the interruption is what the caller must see
            log.warning("sweep summary of %s not written: %s", cfg.study, exc)
        raise
    result = write_sweep_summary(study, cfg)
    if parent is not None:
        from geoloc.integrations.mlflow import log_sweep_summary

        result.mlflow_run_id = parent
        log_sweep_summary(parent, result.files, base.tracking.tracking_uri)
    return result
