"""`geoloc mlflow sync` is idempotent under concurrency: however many syncs of one run folder
run at once, MLflow holds one run for it and one model version of it; and `champion` only ever
points at a model that loads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from geoloc.integrations import mlflow as tracking


def test_concurrent_syncs_of_one_run_make_one_mlflow_run_and_one_model_version(
    make_run: Callable[..., Path], isolated_env: Path
) -> None:
    uri = f"sqlite:///{isolated_env / 'store' / 'mlflow.db'}"
    run_dir = make_run("synced-3x", epochs=2)
    tracking.sync_run(make_run("first-user", epochs=2), tracking_uri=uri, log_model=False)  # store
    start = threading.Barrier(3)
    results: list[object] = []

    def sync() -> None:
        start.wait()
        try:
            results.append(tracking.sync_run(run_dir, tracking_uri=uri, register=True))
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            results.append(exc)

    threads = [threading.Thread(target=sync) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(isinstance(r, tracking.SyncResult) for r in results), results
    c = MlflowClient(uri)
    experiment = c.get_experiment_by_name("geoloc")
    mirrored = c.search_runs([experiment.experiment_id])
    assert len([r for r in mirrored if r.data.tags[tracking.TAG_RUN_ID] == run_dir.name]) == 1
    versions = c.search_model_versions(f"name='{tracking.MODEL_NAME}'")
    assert len(versions) == 1
    assert sorted(r.action for r in results) == ["created", "unchanged", "unchanged"]


def test_a_model_that_does_not_load_is_never_made_champion(
    make_run: Callable[..., Path],
) -> None:
    run_dir = make_run("pretty-summary", epochs=2)  # best numbers, placeholder checkpoint
    result = tracking.sync_run(run_dir, register=True)
    assert result.model_version == "1"  # logged and registered, as the run asked
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    with pytest.raises(MlflowException):
        c.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION_ALIAS)
