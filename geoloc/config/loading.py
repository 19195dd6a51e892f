"""Loading a configuration: a YAML/JSON file (or a preset name) over the defaults, then
`key=value` overrides; saving it whole; flattening it for MLflow params."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from geoloc.config.sections import RunConfig
from geoloc.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

M = TypeVar("M", bound=BaseModel)


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaf_paths(ann, (*prefix, name)))
        else:
            out[(*prefix, name)] = field
    return out


def flat_keys(model: type[BaseModel]) -> dict[str, str]:
    """Short key -> dotted key, for every leaf whose name is unique across sections."""
    by_leaf: dict[str, list[str]] = {}
    for path in _leaf_paths(model):
        by_leaf.setdefault(path[-1], []).append(".".join(path))
    return {leaf: paths[0] for leaf, paths in by_leaf.items() if len(paths) == 1}


def resolve_key(model: type[BaseModel], key: str) -> str:
    """Map a short or dotted key to its dotted path; unknown or ambiguous keys are errors."""
    leaves = {".".join(p) for p in _leaf_paths(model)}
    if key in leaves:
        return key
    by_leaf: dict[str, list[str]] = {}
    for path in _leaf_paths(model):
        by_leaf.setdefault(path[-1], []).append(".".join(path))
    if key in by_leaf:
        if len(by_leaf[key]) == 1:
            return by_leaf[key][0]
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {sorted(by_leaf[key])}")
    raise ConfigError(
        f"unknown config key '{key}' for {model.__name__}; valid keys: {', '.join(sorted(by_leaf))}"
    )


def _parse_value(raw: Any) -> Any:
    """`--set` values are YAML scalars/lists: `2`, `1e-3`, `true`, `null`, `[1, 2]`, `geosoft`."""
    if not isinstance(raw, str):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse `key=value` strings from the command line."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def presets(model: type[BaseModel]) -> list[str]:
    """Names of the presets shipped for a config model (`geoloc/presets/<kind>/<name>.yaml`)."""
    folder = PRESETS_DIR / _preset_kind(model)
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _preset_kind(model: type[BaseModel]) -> str:
    return model.__name__.removesuffix("Config").lower()


def _read_file(path: str | Path, model: type[BaseModel]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        # a bare name is a preset: `--config geosoft` -> geoloc/presets/run/geosoft.yaml
        preset = PRESETS_DIR / _preset_kind(model) / f"{p.name}.yaml"
        if p.suffix == "" and preset.is_file():
            p = preset
        else:
            known = ", ".join(presets(model)) or "none"
            raise ConfigError(
                f"config file '{path}' does not exist (presets for {model.__name__}: {known})"
            )
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file '{path}' could not be parsed: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping, not {type(data).__name__}")
    return data


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"invalid {model.__name__} from {source}: " + "; ".join(parts)


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    model: type[M] = RunConfig,  # type: ignore[assignment]
) -> M:
    """Defaults <- file (YAML/JSON, or a preset name) <- overrides; validated, strict.

    `overrides` is a mapping of short/dotted keys to values, or `key=value` strings.
    """
    tree: dict[str, Any] = _read_file(path, model) if path else {}
    if overrides is not None:
        ov = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        for key, value in ov.items():
            _set_path(tree, resolve_key(model, key), _parse_value(value))
    source = f"'{path}'" if path else "overrides"
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(model, exc, source)) from exc


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Save the resolved config whole (atomically)."""
    from geoloc.atomic import write_json

    write_json(path, cfg.model_dump(mode="json"))


def flatten(cfg: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config, e.g. for MLflow params."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{dotted}."))
        else:
            out[dotted] = value
    return out
