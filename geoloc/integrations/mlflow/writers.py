"""Idempotent writes to one MLflow run: find or create it, then add only what it lacks.

Params already logged are not re-logged (MLflow refuses changed values), a metric point already
there (same key, step and value) is not logged again, artifacts are uploaded again only when
their digest changed, and the status is set only when it differs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.integrations.mlflow.contents import (
    artifact_files,
    artifacts_digest,
    display_name,
    iso_to_ms,
    read_config,
    run_tags,
    source_tags,
)
from geoloc.integrations.mlflow.store import TAG_ARTIFACTS_SHA, TAG_PARENT, find_run

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

_STATUS_TO_MLFLOW = {"completed": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def open_run(
    client: MlflowClient,
    experiment_id: str,
    summary: Mapping[str, Any],
    run_dir: Path,
    parent_run_id: str | None = None,
) -> tuple[Run, bool]:
    """The MLflow run of this geoloc run: found by tag, else created. Returns (run, created)."""
    run = find_run(client, experiment_id, summary["run_id"])
    if run is not None:
        return run, False
    config = read_config(run_dir)
    tags = {**source_tags(config), **run_tags(run_dir, summary, config)}
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    run = client.create_run(
        experiment_id,
        start_time=iso_to_ms(summary.get("created_at")),
        tags=tags,
        run_name=display_name(summary),
    )
    log.info("MLflow run %s created for %s", run.info.run_id, summary["run_id"])
    return run, True


def sync_params(client: MlflowClient, run: Run, params: Mapping[str, str]) -> int:
    """Log params the run lacks; never re-log (MLflow refuses changed values) but warn on them."""
    from mlflow.entities import Param

    existing = run.data.params
    changed = [k for k, v in params.items() if k in existing and existing[k] != v]
    if changed:
        log.warning("MLflow run %s keeps its earlier values of params %s", run.info.run_id,
                    ", ".join(sorted(changed)[:10]))  # fmt: skip
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for batch in _batches(new, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=batch, synchronous=True)
    return len(new)


def sync_tags(client: MlflowClient, run: Run, tags: Mapping[str, str]) -> int:
    """Set tags whose value differs from the run's."""
    from mlflow.entities import RunTag

    new = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
    if new:
        client.log_batch(run.info.run_id, tags=new, synchronous=True)
    return len(new)


def metric_steps(client: MlflowClient, run: Run, keys: Iterable[str]) -> dict[str, list[Any]]:
    """key -> its logged history, for the keys the run already has."""
    have = set(run.data.metrics)
    return {k: client.get_metric_history(run.info.run_id, k) for k in set(keys) & have}


def _already_logged(history: Sequence[Any], value: float, step: int) -> bool:
    return any(
        m.step == step and math.isclose(m.value, value, rel_tol=1e-9, abs_tol=1e-12)
        for m in history
    )


def sync_inputs(client: MlflowClient, run: Run, spec: Mapping[str, Any] | None) -> bool:
    """Log the run's dataset (`contents.dataset_input`) as an MLflow input unless the run
    already has it (same name and digest); True if logged."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if spec is None:
        return False
    have = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    if (spec["name"], spec["digest"]) in have:
        return False
    dataset = Dataset(spec["name"], spec["digest"], spec["source_type"], spec["source"],
                      profile=spec["profile"])  # fmt: skip
    context = InputTag("mlflow.data.context", spec["context"])
    client.log_inputs(run.info.run_id, datasets=[DatasetInput(dataset, tags=[context])])
    return True


def sync_metrics(client: MlflowClient, run: Run, points: Sequence[tuple[str, float, int]]) -> int:
    """Log the (key, value, step) points the run lacks; an equal point at the same step is not
    logged twice, so re-syncing keeps metric histories as they are."""
    from mlflow.entities import Metric

    history = metric_steps(client, run, (k for k, _, _ in points))
    now = int(time.time() * 1000)
    new = [
        Metric(k, v, now, step)
        for k, v, step in points
        if not _already_logged(history.get(k, ()), v, step)
    ]
    for batch in _batches(new, _MAX_METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=batch, synchronous=True)
    return len(new)


def sync_artifacts(client: MlflowClient, run: Run, run_dir: Path) -> bool:
    """Upload the run's files in its own layout when their digest changed; True if uploaded."""
    run_dir = Path(run_dir)
    files = artifact_files(run_dir)
    if not files:
        return False
    digest = artifacts_digest(run_dir, files)
    if run.data.tags.get(TAG_ARTIFACTS_SHA) == digest:
        return False
    for path in files:
        folder = path.parent.relative_to(run_dir).as_posix()
        client.log_artifact(run.info.run_id, str(path), None if folder == "." else folder)
    client.set_tag(run.info.run_id, TAG_ARTIFACTS_SHA, digest)
    return True


def sync_status(client: MlflowClient, run: Run, summary: Mapping[str, Any]) -> bool:
    """End the MLflow run as the geoloc run ended (completed/failed/pruned); running stays."""
    status = _STATUS_TO_MLFLOW.get(str(summary.get("status")))
    if status is None or run.info.status == status:
        return False
    end = iso_to_ms(summary.get("updated_at")) or int(time.time() * 1000)
    client.set_terminated(run.info.run_id, status=status, end_time=end)
    return True
