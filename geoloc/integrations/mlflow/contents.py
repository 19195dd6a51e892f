"""What a run directory says, as MLflow wants it: params, tags, metric points, artifact files.

Pure functions of the files (and the environment, for the Prefect tag): nothing here talks to
MLflow, so what a sync would write is testable without a store.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from geoloc.atomic import file_sha256
from geoloc.config import TrackingConfig, flatten
from geoloc.integrations.mlflow.store import (
    TAG_PREFECT_FLOW_RUN,
    TAG_RUN_DIR,
    TAG_RUN_ID,
    TAG_RUN_NAME,
    TAG_STATUS,
    prefect_flow_run_id,
)
from geoloc.runs.layout import RunPaths
from geoloc.runs.summary import finite_or_none

# summary.json fields that change on every write without changing what the run says
_VOLATILE_SUMMARY_KEYS = ("updated_at",)
_MAX_PARAM_VALUE = 6000


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.json as a dict, or {} when missing or unreadable (a failed run may lack it)."""
    path = RunPaths(Path(run_dir)).config
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tracking_config(config: Mapping[str, Any]) -> TrackingConfig:
    """The run's `tracking` section, or the defaults when config.json lacks a valid one."""
    try:
        return TrackingConfig.model_validate(config.get("tracking") or {})
    except ValueError:
        return TrackingConfig()


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_MAX_PARAM_VALUE]


def run_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The flattened config (`train.lr`, `model.arch`...) as MLflow param strings."""
    return {k: _param_value(v) for k, v in flatten(config).items()}


def run_tags(
    run_dir: Path, summary: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, str]:
    """Tags that identify a run and its inputs: run id/dir/name/status, git commit, dataset
    fingerprint, loss and arch, and the Prefect flow run when there is one."""
    flat = flatten(config) if config else {}
    subset = summary.get("config") or {}
    code = summary.get("code") or {}
    dataset = summary.get("dataset") or {}
    tags: dict[str, Any] = {
        TAG_RUN_ID: summary["run_id"],
        TAG_RUN_DIR: str(Path(run_dir).resolve()),
        TAG_RUN_NAME: summary.get("run_name"),
        TAG_STATUS: summary.get("status"),
        "mlflow.runName": summary["run_id"],
        "geoloc.git_commit": code.get("git_commit"),
        "mlflow.source.git.commit": code.get("git_commit"),
        "geoloc.version": code.get("version"),
        "geoloc.dataset_fingerprint": dataset.get("fingerprint"),
        "geoloc.loss": flat.get("train.loss") or subset.get("train.loss"),
        "geoloc.arch": flat.get("model.arch") or subset.get("model.arch"),
        TAG_PREFECT_FLOW_RUN: prefect_flow_run_id(),
    }
    if summary.get("failure_reason"):
        tags["geoloc.failure_reason"] = str(summary["failure_reason"])[:5000]
    return {k: str(v) for k, v in tags.items() if v is not None and v != ""}


def epoch_points(metrics: Mapping[str, Any], epoch: int) -> list[tuple[str, float, int]]:
    """(key, value, step=epoch) for every finite numeric metric of one epoch (not `epoch`)."""
    points = []
    for key, raw in metrics.items():
        value = finite_or_none(raw)
        if key != "epoch" and value is not None:
            points.append((key, value, int(epoch)))
    return points


def history_points(run_dir: Path) -> list[tuple[str, float, int]]:
    """Every per-epoch metric of `artifacts/tables/metrics.csv` with `step = epoch`."""
    path = RunPaths(Path(run_dir)).metrics_csv
    if not path.is_file():
        return []
    points: list[tuple[str, float, int]] = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            epoch = finite_or_none(row.get("epoch"))
            if epoch is not None:
                points.extend(epoch_points(row, int(epoch)))
    return points


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Run-level numbers from summary.json: the leaderboard ingredients, test metrics (`test_`
    prefix) and the best rerank variant's metrics (`rerank_` prefix)."""
    out: dict[str, Any] = {
        key: summary.get(key)
        for key in ("best_val_acc", "best_p90_km", "last_geo_median_km", "epochs_completed",
                    "best_epoch")
    }  # fmt: skip
    out.update(summary.get("test") or {})
    rerank = summary.get("rerank") or {}
    out.update({f"rerank_{k}": v for k, v in (rerank.get("metrics") or {}).items()})
    return {k: v for k, raw in out.items() if (v := finite_or_none(raw)) is not None}


def final_points(summary: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """Final metrics as points at the step after the last epoch, so charts end where runs do."""
    step = int(summary.get("epochs_completed") or 0)
    return [(k, v, step) for k, v in final_metrics(summary).items()]


def artifact_files(run_dir: Path) -> list[Path]:
    """Files mirrored as artifacts, in the run directory's own layout (so the dashboard's
    relative links still work in MLflow): summary, config, report, dashboard, plots, tables.
    summary.json comes last: it is uploaded once the rest is safe."""
    rp = RunPaths(Path(run_dir))
    files = [p for p in (rp.config, rp.report, rp.dashboard) if p.is_file()]
    for folder in (rp.plots, rp.tables):
        if folder.is_dir():
            files.extend(sorted(p for p in folder.rglob("*") if p.is_file()))
    if rp.summary.is_file():
        files.append(rp.summary)
    return files


def _canonical_sha256(path: Path, run_dir: Path) -> str:
    """summary.json without the fields that change on every write; other files byte for byte."""
    if path == RunPaths(run_dir).summary:
        try:
            data = json.loads(path.read_text())
            for key in _VOLATILE_SUMMARY_KEYS:
                data.pop(key, None)
            return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        except (OSError, ValueError):
            pass
    return file_sha256(path)


def artifacts_digest(run_dir: Path, files: Sequence[Path]) -> str:
    """One digest over the mirrored files (relative path + content): unchanged means no upload."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(run_dir)).encode())
        digest.update(_canonical_sha256(path, Path(run_dir)).encode())
    return digest.hexdigest()


def iso_to_ms(text: Any) -> int | None:
    """An ISO timestamp from summary.json as MLflow's epoch milliseconds; None if unreadable."""
    try:
        return int(datetime.fromisoformat(str(text)).timestamp() * 1000)
    except (TypeError, ValueError):
        return None
