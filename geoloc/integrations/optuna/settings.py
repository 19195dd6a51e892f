"""What a sweep searches and how it is scored: `ParamSpec`, `SweepConfig`, and the checks that
turn a bad space or base config into one `SweepError` before any trial starts."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from geoloc.config import RunConfig, StrictModel, format_validation_error, load_config, resolve_key
from geoloc.errors import ConfigError, GeolocError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


class SweepError(GeolocError):
    """A sweep that cannot start: empty/inconsistent space, unreachable storage."""


class ParamSpec(StrictModel):
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


def space_for(base: RunConfig) -> list[ParamSpec]:
    """The default space without the knobs `base` does not use: a searched knob that changes
    nothing wastes trials and tops optuna-dashboard's importance plot with noise. Hard-negative
    `share` only when hard negatives oversample, `tau_km` only for the GeoSoft losses, `width`
    only for the multiscale CNN backbones, `hierarchy` only for the flat head (the factorised
    head always predicts the parent: hierarchy=false is an invalid trial)."""
    unused = set()
    if not (base.hardneg.enabled and base.hardneg.mode == "oversample"):
        unused.add("share")
    if base.model.head != "flat":
        unused.add("hierarchy")
    if not base.train.loss.startswith("geosoft"):
        unused.add("tau_km")
    if not base.model.arch.startswith("multiscale_cnn"):
        unused.add("width")
    return [spec for spec in default_space() if spec.key not in unused]


PRUNE_METRICS = (
    "val_p90_km", "val_p95_km", "val_median_km", "val_loss", "train_loss",
)  # fmt: skip
"""Per-epoch metrics a pruner may watch: studies minimise, so lower must be better."""


class SweepConfig(StrictModel):
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
    space: list[ParamSpec] = Field(
        default_factory=default_space,
        description="Search space (default: `default_space` less the knobs the base config "
        "does not use, `space_for`).",
    )

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
        if "space" not in self.model_fields_set:
            try:
                base = load_config(self.base_config, self.base_overrides)
            except ConfigError:
                return self  # validate_sweep reports the broken base config in one line
            self.space = space_for(base)
        return self


def sweep_config(fields: Mapping[str, Any]) -> SweepConfig:
    """`SweepConfig` from CLI options or flow parameters; bad values are one `SweepError` line."""
    try:
        return SweepConfig.model_validate(dict(fields))
    except ValidationError as exc:
        raise SweepError(format_validation_error(SweepConfig, exc, "the sweep settings")) from exc


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
