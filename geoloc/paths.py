"""Where data and runs live.

Every command resolves locations through this module so that `GEOLOC_DATA_DIR` and
`GEOLOC_RUNS_DIR` isolate tests and parallel jobs from each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

DATA_DIR_ENV = "GEOLOC_DATA_DIR"
RUNS_DIR_ENV = "GEOLOC_RUNS_DIR"
DASHBOARD_URL_ENV = "GEOLOC_DASHBOARD_URL"


def data_dir() -> Path:
    """Root of the data tree (`GEOLOC_DATA_DIR`, default `./data`)."""
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


def runs_dir() -> Path:
    """Root of all runs (`GEOLOC_RUNS_DIR`, default `./runs`)."""
    return Path(os.environ.get(RUNS_DIR_ENV, "runs")).resolve()


def runs_url(path: Path) -> str | None:
    """The web address of a file under the runs folder, as `geoloc serve` publishes it.

    `GEOLOC_DASHBOARD_URL` is the base URL the runs folder is served at (e.g.
    `http://127.0.0.1:8765`); None when it is unset or `path` lies outside `runs_dir()`.
    """
    base = os.environ.get(DASHBOARD_URL_ENV, "").strip()
    if not base:
        return None
    try:
        rel = Path(path).resolve().relative_to(runs_dir())
    except ValueError:
        return None
    return f"{base.rstrip('/')}/{quote(rel.as_posix())}"


MLFLOW_UI_URL_ENV = "GEOLOC_MLFLOW_UI_URL"
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
"""Where `make mlflow-ui` serves a local (SQLite) tracking store."""


def mlflow_ui_url() -> str:
    """The MLflow UI's address: `GEOLOC_MLFLOW_UI_URL`, else an http(s) `MLFLOW_TRACKING_URI`
    (a tracking server is its own UI), else `make mlflow-ui`'s (the password stays out)."""
    base = os.environ.get(MLFLOW_UI_URL_ENV, "").strip()
    if not base:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        parts = urlsplit(uri)
        is_web = parts.scheme in ("http", "https") and parts.hostname
        base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" if is_web else ""
    return (base or DEFAULT_MLFLOW_UI_URL).rstrip("/")


def mlflow_run_url(mlflow_run_id: str | None) -> str | None:
    """A link that opens the MLflow run page (MLflow's `#/runs/<id>` route finds its
    experiment); None without a run id."""
    return f"{mlflow_ui_url()}/#/runs/{quote(mlflow_run_id)}" if mlflow_run_id else None


@dataclass(frozen=True)
class DataPaths:
    """The fixed layout below a data root: raw -> processed -> index, plus external and state."""

    root: Path

    @classmethod
    def default(cls) -> DataPaths:
        return cls(data_dir())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def external(self) -> Path:
        return self.root / "external"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def demo(self) -> Path:
        return self.raw / "demo"

    # canonical index files
    @property
    def images(self) -> Path:
        return self.index / "images.parquet"

    @property
    def splits(self) -> Path:
        return self.index / "splits.parquet"

    @property
    def labels(self) -> Path:
        return self.index / "labels.json"

    @property
    def h3_features(self) -> Path:
        return self.index / "h3_features.parquet"

    @property
    def rejects(self) -> Path:
        return self.index / "rejects.parquet"

    # output of processing, input of the index build
    @property
    def processed_manifest(self) -> Path:
        return self.processed / "manifest.parquet"


def aggregate_dir(root: Path | None = None) -> Path:
    """`runs/_aggregate/`: the leaderboard across runs."""
    return (root or runs_dir()) / "_aggregate"


def sweeps_dir(root: Path | None = None) -> Path:
    """`runs/_sweeps/`: Optuna storages and sweep summaries."""
    return (root or runs_dir()) / "_sweeps"
