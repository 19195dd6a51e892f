"""Optuna sweeps over training configs (library side: no Prefect).

A sweep is a search space over `RunConfig` keys (`settings`), an Optuna study in a storage that
several processes or machines share (`study`), trials that are full runs scored from their
`summary.json` (`sweep`), and the files it leaves under `runs/_sweeps/<study>/` (`summary`).

Inside this package `import optuna` is the real Optuna (absolute imports).
"""

from geoloc.errors import redact
from geoloc.integrations.optuna.settings import (
    PRUNE_METRICS,
    ParamSpec,
    SweepConfig,
    SweepError,
    default_space,
    prunes,
    sweep_config,
    validate_sweep,
)
from geoloc.integrations.optuna.study import (
    OPTUNA_STORAGE_ENV,
    create_study,
    default_storage,
    open_storage,
    trial_sampler,
)
from geoloc.integrations.optuna.summary import (
    SweepResult,
    best_markdown,
    best_of,
    sweep_markdown,
    trials_table,
    write_sweep_summary,
)
from geoloc.integrations.optuna.sweep import (
    TrainFn,
    check_sweep,
    objective_values,
    parent_run,
    run_sweep,
    run_trial,
    trial_config,
)

__all__ = [
    "OPTUNA_STORAGE_ENV",
    "PRUNE_METRICS",
    "ParamSpec",
    "SweepConfig",
    "SweepError",
    "SweepResult",
    "TrainFn",
    "best_markdown",
    "best_of",
    "check_sweep",
    "create_study",
    "default_space",
    "default_storage",
    "objective_values",
    "open_storage",
    "parent_run",
    "prunes",
    "redact",
    "run_sweep",
    "run_trial",
    "sweep_config",
    "sweep_markdown",
    "trial_config",
    "trial_sampler",
    "trials_table",
    "validate_sweep",
    "write_sweep_summary",
]
