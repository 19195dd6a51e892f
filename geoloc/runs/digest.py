"""What a run page shows (Prefect artifacts, CLI): key facts and numbers from summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from geoloc.runs.layout import RunPaths
from geoloc.runs.summary import read_summary


def run_digest(run_dir: Path) -> dict[str, Any]:
    """Key facts and metrics of a finished run, from its summary.json (never re-derived).

    Returns `run_id`, `run_dir`, `status`, `failure_reason`, `dashboard` (path or None),
    `mlflow_run_id`, `metrics` (name -> value, headline numbers first) and `markdown`.
    """
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
