"""MLflow mirror of every run, the `geoloc` model registry entry, and the leaderboard.

The run directory is the source of truth; MLflow is a mirror where people compare runs. So:

- Mirroring never stops training. `LiveMirror` (an epoch callback built by `geoloc.train.run`) swallows
  every tracking failure, records it in `summary.tracking` (`mirrored: false`, `error`) and goes
  quiet; `geoloc mlflow sync` (`sync_run`/`sync_runs`) catches up from the files later.
- Mirroring is idempotent. A run is found by its `geoloc.run_id` tag and updated, never duplicated:
  params already logged are not re-logged, a metric point already there (same key, step and value)
  is not logged again, artifacts and the model are uploaded again only when their digest changed.
- MLflow's active run is thread-local and its fluent API is process-global, so everything here
  uses `MlflowClient` with explicit run ids. The one exception is `mlflow.pytorch.log_model`, which
  resolves the global tracking URI: it runs under a lock that points it at ours and restores it.

This is the only module that imports mlflow, lazily: importing it does not load MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from geoloc.config import RunConfig, TrackingConfig, flatten
from geoloc.errors import GeolocError
from geoloc.paths import aggregate_dir, runs_dir
from geoloc.runs.layout import RunPaths
from geoloc.runs.summary import finite_or_none, now_iso, read_summary, update_summary

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""MLflow's own default store: a SQLite file in the working directory."""
MODEL_NAME = "geoloc"
CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT = "model"

TAG_RUN_ID = "geoloc.run_id"
TAG_RUN_DIR = "geoloc.run_dir"
TAG_RUN_NAME = "geoloc.run_name"
TAG_STATUS = "geoloc.status"
TAG_KIND = "geoloc.kind"
TAG_ARTIFACTS_SHA = "geoloc.artifacts_sha256"
TAG_MODEL_SHA = "geoloc.model_sha256"
TAG_MODEL_VERSION = "geoloc.model_version"
TAG_LEADERBOARD_SHA = "geoloc.leaderboard_sha256"
TAG_SWEEP = "geoloc.sweep"
TAG_PREFECT_FLOW_RUN = "prefect.flow_run_id"
TAG_PARENT = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""Makes the MLflow 3 UI open our experiments in its "Model training" view (runs, metrics)
instead of the GenAI one (traces)."""

PREFECT_FLOW_RUN_ENV = ("PREFECT__FLOW_RUN_ID", "PREFECT__RUNTIME__FLOW_RUN__ID")
"""Set by Prefect workers (and its runtime overrides) in the flow run's process; read, never
imported: `geoloc` does not depend on Prefect."""

PROBE_TIMEOUT_S = 5.0
"""A tracking server that does not answer its health check this fast counts as down; MLflow's own
client would otherwise retry for minutes before the first epoch."""

# summary.json fields that change on every write without changing what the run says
_VOLATILE_SUMMARY_KEYS = ("updated_at",)
_STATUS_TO_MLFLOW = {"completed": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_GLOBAL_URI_LOCK = threading.RLock()


class TrackingError(GeolocError):
    """The tracking server is unreachable or refused a request; the message says which."""


# --------------------------------------------------------------------------------------------
# Where to track
# --------------------------------------------------------------------------------------------


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """`explicit` (CLI flag or `tracking.tracking_uri`), else `MLFLOW_TRACKING_URI`, else
    `sqlite:///mlflow.db`; a relative SQLite path is made absolute so threads, subprocesses and
    a later `chdir` all reach the same file."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise `TrackingError` when an HTTP tracking server does not answer at all.

    Any HTTP answer counts as up (a proxy may hide `/health`); only refused connections and
    timeouts count as down. Local stores (SQLite, files) need no probe.
    """
    if not _is_http(uri):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingError(f"tracking server {uri} is unreachable ({type(exc).__name__})") from exc


def client_for(uri: str) -> MlflowClient:
    """An `MlflowClient` bound to `uri` (tracking and registry), independent of global state."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at `uri` for a fluent-only call, then restore
    it (the module global and the `MLFLOW_TRACKING_URI` variable MLflow mirrors it into)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        if mlflow.get_tracking_uri() == uri:
            yield
            return
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        global_before = tracking_utils._tracking_uri
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(global_before)  # None unsets the variable too
            if env_before is not None:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created (or restored from the bin) when needed; two processes
    creating it at once both end up with the same one."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def find_run(client: MlflowClient, experiment_id: str, geoloc_run_id: str) -> Run | None:
    """The MLflow run mirroring `geoloc_run_id` in the experiment (the oldest if a race ever
    created two), or None."""
    if "'" in geoloc_run_id:
        raise TrackingError(f"run id {geoloc_run_id!r} contains a quote")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_RUN_ID}` = '{geoloc_run_id}'",
        max_results=10,
        order_by=["attributes.start_time ASC"],
    )
    if len(runs) > 1:
        log.warning("%d MLflow runs carry %s=%s; using the oldest", len(runs), TAG_RUN_ID,
                    geoloc_run_id)  # fmt: skip
    return runs[0] if runs else None


# --------------------------------------------------------------------------------------------
# What a run directory says (pure functions of the files)
# --------------------------------------------------------------------------------------------


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


def prefect_flow_run_id() -> str | None:
    """The Prefect flow run this process works for, from the environment Prefect sets."""
    for var in PREFECT_FLOW_RUN_ENV:
        value = os.environ.get(var)
        if value:
            return value
    return None


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
        "mlflow.runName": summary["run_id"],
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


def final_points(summary: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """Final metrics as points at the step after the last epoch, so charts end where runs do."""
    step = int(summary.get("epochs_completed") or 0)
    return [(k, v, step) for k, v in final_metrics(summary).items()]


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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    return _file_sha256(path)


def artifacts_digest(run_dir: Path, files: Sequence[Path]) -> str:
    """One digest over the mirrored files (relative path + content): unchanged means no upload."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(run_dir)).encode())
        digest.update(_canonical_sha256(path, Path(run_dir)).encode())
    return digest.hexdigest()


def _iso_to_ms(text: Any) -> int | None:
    try:
        return int(datetime.fromisoformat(str(text)).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Writing to MLflow, idempotently
# --------------------------------------------------------------------------------------------


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
    tags = run_tags(run_dir, summary, read_config(run_dir))
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    run = client.create_run(
        experiment_id,
        start_time=_iso_to_ms(summary.get("created_at")),
        tags=tags,
        run_name=summary["run_id"],
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
    end = _iso_to_ms(summary.get("updated_at")) or int(time.time() * 1000)
    client.set_terminated(run.info.run_id, status=status, end_time=end)
    return True


# --------------------------------------------------------------------------------------------
# The model and the registry
# --------------------------------------------------------------------------------------------


class GeolocScorer(nn.Module):
    """What the registry serves: (B, 3, S, S) eval-transformed images -> (B, K) class
    probabilities, hierarchy-aware exactly as in evaluation (the raw model returns a dict)."""

    def __init__(self, model: nn.Module, parent_of: Any, hier_topk_parents: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("parent_of", torch.as_tensor(parent_of, dtype=torch.long))
        self.hier_topk_parents = int(hier_topk_parents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from geoloc.model.scores import class_scores

        return class_scores(self.model(x), self.parent_of, self.hier_topk_parents)


def _model_requirements() -> list[str]:
    """Pinned from this environment: inferring them would load the model in a subprocess."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "numpy"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return reqs


def _model_checkpoint(run_dir: Path) -> Path | None:
    rp = RunPaths(Path(run_dir))
    for path in (rp.best_checkpoint, rp.last_checkpoint):
        if path.is_file():
            return path
    return None


def sync_model(
    client: MlflowClient, uri: str, run: Run, run_dir: Path, register: bool
) -> str | None:
    """Log the run's best model with `mlflow.pytorch.log_model` and register it as `geoloc`, once
    per checkpoint content.

    MLflow 3 saves it as a `torch.export` program (pt2): self-contained, so serving it needs
    torch but not geoloc. The input example has a batch of 2 because export specialises a
    batch dimension of 1 into a constant.

    Returns the new registered version, or None when nothing was logged.
    """
    import mlflow.pytorch
    import numpy as np

    from geoloc.infer.trained import load_trained

    ckpt = _model_checkpoint(run_dir)
    if ckpt is None:
        return None
    digest = _file_sha256(ckpt)
    tags = run.data.tags
    if tags.get(TAG_MODEL_SHA) == digest and (not register or TAG_MODEL_VERSION in tags):
        return None
    trained = load_trained(run_dir, "best" if ckpt.stem == "best" else "last", device="cpu")
    scorer = GeolocScorer(
        trained.model, trained.label_space.parent_of, trained.config.train.hier_topk_parents
    ).eval()
    size = trained.config.train.image_size
    example = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with _global_tracking_uri(uri):
        info = mlflow.pytorch.log_model(
            scorer,
            name=MODEL_ARTIFACT,
            input_example=example,
            run_id=run.info.run_id,
            registered_model_name=MODEL_NAME if register else None,
            pip_requirements=_model_requirements(),
            await_registration_for=60,
        )
    version = getattr(info, "registered_model_version", None)
    tags = {TAG_MODEL_SHA: digest}
    if version is not None:
        tags[TAG_MODEL_VERSION] = str(version)
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    log.info(
        "model of %s logged (%s)", run_dir, f"version {version}" if version else "unregistered"
    )
    return str(version) if version is not None else None


def update_champion(client: MlflowClient) -> str | None:
    """Point the `champion` alias of `geoloc` at the best registered run: completed, lowest
    `best_p90_km` (the leaderboard's tail ingredient), then highest `best_val_acc`, then newest.

    Only each run's newest version competes. Returns the champion version (None: no candidate).
    """
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    except MlflowException:
        return None
    newest: dict[str, Any] = {}
    for v in versions:
        if v.run_id and (v.run_id not in newest or int(v.version) > int(newest[v.run_id].version)):
            newest[v.run_id] = v
    best_key, best_version = None, None
    for run_id, v in newest.items():
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        p90 = run.data.metrics.get("best_p90_km")
        if run.data.tags.get(TAG_STATUS) != "completed" or finite_or_none(p90) is None:
            continue
        key = (p90, -(run.data.metrics.get("best_val_acc") or 0.0), -int(v.version))
        if best_key is None or key < best_key:
            best_key, best_version = key, str(v.version)
    if best_version is None:
        return None
    try:
        current = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version
    except MlflowException:
        current = None
    if str(current) != best_version:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, best_version)
        log.info("%s@%s -> version %s", MODEL_NAME, CHAMPION_ALIAS, best_version)
    return best_version


# --------------------------------------------------------------------------------------------
# Mirroring a run after the fact
# --------------------------------------------------------------------------------------------


@dataclass
class SyncResult:
    """What `sync_run` did: `action` is created, updated, unchanged or failed."""

    run_dir: Path
    run_id: str
    action: str
    mlflow_run_id: str | None = None
    changes: list[str] = field(default_factory=list)
    model_version: str | None = None
    error: str | None = None

    def line(self) -> str:
        """One line for the CLI."""
        what = f" ({', '.join(self.changes)})" if self.changes else ""
        where = f" mlflow={self.mlflow_run_id}" if self.mlflow_run_id else ""
        err = f": {self.error}" if self.error else ""
        return f"{self.action:9s} {self.run_id}{where}{what}{err}"


def record_tracking(
    run_dir: Path, mirrored: bool, mlflow_run_id: str | None, error: str | None
) -> None:
    """Write `summary.tracking` when it changes (an unchanged summary keeps re-syncs no-ops)."""
    new = {"mirrored": mirrored, "mlflow_run_id": mlflow_run_id, "error": error}
    try:
        current = read_summary(Path(run_dir)).get("tracking")
        if current != new:
            update_summary(Path(run_dir), tracking=new)
    except GeolocError as exc:
        log.warning("could not record tracking state in %s: %s", run_dir, exc)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text.splitlines()[0][:500] if text else type(exc).__name__


def sync_run(
    run_dir: Path,
    *,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    log_model: bool = True,
    register: bool | None = None,
    parent_run_id: str | None = None,
) -> SyncResult:
    """Mirror one run directory into MLflow (create or update; idempotent).

    Defaults come from the run's config.json `tracking` section. Raises `GeolocError` when the
    run has no usable summary or the tracking server fails; `summary.tracking` says the outcome,
    except for a run still `running`: its trainer owns summary.json (and mirrors it live), so a
    sync mirrors what is there and leaves the file alone.
    """
    run_dir = Path(run_dir).resolve()
    summary = read_summary(run_dir)
    config = read_config(run_dir)
    tcfg = tracking_config(config)
    uri = resolve_tracking_uri(tracking_uri or tcfg.tracking_uri)
    register = tcfg.register_model if register is None else register
    mlflow_run_id: str | None = None
    try:
        probe(uri)
        client = client_for(uri)
        exp_id, parent = _experiment_for(
            client, experiment or tcfg.experiment, parent_run_id or tcfg.parent_run_id
        )
        run, created = open_run(client, exp_id, summary, run_dir, parent)
        mlflow_run_id = run.info.run_id
        result = SyncResult(run_dir, summary["run_id"], "created" if created else "updated",
                            mlflow_run_id)  # fmt: skip
        _mirror_contents(client, uri, run, run_dir, summary, config, log_model, register, result)
    except Exception as exc:
        if summary.get("status") != "running":
            record_tracking(run_dir, False, mlflow_run_id, _error_text(exc))
        if isinstance(exc, GeolocError):
            raise
        raise TrackingError(
            f"mirroring {run_dir.name} into {uri} failed: {_error_text(exc)}"
        ) from exc
    if not created and not result.changes:
        result.action = "unchanged"
    return result


def _experiment_for(
    client: MlflowClient, name: str, parent_run_id: str | None
) -> tuple[str, str | None]:
    """(experiment id, parent run id to nest under). Children live in their parent's experiment
    (MLflow only nests runs within one); a parent this server does not know (the run is synced
    into another server than the sweep's) is dropped, and the run goes to `name`."""
    from mlflow.exceptions import MlflowException

    if parent_run_id:
        try:
            return client.get_run(parent_run_id).info.experiment_id, parent_run_id
        except MlflowException as exc:
            log.warning("parent MLflow run %s not found (%s); not nesting", parent_run_id,
                        _error_text(exc))  # fmt: skip
    return ensure_experiment(client, name), None


def _mirror_contents(
    client: MlflowClient,
    uri: str,
    run: Run,
    run_dir: Path,
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    log_model: bool,
    register: bool,
    result: SyncResult,
) -> None:
    """Params, tags, metrics, model, status, then artifacts with summary.json last."""
    if n := sync_params(client, run, run_params(config)):
        result.changes.append(f"{n} params")
    if n := sync_tags(client, run, run_tags(run_dir, summary, config)):
        result.changes.append(f"{n} tags")
    if n := sync_metrics(client, run, history_points(run_dir) + final_points(summary)):
        result.changes.append(f"{n} metric points")
    if log_model and summary.get("status") == "completed":
        try:
            version = sync_model(client, uri, run, run_dir, register)
        except GeolocError as exc:  # a run without a loadable checkpoint is still mirrored
            log.warning("model of %s not logged: %s", run_dir, _error_text(exc))
            version = None
        if version is not None:
            result.model_version = version
            result.changes.append(f"model v{version}")
        if register:
            update_champion(client)
    if sync_status(client, run, summary):
        result.changes.append(f"status {summary.get('status')}")
    # the local record first, so the uploaded summary.json already says `mirrored: true`
    if summary.get("status") != "running":
        record_tracking(run_dir, True, run.info.run_id, None)
    fresh = client.get_run(run.info.run_id)
    if sync_artifacts(client, fresh, run_dir):
        result.changes.append("artifacts")


def discover_runs(root: Path | None = None) -> list[Path]:
    """Run directories under `root` (default `$GEOLOC_RUNS_DIR`) that have a summary.json."""
    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_")) and RunPaths(p).summary.is_file()
    )


def sync_runs(run_dirs: Iterable[Path] | None = None, **kwargs: Any) -> list[SyncResult]:
    """`sync_run` for each directory (default: every run under `$GEOLOC_RUNS_DIR`); a failure
    of one run is reported in its result and does not stop the others."""
    results = []
    for run_dir in discover_runs() if run_dirs is None else [Path(p) for p in run_dirs]:
        try:
            results.append(sync_run(run_dir, **kwargs))
        except GeolocError as exc:
            results.append(SyncResult(Path(run_dir), Path(run_dir).name, "failed", error=str(exc)))
    return results


# --------------------------------------------------------------------------------------------
# Live mirroring during training
# --------------------------------------------------------------------------------------------


class LiveMirror:
    """Epoch callback that mirrors a training run while it trains; it never raises.

    After the first failure it stops talking to MLflow (training must not wait on retries) and
    `finish` tries once more with a full `sync_run`, which catches up on whatever was missed.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        uri: str | None = None,
        client: MlflowClient | None = None,
        mlflow_run_id: str | None = None,
        error: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.uri = uri
        self.client = client
        self.mlflow_run_id = mlflow_run_id
        self.error = error

    @property
    def active(self) -> bool:
        """True while live logging works."""
        return self.client is not None and self.mlflow_run_id is not None and self.error is None

    @classmethod
    def start(cls, run_dir: Path, cfg: RunConfig) -> LiveMirror:
        """Find or create the MLflow run, log params and tags, note its id in the summary."""
        run_dir = Path(run_dir)
        try:
            uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
            probe(uri)
            client = client_for(uri)
            exp_id, parent = _experiment_for(
                client, cfg.tracking.experiment, cfg.tracking.parent_run_id
            )
            summary = read_summary(run_dir)
            run, _ = open_run(client, exp_id, summary, run_dir, parent)
            config = cfg.model_dump(mode="json")
            sync_params(client, run, run_params(config))
            sync_tags(client, run, run_tags(run_dir, summary, config))
        except Exception as exc:  # noqa: BLE001 - training goes on without MLflow
            error = _error_text(exc)
            log.warning("MLflow mirror of %s unavailable, training goes on: %s", run_dir, error)
            record_tracking(run_dir, False, None, error)
            return cls(run_dir, cfg, error=error)
        record_tracking(run_dir, False, run.info.run_id, None)
        log.info("mirroring %s into MLflow run %s (%s)", run_dir.name, run.info.run_id, uri)
        return cls(run_dir, cfg, uri, client, run.info.run_id)

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.on_epoch_end(epoch, metrics)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Log this epoch's metrics with `step=epoch`."""
        if not self.active:
            return
        from mlflow.entities import Metric

        try:
            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, step) for k, v, step in epoch_points(metrics, epoch)]
            assert self.client is not None and self.mlflow_run_id is not None
            self.client.log_batch(self.mlflow_run_id, metrics=batch, synchronous=True)
        except Exception as exc:  # noqa: BLE001 - never stop training for the mirror
            self.error = _error_text(exc)
            log.warning("MLflow live logging stopped for %s: %s", self.run_dir, self.error)
            record_tracking(self.run_dir, False, self.mlflow_run_id, self.error)

    def finish(self, run_dir: Path | None = None) -> None:
        """Mirror everything the run wrote (final/test metrics, artifacts, model, registry);
        `summary.tracking` says whether it worked."""
        run_dir = Path(run_dir or self.run_dir)
        try:
            result = sync_run(
                run_dir,
                experiment=self.cfg.tracking.experiment,
                tracking_uri=self.cfg.tracking.tracking_uri,
                register=self.cfg.tracking.register_model,
                parent_run_id=self.cfg.tracking.parent_run_id,
            )
            self.mlflow_run_id, self.error = result.mlflow_run_id, None
        except Exception as exc:  # noqa: BLE001 - sync_run recorded it; the run is done anyway
            self.error = _error_text(exc)
            log.warning("MLflow mirror of %s incomplete (run `geoloc mlflow sync`): %s",
                        run_dir, self.error)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Sweeps and the leaderboard
# --------------------------------------------------------------------------------------------


def start_parent_run(
    name: str,
    experiment: str = "geoloc",
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str | None:
    """Create a parent run (a sweep) whose children are the trial runs (`tracking.parent_run_id`).

    Returns its id, or None when tracking is unavailable: a sweep never fails for the mirror.
    """
    try:
        uri = resolve_tracking_uri(tracking_uri)
        probe(uri)
        client = client_for(uri)
        exp_id = ensure_experiment(client, experiment)
        all_tags = {TAG_KIND: "parent", **{k: str(v) for k, v in (tags or {}).items()}}
        if flow_run := prefect_flow_run_id():
            all_tags[TAG_PREFECT_FLOW_RUN] = flow_run
        return client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow parent run %s not created: %s", name, _error_text(exc))
        return None


def end_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> bool:
    """Terminate an MLflow run by id (a sweep's parent when the sweep ends); False on failure."""
    try:
        client_for(resolve_tracking_uri(tracking_uri)).set_terminated(run_id, status=status)
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow run %s not terminated: %s", run_id, _error_text(exc))
        return False


def sweep_parent_run(
    study: str, experiment: str = "geoloc", tracking_uri: str | None = None
) -> str | None:
    """The parent run of sweep `study`: found by its `geoloc.sweep` tag, so a resumed study or a
    second worker adds its trials under the same parent, else created. None when tracking is
    unavailable: a sweep never fails for the mirror."""
    try:
        uri = resolve_tracking_uri(tracking_uri)
        probe(uri)
        client = client_for(uri)
        if "'" in study:
            raise TrackingError(f"study name {study!r} contains a quote")
        found = client.search_runs(
            [ensure_experiment(client, experiment)],
            filter_string=f"tags.`{TAG_SWEEP}` = '{study}' and tags.`{TAG_KIND}` = 'parent'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow parent run of sweep %s unavailable: %s", study, _error_text(exc))
        return None
    if found:
        return found[0].info.run_id
    return start_parent_run(
        f"sweep-{study}", experiment, tags={TAG_SWEEP: study}, tracking_uri=tracking_uri
    )


def log_sweep_summary(
    parent_run_id: str, files: Sequence[Path], tracking_uri: str | None = None
) -> bool:
    """Log a sweep's summary files (trials table, best.json, summary.md, plots) under `sweep/`
    on its parent run and mark it finished; False (and a warning) when the mirror fails."""
    try:
        client = client_for(resolve_tracking_uri(tracking_uri))
        for path in files:
            if Path(path).is_file():
                client.log_artifact(parent_run_id, str(path), "sweep")
        client.set_terminated(parent_run_id, status="FINISHED")
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("sweep summary not logged on MLflow run %s: %s", parent_run_id,
                    _error_text(exc))  # fmt: skip
        return False


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
    experiment: str = "geoloc",
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
    digest = _file_sha256(csv_path)
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
        raise TrackingError(f"leaderboard not logged into {uri}: {_error_text(exc)}") from exc
    rid = run.info.run_id
    try:
        _fill_leaderboard_run(client, rid, csv_path, files)
        client.set_tag(rid, TAG_LEADERBOARD_SHA, digest)
        client.set_terminated(rid)
    except Exception as exc:
        with suppress(Exception):  # the first error is the one to report
            client.set_terminated(rid, status="FAILED")
        raise TrackingError(f"leaderboard not logged into {uri}: {_error_text(exc)}") from exc
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
