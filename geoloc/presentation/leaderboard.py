"""The leaderboard across runs: `runs/_aggregate/` (CSV, Parquet and a sortable dashboard).

Every `runs/<run_id>/summary.json` is read once (what the run recorded; nothing is re-derived).
Runs that cannot be ranked (corrupt summary, unknown schema version, still running, no
summary) are listed as skipped with the reason, in every output: never a crash, never dropped.

Score of a ranked run (parts kept as columns; see README "Reports and the leaderboard"):

    norm_acc    = best_val_acc                                    higher accuracy is better
    norm_p90    = 1 - log(1 + best_p90_km) / log(1 + 20037.5)     lower P90 is better
    norm_median = 1 - log(1 + last_geo_median_km) / log(1 + 20037.5)
    score = (w_acc * norm_acc + w_p90 * norm_p90 + w_median * norm_median) / (w_acc + w_p90
            + w_median) - penalty

Each part is against a fixed reference (km: 1 at 0 km, 0 at half the Earth's circumference, on a
log scale), not the other runs: a run keeps its score when others join, two runs do not score 1
and 0, and the model registry compares a new run with the champion on the same number
(`reference_score`). A missing metric counts 0. `penalty` sums the configured weight of each
missing artifact and of the run's status.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc.atomic import write_parquet, write_text
from geoloc.errors import GeolocError
from geoloc.paths import aggregate_dir, runs_dir
from geoloc.presentation.leaderboard_page import render_leaderboard
from geoloc.presentation.leaderboard_score import (
    SCORE_PARTS,
    Penalties,
    ScoreWeights,
    missing_and_penalty,
    reference_part,
)
from geoloc.presentation.leaderboard_table import (
    COLUMNS,
    CSV_NAME,
    DASHBOARD_NAME,
    PARQUET_NAME,
    AggregateResult,
    SkippedRun,
    skipped_frame,
    typed_frame,
)
from geoloc.runfolder.summary import (
    SummaryError,
    parse_summary,
    rerun_differences,
    settle_abandoned,
)

log = logging.getLogger(__name__)

# folders under runs/ that are not runs
RESERVED_DIRS = frozenset({"_aggregate", "_sweeps"})


def iter_run_dirs(root: Path) -> Iterator[os.DirEntry[str]]:
    """Every run folder under `root`: not `_aggregate`, `_sweeps` or a dot-folder."""
    with os.scandir(root) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name in RESERVED_DIRS:
                continue
            if entry.is_dir(follow_symlinks=False):
                yield entry


def _config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """A config subset may be flat (`model.arch`), nested or keyed by leaf (`arch`)."""
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            node = None
            break
        node = node[part]
    return node if node is not None else config.get(dotted.rsplit(".", 1)[-1])


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def summary_row(run_id: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The leaderboard columns a summary provides (score columns come later)."""
    test = summary.get("test") or {}
    config = summary.get("config") or {}
    dataset = summary.get("dataset") or {}
    artifacts = summary.get("artifacts") or {}
    rerank = summary.get("rerank") or {}
    reranked = rerank.get("metrics") or {}
    arch, loss = _config_value(config, "model.arch"), _config_value(config, "train.loss")
    return {
        "run_id": run_id,
        "run_name": summary.get("run_name") or "",
        "status": summary.get("status"),
        "best_val_acc": _num(summary.get("best_val_acc")),
        "best_p90_km": _num(summary.get("best_p90_km")),
        "last_geo_median_km": _num(summary.get("last_geo_median_km")),
        "test_top1": _num(test.get("test_top1")),
        "test_median_km": _num(test.get("test_median_km")),
        "test_p90_km": _num(test.get("test_p90_km")),
        "rerank_variant": rerank.get("variant"),
        "rerank_median_km": _num(reranked.get("median_km")),
        "rerank_p90_km": _num(reranked.get("p90_km")),
        "epochs_completed": summary.get("epochs_completed"),
        "best_epoch": summary.get("best_epoch"),
        # images left out as unreadable, all splits: > 0 is a degraded run; empty: not recorded
        "unreadable_images": _unreadable(summary),
        "arch": None if arch is None else str(arch),
        "loss": None if loss is None else str(loss),
        "fingerprint": dataset.get("fingerprint"),
        "created_at": summary.get("created_at"),
        "updated_at": summary.get("updated_at"),
        "failure_reason": summary.get("failure_reason"),
        "dashboard": f"../{run_id}/dashboard.html" if artifacts.get("dashboard") else None,
        "_artifacts": artifacts,
        "_settings": {k: summary.get(k) or {} for k in ("code", "determinism")},
        "skipped": False,
        "skip_reason": None,
    }


def _unreadable(summary: dict[str, Any]) -> int | None:
    counts = summary.get("skipped_images")
    if not isinstance(counts, dict):
        return None
    return sum(int(v) for v in counts.values() if isinstance(v, int | float))


def read_run(entry: os.DirEntry[str] | Path) -> dict[str, Any] | SkippedRun:
    """One run folder -> its leaderboard row, or why it is skipped."""
    path = Path(entry)
    run_id = path.name
    try:
        text = (path / "summary.json").read_bytes()
    except FileNotFoundError:
        return SkippedRun(run_id, "no summary.json")
    except OSError as exc:
        return SkippedRun(run_id, f"summary.json unreadable: {exc.strerror or exc}")
    try:
        summary = parse_summary(text)
    except SummaryError as exc:
        return SkippedRun(run_id, str(exc))
    if summary.get("status") == "running" and settle_abandoned(path):
        summary = parse_summary((path / "summary.json").read_bytes())
    if summary.get("status") == "running":
        return SkippedRun(run_id, "run still in progress (status: running)")
    return summary_row(run_id, summary)


def read_runs(root: Path) -> tuple[list[dict[str, Any]], list[SkippedRun]]:
    """Rows of every rankable run, and the skipped ones, sorted by run id."""
    rows: list[dict[str, Any]] = []
    skipped: list[SkippedRun] = []
    for entry in sorted(iter_run_dirs(root), key=lambda e: e.name):
        got = read_run(entry)
        if isinstance(got, SkippedRun):
            skipped.append(got)
        else:
            rows.append(got)
    return rows, skipped


def score_runs(
    rows: list[dict[str, Any]], weights: ScoreWeights, penalties: Penalties
) -> pd.DataFrame:
    """Ranked leaderboard of rankable rows: score, its parts, rank (1 = best)."""
    df = pd.DataFrame(rows, columns=[*(c for c in COLUMNS if c != "rank"), "_artifacts"])
    if df.empty:
        return typed_frame(df.drop(columns="_artifacts"))
    total = weights.acc + weights.p90 + weights.median
    score = pd.Series(0.0, index=df.index)
    for name, source, column, higher in SCORE_PARTS:
        df[column] = df[source].map(lambda v, h=higher: reference_part(v, h)).astype("float64")
        score += getattr(weights, name) * df[column]
    df["missing_artifacts"], df["penalty"] = missing_and_penalty(
        df["_artifacts"], df["status"], penalties
    )
    df["score"] = score / total - df["penalty"]
    df = df.drop(columns="_artifacts").sort_values(
        ["score", "best_val_acc", "run_id"], ascending=[False, False, True], na_position="last"
    )
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return typed_frame(df.reset_index(drop=True))


def settings_differences(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """How the runs' library versions and thread counts differ from the first run's, e.g.
    `['torch 2.14.1 vs 2.15.0 (run b)']`, each difference once."""
    if not rows:
        return []
    first = rows[0]["_settings"]
    seen: dict[str, str] = {}
    for row in rows[1:]:
        for diff in rerun_differences(first, row["_settings"], sep=" vs "):
            seen.setdefault(diff, row["run_id"])
    return [f"{diff} (run {run_id})" for diff, run_id in seen.items()]


def aggregate_runs(
    root: Path | None = None,
    weights: ScoreWeights | None = None,
    penalties: Penalties | None = None,
    *,
    write: bool = True,
) -> AggregateResult:
    """Rank every run under `root` (default `$GEOLOC_RUNS_DIR`) and write `root/_aggregate/`."""
    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        raise GeolocError(f"runs folder '{root}' does not exist")
    weights = weights or ScoreWeights()
    penalties = penalties or Penalties()
    rows, skipped = read_runs(root)
    if differ := settings_differences(rows):
        log.warning("the leaderboard compares runs made under different settings (%s): their "
                    "numbers differ for that reason too", "; ".join(differ))  # fmt: skip
    ranked = score_runs(rows, weights, penalties)
    table = pd.concat([ranked, skipped_frame(skipped)], ignore_index=True) if skipped else ranked
    result = AggregateResult(ranked, skipped, typed_frame(table), weights, penalties)
    if write:
        write_outputs(result, aggregate_dir(root))
    log.info("aggregated %d runs (%d skipped) under %s", len(ranked), len(skipped), root)
    return result


def write_outputs(result: AggregateResult, out_dir: Path) -> None:
    """CSV, Parquet and dashboard, each atomically (concurrent aggregations never tear a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.csv_path = out_dir / CSV_NAME
    result.parquet_path = out_dir / PARQUET_NAME
    result.dashboard_path = out_dir / DASHBOARD_NAME
    write_text(result.csv_path, result.table.to_csv(index=False))
    write_parquet(result.parquet_path, result.table)
    write_text(result.dashboard_path, render_leaderboard(result))
    result.paths = [result.csv_path, result.parquet_path, result.dashboard_path]
