"""Typed configuration, one model per concern, and one way to load it.

`load_config(path, overrides)` merges a YAML (or JSON) file over the defaults, then `key=value`
overrides from the CLI (`--set`) or Prefect flow parameters. Keys may be dotted
(`train.epochs`) or flat and short (`epochs`) when the leaf name is unique across sections.
Unknown keys are errors. The resolved model is saved whole as a run's `config.json`.

The sections live in `sections.py`, loading and overrides in `loading.py`.
"""

from geoloc.config.loading import (
    PRESETS_DIR,
    flat_keys,
    flatten,
    format_validation_error,
    load_config,
    parse_overrides,
    presets,
    resolve_key,
    save_config,
)
from geoloc.config.sections import (
    TRACKING_PASSWORD_ENV,
    TRACKING_USERNAME_ENV,
    HardNegConfig,
    IndexConfig,
    ModelConfig,
    RerankConfig,
    RunConfig,
    StrictModel,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS_DIR",
    "TRACKING_PASSWORD_ENV",
    "TRACKING_USERNAME_ENV",
    "HardNegConfig",
    "IndexConfig",
    "ModelConfig",
    "RerankConfig",
    "RunConfig",
    "StrictModel",
    "TrackingConfig",
    "TrainConfig",
    "flat_keys",
    "flatten",
    "format_validation_error",
    "load_config",
    "parse_overrides",
    "presets",
    "resolve_key",
    "save_config",
]
