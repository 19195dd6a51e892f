"""Pipeline-level helpers for orchestrators: parameters -> config, stage fingerprints, run digests.

Prefect flows (`flows/`) are thin wiring; what they need beyond the stage functions lives here,
free of any orchestrator, so it is tested by plain calls and reusable from another scheduler:

- `run_config_from_params`: flat flow parameters + `overrides` -> a validated `RunConfig`
  (the same `load_config` as `geoloc train --set`), before any work starts.
- `demo_key` / `ingest_key` / `index_key`: cache keys of the index stages, from the
  fingerprints of their inputs, so an orchestrator skips a stage whose inputs did not change.
- `run_digest`: the few numbers and links a run page shows (Prefect artifacts).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import geoloc
from geoloc.config import IndexConfig, RunConfig, load_config, resolve_key
from geoloc.errors import ConfigError
from geoloc.paths import DataPaths
from geoloc.runs.layout import RunPaths

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


# --------------------------------------------------------------------------------------------
# Fingerprints and stage cache keys
# --------------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def tree_fingerprint(root: Path) -> str:
    """Fingerprint of a file or folder from names, sizes and mtimes (stat only, no reads).

    Cheap enough to run before every stage; a touched or added file changes it. `missing`
    when the path does not exist, so a later appearance changes the key too.
    """
    root = Path(root)
    if not root.exists():
        return "missing"
    if root.is_file():
        st = root.stat()
        return _digest([root.name, st.st_size, st.st_mtime_ns])
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.stat()
            entries.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return _digest(entries)


def file_sha256(path: Path) -> str:
    """Content hash of one file (`missing` when absent); for small canonical files."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_remote_source(spec: str) -> bool:
    """Whether ingesting `spec` goes over the network (object storage, HTTP APIs)."""
    return "://" in spec or spec.startswith("mapillary:")


def source_fingerprint(spec: str, paths: DataPaths) -> str | None:
    """What a local ingestion source holds now (by stat); None for a remote source.

    `demo` is the demo folder of `paths`. Remote sources (s3://, http(s)://, mapillary:) cannot
    be fingerprinted without listing them, which is most of ingestion's work; they are never
    cached (ingestion itself resumes and skips what it already fetched).
    """
    if spec == "demo":
        return tree_fingerprint(paths.demo)
    if is_remote_source(spec):
        return None
    prefixed = spec.startswith(("folder:", "manifest:", "demo:"))
    return tree_fingerprint(Path(spec.split(":", 1)[1] if prefixed else spec))


def _config_dump(cfg: BaseModel | None) -> Any:
    return cfg.model_dump(mode="json") if cfg is not None else None


def demo_key(out_dir: Path, n: int, seed: int, sigma_deg: float) -> str:
    """Cache key of the demo generator: its parameters and where it writes."""
    return _digest(["demo", geoloc.__version__, str(Path(out_dir).resolve()), n, seed, sigma_deg])


def ingest_key(
    spec: str, paths: DataPaths, cfg: IndexConfig, options: Mapping[str, Any] | None = None
) -> str | None:
    """Cache key of ingestion + processing: the source's content, the options, the config.

    None (never cached) for remote sources, whose content is unknown until listed.
    """
    source = source_fingerprint(spec, paths)
    if source is None:
        return None
    return _digest(
        [
            "ingest",
            geoloc.__version__,
            str(paths.root.resolve()),
            spec,
            source,
            dict(options or {}),
            _config_dump(cfg),
        ]
    )


def index_key(paths: DataPaths, cfg: IndexConfig) -> str:
    """Cache key of the index build: the processed manifest's content and the config."""
    return _digest(
        [
            "index",
            geoloc.__version__,
            str(paths.root.resolve()),
            file_sha256(paths.processed_manifest),
            tree_fingerprint(paths.external),
            _config_dump(cfg),
        ]
    )


def stage_cache_dir(paths: DataPaths) -> Path:
    """Where an orchestrator keeps stage cache records: with the data they describe."""
    return paths.state / "stage-cache"


def stage_outputs_present(stage: str, paths: DataPaths, demo_dir: Path | None = None) -> bool:
    """Whether a stage's outputs are on disk; a cached stage whose outputs vanished must rerun."""
    if stage == "demo":
        folder = Path(demo_dir or paths.demo)
        return folder.is_dir() and any(folder.iterdir())
    if stage == "ingest":
        return paths.processed_manifest.is_file()
    if stage == "index":
        return all(p.is_file() for p in (paths.images, paths.splits, paths.labels))
    raise ValueError(f"unknown stage '{stage}'")


# --------------------------------------------------------------------------------------------
# What a run page shows
# --------------------------------------------------------------------------------------------


def run_digest(run_dir: Path) -> dict[str, Any]:
    """Key facts and metrics of a finished run, from its summary.json (never re-derived).

    Returns `run_id`, `run_dir`, `status`, `failure_reason`, `dashboard` (path or None),
    `mlflow_run_id`, `metrics` (name -> value, headline numbers first) and `markdown`.
    """
    from geoloc.runs.summary import read_summary

    rp = RunPaths(Path(run_dir))
    s = read_summary(rp.root)
    test = s.get("test") or {}
    rerank = s.get("rerank") or {}
    metrics: dict[str, Any] = {
        "epochs_completed": s.get("epochs_completed"),
        "best_epoch": s.get("best_epoch"),
        "best_val_acc": s.get("best_val_acc"),
        "best_p90_km": s.get("best_p90_km"),
        "last_geo_median_km": s.get("last_geo_median_km"),
    }
    for key in ("test_top1", "test_median_km", "test_p90_km", "test_acc_25km", "test_geoscore"):
        metrics[key] = test.get(key)
    for key, value in (rerank.get("metrics") or {}).items():
        metrics[f"rerank_{key}"] = value
    dataset = s.get("dataset") or {}
    lines = [
        f"# Run `{s['run_id']}`",
        "",
        f"- status: **{s['status']}**"
        + (f" ({s['failure_reason']})" if s.get("failure_reason") else ""),
        f"- run directory: `{rp.root}`",
        f"- dashboard: `{rp.dashboard}`" if rp.dashboard.is_file() else "- dashboard: not written",
        f"- dataset fingerprint: `{dataset.get('fingerprint')}` "
        f"({dataset.get('num_classes')} classes)",
        f"- rerank variant: `{rerank.get('variant')}`" if rerank else "- rerank: not evaluated",
        f"- MLflow run: `{(s.get('tracking') or {}).get('mlflow_run_id')}`",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {k} | {_fmt(v)} |" for k, v in metrics.items()),
    ]
    return {
        "run_id": s["run_id"],
        "run_dir": str(rp.root),
        "status": s["status"],
        "failure_reason": s.get("failure_reason"),
        "dashboard": str(rp.dashboard) if rp.dashboard.is_file() else None,
        "mlflow_run_id": (s.get("tracking") or {}).get("mlflow_run_id"),
        "metrics": metrics,
        "markdown": "\n".join(lines) + "\n",
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


LEADERBOARD_COLUMNS = (
    "rank",
    "run_id",
    "status",
    "score",
    "best_val_acc",
    "best_p90_km",
    "last_geo_median_km",
    "test_top1",
    "arch",
    "loss",
    "skip_reason",
)


def table_records(
    df: Any, columns: tuple[str, ...] = LEADERBOARD_COLUMNS, limit: int | None = None
) -> list[dict[str, Any]]:
    """JSON-safe rows of a DataFrame (NaN -> None, numpy -> Python), present columns only."""
    keep = [c for c in columns if c in df.columns]
    part = df[keep] if limit is None else df[keep].head(limit)
    return json.loads(part.to_json(orient="records"))
