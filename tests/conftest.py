"""Shared fixtures: every test runs in its own data/runs/tracking folders.

Autouse isolation restores env vars and the working directory, so tests never clobber each
other or the developer's `data/` and `runs/`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Shared fixtures live one concern per module in tests/fixtures/ (demo index, moto S3 server,
# Prefect server, PostgreSQL cluster...); every module there is loaded as a plugin.
sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = sorted(
    f"fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point data, runs and MLflow at a per-test folder and run the test from there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(work / "data"))
    monkeypatch.setenv("GEOLOC_RUNS_DIR", str(work / "runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_API_ENABLE_HTTP2", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocesses (CLI, workers) too
    for var in ("AWS_ENDPOINT_URL", "MAPILLARY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(work)
    return work


@pytest.fixture(autouse=True)
def one_torch_thread() -> object:
    """Tiny models on a small shared CI machine: one intra-op thread is faster and steadier
    (two threads slowed a tiny training run ~60x under load), and tests stay independent of
    the core count. Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def pytest_report_header(config: pytest.Config) -> str:
    return f"geoloc tests (cpu threads: {os.cpu_count()})"
