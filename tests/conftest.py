"""Shared fixtures: every test runs in its own data/runs/tracking folders.

Autouse isolation restores env vars and the working directory, so tests never clobber each
other or the developer's `data/` and `runs/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point data, runs and MLflow at a per-test folder and run the test from there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(work / "data"))
    monkeypatch.setenv("GEOLOC_RUNS_DIR", str(work / "runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_API_ENABLE_HTTP2", "false")
    for var in ("AWS_ENDPOINT_URL", "MAPILLARY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def pytest_report_header(config: pytest.Config) -> str:
    return f"geoloc tests (cpu threads: {os.cpu_count()})"
