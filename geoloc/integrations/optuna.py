"""Optuna sweeps over training configs (library side: no Prefect).

A sweep is a search space over `RunConfig` keys, an objective read from each trial's
`summary.json`, and an Optuna study in a storage that several processes or machines share.
Every trial is a full run under `runs/<run_id>/`; pruned trials leave a run with
`status: pruned`; crashed trials are marked failed with their reason and the sweep goes on.

The function that trains one config is injected (`TrainFn`): the CLI passes
`geoloc.train.run.train_run`, the Prefect `sweep` flow passes one that runs the `train` flow as a
subflow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from geoloc.atomic import write_json, write_parquet, write_text
from geoloc.config import RunConfig, _format_validation, _Strict, load_config, resolve_key
from geoloc.errors import ConfigError, GeolocError, TrialPruned
from geoloc.paths import runs_dir, sweeps_dir
from geoloc.runs.layout import RunPaths, new_run_id

if TYPE_CHECKING:
    import optuna
    import pandas as pd

log = logging.getLogger(__name__)

TrainFn = Callable[..., Path]
"""`train_fn(cfg, *, run_dir, callbacks) -> run_dir`, like `geoloc.train.run.train_run`."""


class SweepError(GeolocError):
    """A sweep that cannot start: empty/inconsistent space, unreachable storage."""


class ParamSpec(_Strict):
    """One searched config key."""

    key: str = Field(description="RunConfig key, short (`lr`) or dotted (`train.lr`).")
    type: Literal["float", "int", "categorical", "bool"] = Field(description="Distribution.")
    low: float | None = Field(None, description="Lower bound (float/int).")
    high: float | None = Field(None, description="Upper bound (float/int).")
    log: bool = Field(False, description="Sample on a log scale (float/int).")
    choices: list[Any] | None = Field(None, description="Values (categorical).")

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type in ("float", "int"):
            if self.low is None or self.high is None:
                raise ValueError(f"{self.key}: {self.type} needs low and high")
            if not self.low < self.high:
                raise ValueError(f"{self.key}: low ({self.low}) must be < high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"{self.key}: a log scale needs low > 0")
        if self.type == "categorical" and not self.choices:
            raise ValueError(f"{self.key}: categorical needs at least one choice")
        return self

    def suggest(self, trial: optuna.Trial) -> Any:
        name = self.key
        if self.type == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log)  # type: ignore[arg-type]
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        if self.type == "bool":
            return trial.suggest_categorical(name, [False, True])
        return trial.suggest_categorical(name, list(self.choices or []))

    def extremes(self) -> list[Any]:
        """The values that bound this spec, to validate them against RunConfig up front."""
        if self.type in ("float", "int"):
            cast = float if self.type == "float" else int
            return [cast(self.low), cast(self.high)]  # type: ignore[arg-type]
        if self.type == "bool":
            return [False, True]
        return list(self.choices or [])


def default_space() -> list[ParamSpec]:
    """The issue's default space: lr, weight decay, GeoSoft tau, hard-negative share,
    hierarchy on/off, model width."""
    return [
        ParamSpec(key="lr", type="float", low=3e-4, high=1e-2, log=True),
        ParamSpec(key="weight_decay", type="float", low=1e-6, high=1e-2, log=True),
        ParamSpec(key="tau_km", type="float", low=50.0, high=800.0, log=True),
        ParamSpec(key="share", type="float", low=0.0, high=0.5),
        ParamSpec(key="hierarchy", type="bool"),
        ParamSpec(key="width", type="categorical", choices=[16, 32, 48]),
    ]


PRUNE_METRICS = (
    "val_p90_km", "val_p95_km", "val_median_km", "val_loss", "train_loss",
)  # fmt: skip
"""Per-epoch metrics a pruner may watch: studies minimise, so lower must be better."""


class SweepConfig(_Strict):
    """What to search, how to score it, and where the study lives."""

    study: str = Field("geoloc-sweep", min_length=1, description="Study name.")
    storage: str | None = Field(
        None,
        description="Optuna storage URL (any SQLAlchemy URL); default "
        "sqlite:///$GEOLOC_RUNS_DIR/_sweeps/optuna.db.",
    )
    n_trials: int = Field(
        10,
        ge=0,
        description="Trials this process runs (0: only create or resume the study, e.g. before "
        "starting workers on a shared storage, and write its summary).",
    )
    objective: Literal["p90", "multi"] = Field(
        "p90",
        description="p90: minimise best val P90 km; multi: maximise best val top-1 and "
        "minimise best val P90 km (Pareto front).",
    )
    pruner: Literal["median", "hyperband", "threshold", "none"] = Field(
        "median",
        description="median/hyperband: stop trials worse than their peers at the same epoch; "
        "threshold: stop any trial whose prune_metric exceeds prune_threshold (diverging runs).",
    )
    prune_metric: str = Field(
        "val_p90_km", description="Per-epoch metric the pruner sees (lower must be better)."
    )
    prune_threshold: float | None = Field(
        None, description="Upper bound of prune_metric for the threshold pruner."
    )
    sampler_seed: int = Field(0, description="Seed of the TPE sampler.")
    base_config: str | None = Field(None, description="Base RunConfig file or preset.")
    base_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Fixed for every trial, e.g. {'epochs': 3}."
    )
    space: list[ParamSpec] = Field(default_factory=default_space, description="Search space.")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.study):
            raise ValueError("study may hold only letters, digits, '_', '.' and '-'")
        if self.prune_metric not in PRUNE_METRICS:
            raise ValueError(
                f"prune_metric '{self.prune_metric}' is not a per-epoch metric where lower is "
                f"better; valid: {', '.join(PRUNE_METRICS)}"
            )
        if self.pruner == "threshold" and self.prune_threshold is None:
            raise ValueError("the threshold pruner needs prune_threshold")
        return self


@dataclass
class SweepResult:
    """What a sweep process leaves: the study's trials table, best trial(s), summary files."""

    study_name: str
    storage: str
    trials: pd.DataFrame
    best: dict[str, Any]
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    mlflow_run_id: str | None = None


# ------------------------------------------------------------------------------------------
# validation: one clear error before any trial starts
# ------------------------------------------------------------------------------------------


def sweep_config(fields: Mapping[str, Any]) -> SweepConfig:
    """`SweepConfig` from CLI options or flow parameters; bad values are one `SweepError` line."""
    try:
        return SweepConfig.model_validate(dict(fields))
    except ValidationError as exc:
        raise SweepError(_format_validation(SweepConfig, exc, "the sweep settings")) from exc


OPTUNA_STORAGE_ENV = "GEOLOC_OPTUNA_STORAGE"


def default_storage() -> str:
    """`GEOLOC_OPTUNA_STORAGE` (set for the workers of the production stack), else a SQLite
    file under `runs/_sweeps/`."""
    return os.environ.get(OPTUNA_STORAGE_ENV) or f"sqlite:///{sweeps_dir() / 'optuna.db'}"


def redact(url: str) -> str:
    """Hide a password in a storage URL before it reaches a message or a log."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def prunes(cfg: SweepConfig) -> bool:
    """Whether trials of this sweep can be stopped early (multi-objective studies cannot)."""
    return cfg.objective != "multi" and cfg.pruner != "none"


def validate_sweep(cfg: SweepConfig) -> RunConfig:
    """Check the space against RunConfig and return the base config; raise `SweepError`."""
    if not cfg.space:
        raise SweepError("the search space is empty: give at least one parameter")
    seen: dict[str, str] = {}
    try:
        base = load_config(cfg.base_config, cfg.base_overrides)
    except ConfigError as exc:
        raise SweepError(f"base config of the sweep is invalid: {exc}") from exc
    nprocs = {base.train.nproc}
    for spec in cfg.space:
        try:
            dotted = resolve_key(RunConfig, spec.key)
        except ConfigError as exc:
            raise SweepError(f"search space: {exc}") from exc
        if dotted in seen:
            raise SweepError(f"search space: '{spec.key}' and '{seen[dotted]}' set the same key")
        seen[dotted] = spec.key
        if dotted in {resolve_key(RunConfig, k) for k in cfg.base_overrides}:
            raise SweepError(f"search space: '{spec.key}' is both searched and fixed by --set")
        for value in spec.extremes():
            try:
                load_config(cfg.base_config, {**cfg.base_overrides, dotted: value})
            except ConfigError as exc:
                raise SweepError(
                    f"search space: {spec.key}={value!r} is not a valid value: {exc}"
                ) from exc
        if dotted == "train.nproc":
            nprocs.update(int(v) for v in spec.extremes())
    if prunes(cfg) and max(nprocs) > 1:
        # the pruning callback lives in this process; distributed ranks cannot call it
        raise SweepError(
            f"train.nproc={max(nprocs)} cannot be pruned (epoch callbacks need train.nproc=1): "
            "use --pruner none, or scale the sweep out with more workers instead"
        )
    if cfg.objective == "multi" and cfg.pruner != "none":
        log.info("multi-objective studies cannot prune; pruning is off for this sweep")
    return base


def open_storage(url: str) -> Any:
    """Connect to the storage now, so an unreachable URL fails before any trial."""
    import optuna

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # several workers on one file: wait for the write lock instead of failing after 5 s
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        with warnings.catch_warnings():
            # heartbeats (experimental in Optuna) let a live worker fail the trials of a dead one
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=180
            )
    except Exception as exc:  # sqlalchemy errors, missing drivers, bad URLs
        raise SweepError(f"optuna storage '{redact(url)}' is unreachable: {exc}") from exc


def trial_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """TPE whose random stream is re-seeded from `(seed, trial number)` before every trial.

    One seeded TPE per process would replay the same first proposals in every process: a
    resumed study or a second worker would re-run the configs of trials 0, 1, ... Seeding per
    trial number keeps a sweep reproducible and every trial's proposal its own.
    """
    import optuna

    class _PerTrialSeededTPE(optuna.samplers.TPESampler):
        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            trial_seed = (seed * 1_000_003 + trial.number) % 2**32
            try:
                self._rng.rng.seed(trial_seed)
                self._random_sampler._rng.rng.seed(trial_seed)
            except AttributeError:  # Optuna internals moved: still distinct, no longer seeded
                self.reseed_rng()
            super().before_trial(study, trial)

    return _PerTrialSeededTPE(seed=seed)


def create_study(cfg: SweepConfig) -> optuna.Study:
    """Create or resume (`load_if_exists`) the study; several processes may share it."""
    import optuna

    storage = open_storage(cfg.storage or default_storage())
    if not prunes(cfg):
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    elif cfg.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1)
    elif cfg.pruner == "threshold":
        pruner = optuna.pruners.ThresholdPruner(upper=cfg.prune_threshold)
    else:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    kwargs: dict[str, Any] = (
        {"directions": ["maximize", "minimize"]}
        if cfg.objective == "multi"
        else {"direction": "minimize"}
    )
    try:
        return optuna.create_study(
            study_name=cfg.study,
            storage=storage,
            sampler=trial_sampler(cfg.sampler_seed),
            pruner=pruner,
            load_if_exists=True,
            **kwargs,
        )
    except ValueError as exc:  # e.g. the stored study has other directions
        raise SweepError(f"study '{cfg.study}' cannot be resumed: {exc}") from exc


# ------------------------------------------------------------------------------------------
# one trial
# ------------------------------------------------------------------------------------------


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

    from geoloc.runs.summary import read_summary

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
    summary = read_summary(run_dir)
    if summary.get("status") == "pruned":
        raise optuna.TrialPruned(summary.get("failure_reason") or "pruned")
    return objective_values(summary, cfg.objective)


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
    train_fn: TrainFn | None = None,
    parent_run_id: str | None = None,
) -> SweepResult:
    """Validate, open/resume the study, run `n_trials` trials, write the sweep summary.

    With tracking on in the base config, trials are children of the sweep's MLflow parent run
    (`parent_run_id`, else found or created by study name) and the summary files are logged on
    it. `train_fn` defaults to `geoloc.train.run.train_run`.
    """
    base = validate_sweep(cfg)
    study = create_study(cfg)
    if train_fn is None:
        from geoloc.train.run import train_run

        train_fn = train_run
    parent = parent_run_id or parent_run(cfg, base)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        return run_trial(trial, cfg, train_fn, parent)

    study.set_user_attr("objective", cfg.objective)
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


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value(s), params, run id/dir/dashboard, reason."""
    import pandas as pd

    multi = len(study.directions) > 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        if multi:
            vals = t.values or [None, None]
            row["val_top1"], row["val_p90_km"] = vals[0], vals[1]
        else:
            row["value"] = t.value
        row.update({f"param_{k}": v for k, v in t.params.items()})
        run_dir = t.user_attrs.get("run_dir")
        dashboard = RunPaths(Path(run_dir)).dashboard if run_dir else None
        row["run_id"] = t.user_attrs.get("run_id")
        # a trial that crashed before its run started has no dashboard to link
        row["dashboard"] = str(dashboard) if dashboard and dashboard.is_file() else None
        row["reason"] = t.user_attrs.get("reason") or t.system_attrs.get("fail_reason")
        row["duration_s"] = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(row)
    return pd.DataFrame(rows)


def best_of(study: optuna.Study) -> dict[str, Any]:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return {"trials_complete": 0}
    if len(study.directions) > 1:
        front = study.best_trials
        return {
            "trials_complete": len(complete),
            "pareto_front": [
                {
                    "number": t.number,
                    "val_top1": t.values[0],
                    "val_p90_km": t.values[1],
                    "params": t.params,
                    "run_id": t.user_attrs.get("run_id"),
                }
                for t in front
            ],
        }
    best = study.best_trial
    return {
        "trials_complete": len(complete),
        "number": best.number,
        "value": best.value,
        "params": best.params,
        "run_id": best.user_attrs.get("run_id"),
    }


def write_sweep_summary(study: optuna.Study, cfg: SweepConfig) -> SweepResult:
    """`runs/_sweeps/<study>/`: trials.csv/.parquet, best.json, summary.md and plots."""
    out = sweeps_dir() / study.study_name
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    best = best_of(study)
    files = [out / "trials.csv", out / "trials.parquet", out / "best.json", out / "summary.md"]
    write_text(files[0], table.to_csv(index=False))
    write_parquet(files[1], table)
    write_json(files[2], best)
    from geoloc.runs.report import plot_sweep

    files += plot_sweep(study, out)
    write_text(files[3], sweep_markdown(study.study_name, cfg, table, best, files[4:]))
    return SweepResult(
        study_name=study.study_name,
        storage=redact(cfg.storage or default_storage()),
        trials=table,
        best=best,
        out_dir=out,
        files=files,
    )


def best_markdown(best: Mapping[str, Any]) -> str:
    """The best trial (or the Pareto front of a multi-objective study) as markdown."""
    if not best.get("trials_complete"):
        return "No trial has completed yet.\n"
    if "pareto_front" in best:
        lines = [
            f"Pareto front (maximise val top-1, minimise val P90 km) of "
            f"{best['trials_complete']} complete trials:",
            "",
            "| trial | val_top1 | val_p90_km | run | params |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {t['number']} | {t['val_top1']:.4f} | {t['val_p90_km']:.1f} | {t['run_id']} | "
            f"`{json.dumps(t['params'], default=str)}` |"
            for t in best["pareto_front"]
        ]
        return "\n".join(lines) + "\n"
    lines = [
        f"Best of {best['trials_complete']} complete trials: trial {best['number']}, "
        f"best val P90 **{best['value']:.1f} km**, run `{best['run_id']}`.",
        "",
        "| param | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in best["params"].items()]
    return "\n".join(lines) + "\n"


def sweep_markdown(
    name: str, cfg: SweepConfig, table: pd.DataFrame, best: dict[str, Any], plots: Sequence[Path]
) -> str:
    """summary.md: objective, storage, trial counts, best trial(s), the trials table, plots."""
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    lines = [
        f"# Sweep `{name}`",
        "",
        f"Objective: **{cfg.objective}** · storage `{redact(cfg.storage or default_storage())}`",
        "",
        "Trials: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())),
        "",
        "## Best",
        "",
        best_markdown(best),
        "## Trials",
        "",
        table.to_markdown(index=False) if len(table) else "(none)",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
