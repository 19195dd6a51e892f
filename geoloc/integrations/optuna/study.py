"""Where a study lives and how it samples: the shared storage, the per-trial seeded TPE sampler,
the pruner, and creating or resuming the study (several processes or machines may share it).
A SQLite storage is opened under an exclusive `<db>.lock`: Optuna creates its tables on first
use, and concurrent first users would otherwise collide in that."""

from __future__ import annotations

import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.errors import redact
from geoloc.integrations.optuna.settings import SweepConfig, SweepError, prunes
from geoloc.locks import file_lock
from geoloc.paths import sweeps_dir

if TYPE_CHECKING:
    import optuna


OPTUNA_STORAGE_ENV = "GEOLOC_OPTUNA_STORAGE"


def default_storage() -> str:
    """`GEOLOC_OPTUNA_STORAGE` (set for the workers of the production stack), else a SQLite
    file under `runs/_sweeps/`."""
    return os.environ.get(OPTUNA_STORAGE_ENV) or f"sqlite:///{sweeps_dir() / 'optuna.db'}"


def open_storage(url: str) -> Any:
    """Connect to the storage now, so an unreachable URL fails before any trial."""
    import optuna

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    lock: AbstractContextManager[Any] = nullcontext()
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        db.parent.mkdir(parents=True, exist_ok=True)
        # several workers on one file: wait for the write lock instead of failing after 5 s
        engine_kwargs["connect_args"] = {"timeout": 60}
        lock = file_lock(db.with_name(db.name + ".lock"))
    try:
        with lock, warnings.catch_warnings():
            # heartbeats (experimental in Optuna) let a live worker fail the trials of a dead one
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=180
            )
    except Exception as exc:  # sqlalchemy errors, missing drivers, bad URLs
        raise SweepError(
            f"optuna storage '{redact(url)}' is unreachable: {redact(str(exc))}"
        ) from exc


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
        study = optuna.create_study(
            study_name=cfg.study,
            storage=storage,
            sampler=trial_sampler(cfg.sampler_seed),
            pruner=pruner,
            load_if_exists=True,
            **kwargs,
        )
    except ValueError as exc:  # e.g. the stored study has other directions
        raise SweepError(f"study '{cfg.study}' cannot be resumed: {exc}") from exc
    names = metric_names(cfg)
    if study.metric_names != names:  # optuna-dashboard's axis labels instead of "Objective 0"
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2: one line per sweep
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study


def metric_names(cfg: SweepConfig) -> list[str]:
    """The objective(s) by name, in the order `objective_values` returns them."""
    return ["best_val_top1", "best_val_p90_km"] if cfg.objective == "multi" else ["best_val_p90_km"]
