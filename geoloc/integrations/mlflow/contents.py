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
from geoloc.paths import DataPaths
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import finite_or_none

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
        "mlflow.runName": display_name(summary),
        "mlflow.note.content": run_description(summary),  # the run page's Description
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


def run_description(summary: Mapping[str, Any]) -> str:
    """One paragraph a person reads first: run and name (= preset for the shipped presets),
    data, and the test result after rerank beside the model alone."""
    test = summary.get("test") or {}
    rerank = summary.get("rerank") or {}
    after = rerank.get("metrics") or {}
    data = summary.get("dataset") or {}
    epochs = summary.get("epochs_completed") or 0
    name = summary.get("run_name") or "run"
    parts = [f"Run {summary.get('run_id')} ({name}, {summary.get('status')}, {epochs} epochs)"]
    if data.get("fingerprint"):
        parts.append(f"index {str(data['fingerprint'])[:12]}: {data.get('num_classes', '?')} "
                     f"H3 r{data.get('resolution', '?')} classes")  # fmt: skip
    if finite_or_none(after.get("median_km")) is not None:
        parts.append(f"test after rerank ({rerank.get('variant')}): median "
                     f"{after['median_km']:,.0f} km, P90 {after.get('p90_km') or 0:,.0f} km")
    if finite_or_none(test.get("test_median_km")) is not None:
        parts.append(f"model alone: median {test['test_median_km']:,.0f} km, "
                     f"P90 {test.get('test_p90_km') or 0:,.0f} km")
    if summary.get("failure_reason"):
        parts.append(f"failed: {str(summary['failure_reason'])[:300]}")
    return "; ".join(parts) + "."


def display_name(summary: Mapping[str, Any]) -> str:
    """The run's name in MLflow's runs table: run name + the run id's random suffix
    (`demo-3f2a1c`), readable and still unique; the full id is the `geoloc.run_id` tag."""
    run_id = str(summary["run_id"])
    name = str(summary.get("run_name") or "").strip()
    suffix = run_id.rsplit("-", 1)[-1] if "-" in run_id else ""
    if not name or not suffix or name == run_id:
        return run_id
    return f"{name}-{suffix}"


def source_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """MLflow's Source column: what started the run (set once, when the MLflow run is created):
    a Prefect flow run (`JOB`), a sweep trial, or `geoloc train`."""
    flow_run = prefect_flow_run_id()
    if flow_run:
        return {"mlflow.source.name": f"prefect flow run {flow_run}", "mlflow.source.type": "JOB"}
    tracking = config.get("tracking") or {}
    name = "geoloc sweep" if tracking.get("parent_run_id") else "geoloc train"
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}


DATASET_CONTEXT = "train"
DATASET_DIGEST_CHARS = 16
"""MLflow stores a dataset digest in 36 characters; the full fingerprint is in its profile."""


def dataset_input(summary: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The index the run trained on, as an MLflow dataset (name, digest, source, profile), or
    None without a fingerprint. Split counts come from the index's labels.json when it still
    has the run's fingerprint (an index rebuilt since is not described by it)."""
    info = summary.get("dataset") or {}
    fingerprint = info.get("fingerprint")
    if not fingerprint:
        return None
    # as `geoloc.data.run_data.resolve_index_dir` found it (config, else $GEOLOC_DATA_DIR/index)
    index_dir = Path(config.get("index_dir") or DataPaths.default().index).resolve()
    profile: dict[str, Any] = {"fingerprint": fingerprint}
    keys = ("num_classes", "num_parents", "resolution", "parent_resolution")
    profile.update({k: info[k] for k in keys if info.get(k) is not None})
    counts = _split_counts(index_dir / "labels.json", fingerprint)
    if counts:
        profile.update({f"{split}_images": int(n) for split, n in counts.items()})
        profile["num_rows"] = int(sum(counts.values()))
    return {
        "name": f"geoloc-index-r{info.get('resolution', '?')}",
        "digest": str(fingerprint)[:DATASET_DIGEST_CHARS],
        "source_type": "local",
        "source": json.dumps({"uri": str(index_dir)}),
        "profile": json.dumps(profile),
        "context": DATASET_CONTEXT,
    }


def _split_counts(labels_json: Path, fingerprint: str) -> dict[str, int] | None:
    try:
        labels = json.loads(labels_json.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(labels, dict) or labels.get("fingerprint") != fingerprint:
        return None
    counts = (labels.get("split") or {}).get("counts")
    return dict(counts) if isinstance(counts, dict) else None


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


FINAL_STEP = 0
"""The step of every run-level value (best_epoch, best_p90_km, test and rerank metrics). MLflow's
UI draws a metric whose latest step is >= 1 as a line chart over steps (one dot for a single
value) and a metric whose latest step is 0 as a bar, i.e. a value (`RunsChartsCardConfig`:
`step >= MIN_NUMBER_OF_STEP_FOR_LINE_COMPARISON`); per-epoch metrics keep `step = epoch`."""


def final_points(summary: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """Final metrics as single values at `FINAL_STEP`, so the UI shows them as values."""
    return [(k, v, FINAL_STEP) for k, v in final_metrics(summary).items()]


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
