"""Mirroring a run while it trains: an epoch callback that never stops training."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.config import RunConfig
from geoloc.integrations.mlflow.contents import epoch_points, run_params, run_tags
from geoloc.integrations.mlflow.mirror import record_tracking
from geoloc.integrations.mlflow.store import (
    client_for,
    error_text,
    experiment_for,
    probe,
    resolve_tracking_uri,
)
from geoloc.integrations.mlflow.writers import open_run, sync_params, sync_tags
from geoloc.runs.summary import read_summary

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


class LiveMirror:
    """Epoch callback that logs a training run's metrics into MLflow as they come; never raises.

    `begin` finds or creates the MLflow run once the run directory exists; each call logs one
    epoch. After the first failure it stops talking to MLflow (training must not wait on
    retries) and records the error in `summary.tracking`; the composer's `sync_run` after the
    run, or `geoloc mlflow sync` later, catches up on whatever was missed.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir: Path | None = None
        self.uri: str | None = None
        self.client: MlflowClient | None = None
        self.mlflow_run_id: str | None = None
        self.error: str | None = None

    @property
    def active(self) -> bool:
        """True while live logging works."""
        return self.client is not None and self.mlflow_run_id is not None and self.error is None

    def begin(self, run_dir: Path) -> None:
        """Find or create the MLflow run, log params and tags, note its id in the summary."""
        run_dir = self.run_dir = Path(run_dir)
        tracking = self.cfg.tracking
        try:
            uri = resolve_tracking_uri(tracking.tracking_uri)
            probe(uri)
            client = client_for(uri)
            exp_id, parent = experiment_for(client, tracking.experiment, tracking.parent_run_id)
            summary = read_summary(run_dir)
            run, _ = open_run(client, exp_id, summary, run_dir, parent)
            config = self.cfg.model_dump(mode="json")
            sync_params(client, run, run_params(config))
            sync_tags(client, run, run_tags(run_dir, summary, config))
        except Exception as exc:  # noqa: BLE001 - training goes on without MLflow
            self.error = error_text(exc)
            log.warning("MLflow mirror of %s unavailable, training goes on: %s", run_dir,
                        self.error)  # fmt: skip
            record_tracking(run_dir, False, None, self.error)
            return
        self.uri, self.client, self.mlflow_run_id = uri, client, run.info.run_id
        record_tracking(run_dir, False, self.mlflow_run_id, None)
        log.info("mirroring %s into MLflow run %s (%s)", run_dir.name, self.mlflow_run_id, uri)

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Log this epoch's metrics with `step=epoch`."""
        run_dir, client, run_id = self.run_dir, self.client, self.mlflow_run_id
        if not self.active or run_dir is None or client is None or run_id is None:
            return
        from mlflow.entities import Metric

        try:
            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, step) for k, v, step in epoch_points(metrics, epoch)]
            client.log_batch(run_id, metrics=batch, synchronous=True)
        except Exception as exc:  # noqa: BLE001 - never stop training for the mirror
            self.error = error_text(exc)
            log.warning("MLflow live logging stopped for %s: %s", run_dir, self.error)
            record_tracking(run_dir, False, run_id, self.error)
