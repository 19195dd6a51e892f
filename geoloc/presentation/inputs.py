"""What a run recorded, read once for its report: a note for everything missing, never a crash.

A report is written at the end of every run, completed or not, so a missing or unreadable table,
prediction file or summary becomes a note in `RunInputs.notes` that the report shows instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import SummaryError, read_summary


@dataclass
class RunInputs:
    """Everything a report reads from a run directory; `notes` say why something is absent."""

    paths: RunPaths
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    metrics: pd.DataFrame | None = None
    val_predictions: pd.DataFrame | None = None
    test_predictions: pd.DataFrame | None = None
    rerank: pd.DataFrame | None = None
    rerank_predictions: pd.DataFrame | None = None  # optional: radius circles on the error map
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        """Summary name, else config name, else the folder name."""
        summary = self.summary or {}
        config = self.config or {}
        return str(summary.get("run_name") or config.get("name") or self.paths.run_id)

    @property
    def status(self) -> str:
        """The summary status, `unknown` without a summary."""
        return str((self.summary or {}).get("status") or "unknown")


def degraded_counts(summary: dict[str, Any]) -> str | None:
    """`train 12, val 0, test 1`: images a degraded run left out as unreadable, per split (what
    REPORT.md, the dashboard and the leaderboard show); None for a healthy run."""
    if not summary.get("degraded"):
        return None
    return ", ".join(f"{k} {int(v):,}" for k, v in (summary.get("skipped_images") or {}).items())


def _read_json_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _load_summary(rp: RunPaths) -> tuple[dict[str, Any] | None, str | None]:
    """The validated summary, or the raw JSON object when it does not validate (shown anyway)."""
    if not rp.summary.is_file():
        return None, "no summary.json"
    try:
        return read_summary(rp.root), None
    except SummaryError as exc:
        try:
            return _read_json_object(rp.summary), f"summary.json is not valid: {exc}"
        except (OSError, ValueError):
            return None, str(exc)


def _load_table(path: Path, reader: Callable[[Path], pd.DataFrame]) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        df = reader(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a note, never a crash
        return None, f"{path.name} could not be read: {exc}"
    if df.empty:
        return None, f"{path.name} is empty"
    return df, None


def load_run_inputs(run_dir: Path) -> RunInputs:
    """Read a run directory's recorded outputs; nothing missing raises."""
    rp = RunPaths(Path(run_dir))
    inputs = RunInputs(paths=rp)
    inputs.summary, note = _load_summary(rp)
    if note:
        inputs.notes["summary"] = note
    if rp.config.is_file():
        try:
            inputs.config = _read_json_object(rp.config)
        except (OSError, ValueError) as exc:
            inputs.notes["config"] = f"config.json could not be read: {exc}"
    else:
        inputs.notes["config"] = "no config.json"
    tables = {
        "metrics": (rp.metrics_csv, pd.read_csv),
        "val_predictions": (rp.val_predictions, pd.read_parquet),
        "test_predictions": (rp.test_predictions, pd.read_parquet),
        "rerank": (rp.rerank_eval, pd.read_csv),
    }
    for attr, (path, reader) in tables.items():
        value, note = _load_table(path, reader)
        setattr(inputs, attr, value)
        if note:
            inputs.notes[attr] = note
    # optional (runs reranked before it existed have none): absent is not worth a note
    inputs.rerank_predictions, _ = _load_table(rp.rerank_test_predictions, pd.read_parquet)
    return inputs
