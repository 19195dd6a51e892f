"""The leaderboard table: its columns and dtypes, output file names, and what aggregation returns.

The CSV and Parquet files share one schema whatever the runs hold (`typed_frame`), so readers of
`runs/_aggregate/` never see a column change type between aggregations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from geoloc.presentation.leaderboard_score import Penalties, ScoreWeights

CSV_NAME = "runs_summary.csv"
PARQUET_NAME = "runs_summary.parquet"
DASHBOARD_NAME = "dashboard.html"

COLUMNS: tuple[str, ...] = (
    "rank",
    "run_id",
    "run_name",
    "status",
    "score",
    "norm_acc",
    "norm_p90",
    "norm_median",
    "penalty",
    "missing_artifacts",
    "best_val_acc",
    "best_p90_km",
    "last_geo_median_km",
    "test_top1",
    "test_median_km",
    "test_p90_km",
    "rerank_variant",
    "rerank_median_km",
    "rerank_p90_km",
    "epochs_completed",
    "best_epoch",
    "unreadable_images",
    "arch",
    "loss",
    "fingerprint",
    "created_at",
    "updated_at",
    "failure_reason",
    "dashboard",
    "skipped",
    "skip_reason",
)
FLOAT_COLUMNS = (
    "score",
    "norm_acc",
    "norm_p90",
    "norm_median",
    "penalty",
    "best_val_acc",
    "best_p90_km",
    "last_geo_median_km",
    "test_top1",
    "test_median_km",
    "test_p90_km",
    "rerank_median_km",
    "rerank_p90_km",
)
INT_COLUMNS = ("rank", "epochs_completed", "best_epoch", "unreadable_images")
STR_COLUMNS = tuple(c for c in COLUMNS if c not in (*FLOAT_COLUMNS, *INT_COLUMNS, "skipped"))


@dataclass(frozen=True)
class SkippedRun:
    """A run folder that is listed but not ranked, and why."""

    run_id: str
    reason: str


@dataclass
class AggregateResult:
    """What `aggregate_runs` produced: publish `ranked` (MLflow, Prefect artifacts) as is."""

    ranked: pd.DataFrame
    skipped: list[SkippedRun]
    table: pd.DataFrame  # ranked rows then skipped rows, the CSV/Parquet content
    weights: ScoreWeights
    penalties: Penalties
    csv_path: Path | None = None
    parquet_path: Path | None = None
    dashboard_path: Path | None = None
    paths: list[Path] = field(default_factory=list)


def typed_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Stable dtypes whatever the rows: CSV and Parquet readers see the same schema."""
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    df = df[list(COLUMNS)].copy()
    for col in FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in INT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in STR_COLUMNS:
        df[col] = df[col].astype("string")
    df["skipped"] = df["skipped"].fillna(False).astype("bool")
    return df


def skipped_frame(skipped: list[SkippedRun]) -> pd.DataFrame:
    """Rows for skipped runs: same columns, `skipped` true, the reason kept."""
    rows = [
        {"run_id": s.run_id, "status": "skipped", "skipped": True, "skip_reason": s.reason}
        for s in skipped
    ]
    return typed_frame(pd.DataFrame(rows, columns=list(COLUMNS)))
