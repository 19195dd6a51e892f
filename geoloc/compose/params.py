"""Orchestrator parameters -> validated config: what a Prefect form or a CLI `--set` names.

`run_config_from_params`: flat flow parameters + `overrides` -> a validated `RunConfig` (the same
`load_config` as `geoloc train --set`), before any work starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from geoloc.config import IndexConfig, RunConfig, load_config, resolve_key
from geoloc.errors import ConfigError

# Flow parameter -> RunConfig key, for the keys people change most. Every other key goes through
# `overrides` (short or dotted names). `hardneg`/`rerank`/`tracking` switch whole sections.
TRAIN_PARAMS: dict[str, str] = {
    "name": "name",
    "seed": "seed",
    "arch": "model.arch",
    "width": "model.width",
    "hierarchy": "model.hierarchy",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "loss": "train.loss",
    "tau_km": "train.tau_km",
    "image_size": "train.image_size",
    "max_steps_per_epoch": "train.max_steps_per_epoch",
    "device": "train.device",
    "hardneg": "hardneg.enabled",
    "rerank": "rerank.enabled",
    "tracking": "tracking.enabled",
}


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
