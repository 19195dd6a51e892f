"""Orchestrator parameters -> validated config: what a Prefect form or a CLI `--set` names.

`run_config_from_params`: flat flow parameters + `overrides` -> a validated `RunConfig` (the same
`load_config` as `geoloc train --set`), before any work starts. `with_train_params` gives the
`train` flow its flat parameters, typed and described from the config's fields: `TRAIN_PARAMS`
is the only list of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from geoloc.config import IndexConfig, RunConfig, load_config, resolve_key
from geoloc.errors import ConfigError

# Flow parameter -> RunConfig key, for the keys people change most. Every other key goes through
# `overrides` (short or dotted names). `hardneg`/`rerank`/`tracking` switch whole sections.
# Order is the order of the flow's form.
TRAIN_PARAMS: dict[str, str] = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "loss": "train.loss",
    "tau_km": "train.tau_km",
    "arch": "model.arch",
    "width": "model.width",
    "hierarchy": "model.hierarchy",
    "hardneg": "hardneg.enabled",
    "image_size": "train.image_size",
    "max_steps_per_epoch": "train.max_steps_per_epoch",
    "device": "train.device",
    "seed": "seed",
    "name": "name",
    "rerank": "rerank.enabled",
    "tracking": "tracking.enabled",
}

F = TypeVar("F", bound=Callable[..., Any])
PARAMS_MARK = "{train_params}"
"""Where `with_train_params` writes the flat parameters' lines into the flow's docstring."""


def config_field(key: str) -> FieldInfo:
    """The pydantic field behind a dotted `RunConfig` key (`train.lr`)."""
    model: type[BaseModel] = RunConfig
    *sections, leaf = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]
    return model.model_fields[leaf]


def with_train_params(fn: F) -> F:
    """Give `fn(..., **params)` one keyword parameter per `TRAIN_PARAMS` name, typed like its
    config field with default None (keep the preset's value), and describe each in its docstring
    (at `PARAMS_MARK`) with the field's description: the flow's form follows the config."""
    sig = inspect.signature(fn, eval_str=True)  # real types: Prefect reads this signature as is
    fixed = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    flat = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=config_field(key).annotation | None)
        for name, key in TRAIN_PARAMS.items()
    ]  # fmt: skip
    first, rest = fixed[:1], fixed[1:]  # the preset, then the flat keys, then the rest
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest]
    fn.__signature__ = sig.replace(parameters=[*first, *flat, *rest])  # type: ignore[attr-defined]
    lines = [f"{name}: {config_field(key).description}" for name, key in TRAIN_PARAMS.items()]
    indent = "\n" + " " * 8
    fn.__doc__ = (fn.__doc__ or "").replace(PARAMS_MARK, indent.join(lines))
    return fn


def run_config_from_params(
    preset: str | None,
    params: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Resolve flow parameters into a `RunConfig`; raise `ConfigError` naming the bad key.

    `params` holds `TRAIN_PARAMS` names (None means "keep the preset's value"); `overrides`
    holds any config key. A key given both ways with different values is an error rather than
    a silent precedence rule.
    """
    merged: dict[str, Any] = {}
    for name, value in params.items():
        if name not in TRAIN_PARAMS:
            raise ConfigError(f"unknown train parameter '{name}'; known: {sorted(TRAIN_PARAMS)}")
        if value is not None:
            merged[TRAIN_PARAMS[name]] = value
    for key, value in (overrides or {}).items():
        dotted = resolve_key(RunConfig, key)
        if dotted in merged and merged[dotted] != value:
            raise ConfigError(
                f"config key '{dotted}' is set twice: {merged[dotted]!r} (parameter) and "
                f"{value!r} (overrides)"
            )
        merged[dotted] = value
    return load_config(preset or None, merged, model=RunConfig)


def index_config_from_params(
    preset: str | None, overrides: Mapping[str, Any] | None = None
) -> IndexConfig:
    """Resolve the index flow's config (a preset or file, plus overrides)."""
    return load_config(preset or None, dict(overrides or {}), model=IndexConfig)
