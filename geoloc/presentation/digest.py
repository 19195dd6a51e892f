"""What a run page shows (Prefect artifacts, CLI): key facts and numbers from summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from geoloc.formatting import fmt, fmt_km, fmt_share
from geoloc.paths import DASHBOARD_URL_ENV, mlflow_run_url, runs_url
from geoloc.presentation.report_tables import fmt_metric, rerank_variant, result_rows
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary


def run_digest(run_dir: Path, mlflow_url: str | None = None) -> dict[str, Any]:
    """Key facts and metrics of a finished run, from its summary.json (never re-derived).

    Returns `run_id`, `run_dir`, `status`, `failure_reason`, `dashboard` (path or None),
    `dashboard_url` (http address where `geoloc serve` publishes it, or None), `mlflow_run_id`,
    `mlflow_url` (its page in the MLflow UI: `mlflow_url` when the caller found the experiment's
    own address, else `geoloc.paths.mlflow_run_url`),
    `metrics` (name -> value, headline numbers first) and `markdown` (formatted for people: the
    test result after rerank beside the model alone, how training went, where to look).
    """
    rp = RunPaths(Path(run_dir))
    s = read_summary(rp.root)
    mlflow_url = mlflow_url or mlflow_run_url((s.get("tracking") or {}).get("mlflow_run_id"))
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
    dashboard = rp.dashboard if rp.dashboard.is_file() else None
    url = runs_url(rp.dashboard) if dashboard else None
    return {
        "run_id": s["run_id"],
        "run_dir": str(rp.root),
        "status": s["status"],
        "failure_reason": s.get("failure_reason"),
        "dashboard": str(dashboard) if dashboard else None,
        "dashboard_url": url,
        "mlflow_run_id": (s.get("tracking") or {}).get("mlflow_run_id"),
        "mlflow_url": mlflow_url,
        "metrics": metrics,
        "markdown": digest_markdown(s, rp, url, mlflow_url),
    }


def digest_markdown(
    s: dict[str, Any], rp: RunPaths, dashboard_url: str | None, mlflow_url: str | None = None
) -> str:
    """A run page in markdown (a Prefect artifact): result, training, where to look."""
    status = f"**{s['status']}**" + (f": {s['failure_reason']}" if s.get("failure_reason") else "")
    dataset = s.get("dataset") or {}
    training = (
        f"Training: {s.get('epochs_completed') or 0} epochs (best: epoch "
        f"{s.get('best_epoch') or '-'}), best val top-1 {fmt_share(s.get('best_val_acc'))}, "
        f"best val P90 {fmt_km(s.get('best_p90_km'))}; {fmt(dataset.get('num_classes'))} classes "
        f"(H3 r{dataset.get('resolution', '?')})."
    )
    lines = [
        f"# Run `{s['run_id']}`",
        "",
        f"Status {status}.",
        "",
        *_result_markdown(s),
        "",
        training,
        "",
        _dashboard_line(rp, dashboard_url),
        f"- run folder: `{rp.root}`",
        f"- dataset fingerprint: `{str(dataset.get('fingerprint'))[:16]}`",
        _mlflow_line(s, mlflow_url),
    ]
    return "\n".join(lines) + "\n"


def _mlflow_line(s: dict[str, Any], url: str | None) -> str:
    """The MLflow run as a link (its page in the MLflow UI), or why there is none."""
    run_id = (s.get("tracking") or {}).get("mlflow_run_id")
    if not run_id:
        return "- MLflow run: not mirrored"
    return f"- MLflow run: [{run_id}]({url or mlflow_run_url(run_id)})"


def _result_markdown(s: dict[str, Any]) -> list[str]:
    """The test result: a sentence on the headline metric, then the table."""
    rows = result_rows(s)
    variant = rerank_variant(s)
    if not rows:
        return ["No test result."]
    if not variant:
        table = [f"| {r.label} | {fmt_metric(r.model, r.kind)} |" for r in rows]
        return ["No rerank evaluation: the model alone.", "", "| test metric | model |",
                "| --- | ---: |", *table]  # fmt: skip
    head = rows[0]
    table = [
        f"| {r.label} | {fmt_metric(r.reranked, r.kind)} | {fmt_metric(r.model, r.kind)} |"
        for r in rows
    ]
    return [
        f"Test {head.label}: **{fmt_metric(head.reranked, head.kind)}** after rerank "
        f"(`{variant}`, chosen on val; what `geoloc predict` serves), "
        f"{fmt_metric(head.model, head.kind)} from the model alone.",
        "",
        f"| test metric | after rerank (`{variant}`) | model alone |",
        "| --- | ---: | ---: |",
        *table,
    ]


def _dashboard_line(rp: RunPaths, url: str | None) -> str:
    if url or rp.dashboard.is_file():
        return served_link_line("dashboard", rp.dashboard, f"{rp.run_id}/dashboard.html", url)
    return "- dashboard: not written"


def served_link_line(label: str, path: Path, text: str, url: str | None) -> str:
    """A markdown line linking `path` at `url` (where `geoloc serve` publishes it); without a
    URL, the path and how to get one: browsers do not open `file://` links from a web page."""
    if url:
        return f"- {label}: [{text}]({url})"
    return (
        f"- {label}: `{path}` (browsers do not open files from a web page: run "
        f"`geoloc serve` and set `{DASHBOARD_URL_ENV}` where flows run to get a link here)"
    )


LEADERBOARD_COLUMNS = (
    "rank",
    "run_id",
    "status",
    "score",
    "rerank_median_km",
    "rerank_p90_km",
    "rerank_variant",
    "test_median_km",
    "test_top1",
    "best_val_acc",
    "best_p90_km",
    "arch",
    "loss",
    "skip_reason",
)


def leaderboard_records(df: Any, limit: int | None = None) -> list[dict[str, Any]]:
    """Leaderboard rows for people (a Prefect table): km as `78.5 km`, shares as `41.2%`,
    the score to 3 decimals; rank and text as they are."""
    rows = table_records(df, LEADERBOARD_COLUMNS, limit)
    for row in rows:
        for key, value in row.items():
            if key.endswith("_km"):
                row[key] = fmt_km(value)
            elif key in ("test_top1", "best_val_acc"):
                row[key] = fmt_share(value)
            elif key == "score" and value is not None:
                row[key] = round(float(value), 3)
    return rows


def table_records(
    df: Any, columns: tuple[str, ...] = LEADERBOARD_COLUMNS, limit: int | None = None
) -> list[dict[str, Any]]:
    """JSON-safe rows of a DataFrame (NaN -> None, numpy -> Python), present columns only."""
    keep = [c for c in columns if c in df.columns]
    part = df[keep] if limit is None else df[keep].head(limit)
    return json.loads(part.to_json(orient="records"))
