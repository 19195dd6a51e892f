"""Where data and runs live.

Every command resolves locations through this module so that `GEOLOC_DATA_DIR` and
`GEOLOC_RUNS_DIR` isolate tests and parallel jobs from each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

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
