"""The leaderboard written by `geoloc aggregate`, logged on one MLflow run per distinct table."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.atomic import file_sha256
from geoloc.integrations.mlflow.store import (
    TAG_KIND,
    TAG_LEADERBOARD_SHA,
    TrackingError,
    client_for,
    ensure_experiment,
    error_text,
    probe,
    resolve_tracking_uri,
)
from geoloc.paths import aggregate_dir
from geoloc.runfolder.summary import finite_or_none, now_iso

if TYPE_CHECKING:
    from mlflow import MlflowClient

LEADERBOARD_EXPERIMENT = "geoloc-leaderboard"
"""Leaderboard runs live apart from the training runs they rank."""


def _leaderboard_files(result_or_dir: Any) -> tuple[Path, list[Path]]:
    """(runs_summary.csv, every output file) of an `AggregateResult` or an `_aggregate` folder."""
    if result_or_dir is None:
        folder = aggregate_dir()
    elif isinstance(result_or_dir, str | os.PathLike):
        folder = Path(result_or_dir)
    else:
        csv_path = getattr(result_or_dir, "csv_path", None)
        if csv_path is None:
            raise TrackingError("the aggregate result was not written (aggregate with write=True)")
        paths = [Path(p) for p in getattr(result_or_dir, "paths", None) or [csv_path]]
        return Path(csv_path), [p for p in paths if p.is_file()]
    csv_path = folder / "runs_summary.csv"
    if not csv_path.is_file():
        raise TrackingError(f"no leaderboard at '{csv_path}' (run `geoloc aggregate` first)")
    names = ("runs_summary.csv", "runs_summary.parquet", "dashboard.html")
    return csv_path, [folder / n for n in names if (folder / n).is_file()]


def log_leaderboard(
    result_or_dir: Any = None,
    *,
    experiment: str = LEADERBOARD_EXPERIMENT,
    tracking_uri: str | None = None,
) -> str:
    """Log an aggregation's leaderboard on a `leaderboard` run: the CSV/Parquet/dashboard files
    and an MLflow table (`leaderboard.json`). Returns the MLflow run id.

    One run per distinct leaderboard (sha256 of runs_summary.csv): logging the same one again
    returns the existing run. The digest tag is set last, so a run that failed half-way (marked
    FAILED) is never mistaken for a complete one. Raises `TrackingError` when MLflow fails (the
    `aggregate` flow retries).
    """
    csv_path, files = _leaderboard_files(result_or_dir)
    digest = file_sha256(csv_path)
    uri = resolve_tracking_uri(tracking_uri)
    probe(uri)
    try:
        client = client_for(uri)
        exp_id = ensure_experiment(client, experiment)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{TAG_LEADERBOARD_SHA}` = '{digest}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        stamp = now_iso().replace(":", "").replace("+00:00", "Z")
        run = client.create_run(
            exp_id, tags={TAG_KIND: "leaderboard"}, run_name=f"leaderboard-{stamp}"
        )
    except Exception as exc:
        raise TrackingError(f"leaderboard not logged into {uri}: {error_text(exc)}") from exc
    rid = run.info.run_id
    try:
        _fill_leaderboard_run(client, rid, csv_path, files)
        client.set_tag(rid, TAG_LEADERBOARD_SHA, digest)
        client.set_terminated(rid)
    except Exception as exc:
        with suppress(Exception):  # the first error is the one to report
            client.set_terminated(rid, status="FAILED")
        raise TrackingError(f"leaderboard not logged into {uri}: {error_text(exc)}") from exc
    return rid


def _fill_leaderboard_run(
    client: MlflowClient, run_id: str, csv_path: Path, files: Sequence[Path]
) -> None:
    import pandas as pd

    table = pd.read_csv(csv_path)
    client.log_table(run_id, data=table, artifact_file="leaderboard.json")
    for path in files:
        client.log_artifact(run_id, str(path), "leaderboard")
    ranked = table[~table["skipped"].fillna(False).astype(bool)] if "skipped" in table else table
    client.log_batch(run_id, metrics=_leaderboard_metrics(ranked), synchronous=True)


def _leaderboard_metrics(ranked: Any) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = [Metric("ranked_runs", float(len(ranked)), now, 0)]
    if len(ranked) and "score" in ranked:
        top = finite_or_none(ranked["score"].max())
        if top is not None:
            out.append(Metric("top_score", top, now, 0))
    return out
