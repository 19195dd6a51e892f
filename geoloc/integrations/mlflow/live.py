"""Mirroring a run while it trains: an epoch callback that never makes training wait.

Every MLflow call runs on one background thread fed by a bounded queue; the epoch loop only
hands over the epoch's numbers (`put_nowait`) and goes on. So a tracking server that is slow, or
dies mid-run, costs training nothing: MLflow's client may retry a dead server for minutes on
that thread (its defaults add up to ~4 minutes per request), epochs that do not fit the queue are
left to the final sync (metrics.csv keeps them), and `close` waits at most `CLOSE_TIMEOUT_S`.

The MLflow run of a server that died stays RUNNING: the composer's `sync_run` after training,
or `geoloc mlflow sync` later, finds it by its `geoloc.run_id` tag, fills it in and sets its
final status; `summary.tracking.mlflow_run_id` keeps naming it meanwhile. Only the training
thread writes summary.json (`_record`), so the mirror never races the trainer's own writes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.config import RunConfig
from geoloc.errors import redact
from geoloc.integrations.mlflow.contents import (
    dataset_input,
    epoch_points,
    run_params,
    run_tags,
)
from geoloc.integrations.mlflow.mirror import record_tracking
from geoloc.integrations.mlflow.store import (
    client_for,
    error_text,
    experiment_for,
    probe,
    resolve_tracking_uri,
)
from geoloc.integrations.mlflow.writers import open_run, sync_inputs, sync_params, sync_tags
from geoloc.runfolder.summary import read_summary

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

QUEUE_SIZE = 32
"""Epochs the mirror thread may fall behind by; later ones are left to the final sync."""
CLOSE_TIMEOUT_S = 5.0
"""How long the end of a run waits for the mirror thread to log the epochs it still holds."""

Job = tuple[str, Any]  # ("open", None) | ("epoch", points) | ("mark" | "stop", threading.Event)


class LiveMirror:
    """Epoch callback that logs a training run's metrics into MLflow as they come; never raises
    and never blocks.

    `begin` starts the mirror thread, which finds or creates the MLflow run (params, tags) while
    the first epoch trains; each call hands one epoch over; `close` ends the thread. After the
    first failure the thread stops talking to MLflow; the training thread records the error in
    `summary.tracking` at the next epoch, and the composer's `sync_run` catches up.
    """

    def __init__(
        self, cfg: RunConfig, *, close_timeout_s: float = CLOSE_TIMEOUT_S,
        queue_size: int = QUEUE_SIZE,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.close_timeout_s = close_timeout_s
        self.run_dir: Path | None = None
        self.uri: str | None = None
        self.client: MlflowClient | None = None
        self.mlflow_run_id: str | None = None
        self.error: str | None = None
        self.dropped = 0
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._recorded: tuple[str | None, str | None] = (None, None)

    @property
    def active(self) -> bool:
        """True while the mirror takes epochs: begun, not closed, no failure so far."""
        return self._thread is not None and not self._closed and self.error is None

    def begin(self, run_dir: Path) -> None:
        """Start the mirror thread for `run_dir` (which exists, with its summary.json)."""
        self.run_dir = Path(run_dir)
        self._thread = threading.Thread(
            target=self._work, name=f"mlflow-live-{self.run_dir.name}", daemon=True
        )
        self._thread.start()
        self._submit(("open", None))

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Hand this epoch's metrics (`step=epoch`) to the mirror thread, without waiting."""
        if self.active:
            self._submit(("epoch", epoch_points(metrics, epoch)))
        self._record()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait at most `timeout` s until everything handed over so far is handled, then record
        the state in summary.json; True when the thread caught up."""
        done = threading.Event()
        caught_up = (
            self._thread is not None
            and self._thread.is_alive()
            and self._submit(("mark", done), timeout=timeout)
            and done.wait(timeout)
        )
        self._record()
        return bool(caught_up)

    def close(self, timeout: float | None = None) -> None:
        """End the mirror: wait at most `timeout` (default `close_timeout_s`) for the epochs it
        holds, then leave the rest to the final sync; record the outcome in summary.json."""
        if self._thread is None or self._closed:
            return
        self._closed = True
        timeout = self.close_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        stopped = threading.Event()
        if self._submit(("stop", stopped), timeout=timeout):
            stopped.wait(max(0.0, deadline - time.monotonic()))
        if not stopped.is_set() and self.error is None:
            self.error = (
                f"MLflow at {redact(self.uri or '?')} did not take the last epochs within "
                f"{timeout:g} s; left to the final sync"
            )
            log.warning("MLflow live logging of %s: %s", self.run_dir, self.error)
        self._record()

    # -- training thread ---------------------------------------------------------------------

    def _submit(self, job: Job, timeout: float | None = None) -> bool:
        """Queue `job`; without `timeout` never wait (a full queue drops an epoch)."""
        try:
            if timeout is None:
                self._jobs.put_nowait(job)
            else:
                self._jobs.put(job, timeout=timeout)
            return True
        except queue.Full:
            if job[0] == "epoch":
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow live logging of %s is behind; the final sync adds the "
                                "epochs it skips", self.run_dir)  # fmt: skip
            return False

    def _record(self) -> None:
        """Write the thread's latest state (run id, error) to summary.tracking when it changed."""
        state = (self.mlflow_run_id, self.error)
        if self.run_dir is None or state == self._recorded:
            return
        self._recorded = state
        record_tracking(self.run_dir, False, *state)

    # -- mirror thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            kind, payload = self._jobs.get()
            if kind in ("mark", "stop"):
                payload.set()
                if kind == "stop":
                    return
                continue
            if self.error is not None:
                continue  # quiet after the first failure: the final sync catches up
            try:
                if kind == "open":
                    self._open()
                else:
                    self._log(payload)
            except Exception as exc:  # noqa: BLE001 - never stop training for the mirror
                self.error = error_text(exc)
                log.warning("MLflow live logging of %s stopped, training goes on: %s",
                            self.run_dir, self.error)  # fmt: skip

    def _open(self) -> None:
        """Find or create the MLflow run, log params and tags."""
        assert self.run_dir is not None
        tracking = self.cfg.tracking
        uri = self.uri = resolve_tracking_uri(tracking.tracking_uri)
        probe(uri)
        client = client_for(uri)
        exp_id, parent = experiment_for(client, tracking.experiment, tracking.parent_run_id)
        summary = read_summary(self.run_dir)
        run, _ = open_run(client, exp_id, summary, self.run_dir, parent)
        self.mlflow_run_id = run.info.run_id
        config = self.cfg.model_dump(mode="json")
        sync_params(client, run, run_params(config))
        sync_tags(client, run, run_tags(self.run_dir, summary, config))
        sync_inputs(client, run, dataset_input(summary, config))
        self.client = client
        log.info("mirroring %s into MLflow run %s (%s)", self.run_dir.name, self.mlflow_run_id,
                 redact(uri))  # fmt: skip

    def _log(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        if self.client is None or self.mlflow_run_id is None or not points:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value, step in points]
        self.client.log_batch(self.mlflow_run_id, metrics=batch, synchronous=True)
