"""The `sweep` flow against a real (ephemeral) Prefect server: trials are `train` subflows."""

from __future__ import annotations

import json
import threading
from typing import Any
from uuid import UUID

import httpx
import pytest
from fixtures.sweep_settings import TAU_SPACE, TINY_SWEEP_BASE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)

from flows.sweep import sweep
from geoloc.paths import DataPaths, runs_dir, sweeps_dir
from geoloc.presentation.serve import make_server, server_url
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]

TINY_BASE = {**TINY_SWEEP_BASE, "rerank.enabled": False}


def _children(flow_run_id: UUID) -> list[Any]:
    """Child flow runs of a flow run, with their flow names, read back from the server."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        return [(client.read_flow(r.flow_id).name, r) for r in runs]


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in arts}


def test_each_trial_is_a_train_subflow_and_the_summary_is_published(
    demo_data: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs_dir().mkdir(parents=True, exist_ok=True)
    server = make_server(runs_dir(), port=0)  # what `geoloc serve` runs
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GEOLOC_DASHBOARD_URL", server_url(server))
    state = sweep(
        n_trials=2, study="flow", pruner="none", space=TAU_SPACE, overrides=TINY_BASE,
        return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    out = state.result()
    assert out["states"] == {"COMPLETE": 2}

    children = _children(state.state_details.flow_run_id)
    assert [name for name, _ in children] == ["train", "train"]
    trial_runs = {r.parameters.get("run_dir") for _, r in children}
    table = json.loads(_artifacts(state.state_details.flow_run_id)["geoloc-sweep-trials"].data)
    assert {str(runs_dir() / row["run_id"]) for row in table} == trial_runs
    for row in table:
        assert read_summary(runs_dir() / row["run_id"])["status"] == "completed"
        assert RunPaths(runs_dir() / row["run_id"]).dashboard.is_file()
    # each trial published its own run page on its train flow run
    for _, child in children:
        assert "geoloc-run-summary" in _artifacts(child.id)

    arts = _artifacts(state.state_details.flow_run_id)
    assert out["best"]["run_id"] in arts["geoloc-sweep-best"].data
    # the summary folder linked over HTTP (browsers refuse file:// links from the Prefect UI)
    url = f"{server_url(server)}/_sweeps/flow/"
    assert f"({url})" in arts["geoloc-sweep-summary"].data
    assert f"]({url})" in arts["geoloc-sweep-best"].data
    try:
        listing = httpx.get(url, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert listing.status_code == 200
    assert all(name in listing.text for name in ("trials.csv", "best.json", "summary.md"))


def test_a_pruned_trial_is_a_pruned_run_and_the_sweep_completes(
    demo_data: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GEOLOC_DASHBOARD_URL", raising=False)
    state = sweep(
        n_trials=1, study="flow-pruned", pruner="threshold", prune_threshold=1.0,
        space=TAU_SPACE, overrides=TINY_BASE, return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    assert state.result()["states"] == {"PRUNED": 1}
    (run_dir,) = (p for p in runs_dir().iterdir() if not p.name.startswith("_"))
    assert read_summary(run_dir)["status"] == "pruned"
    assert RunPaths(run_dir).dashboard.is_file()
    # no served runs folder: the summary folder's path, and no link a browser would refuse
    arts = _artifacts(state.state_details.flow_run_id)
    assert "geoloc-sweep-summary" not in arts
    assert f"`{sweeps_dir() / 'flow-pruned'}`" in arts["geoloc-sweep-best"].data


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"space": []}, "search space is empty"),
        ({"space": [{"key": "epochz", "type": "int", "low": 1, "high": 3}]}, "epochz"),
        ({"storage": "postgresql://geo:s3cret@127.0.0.1:9/optuna", "space": TAU_SPACE},
         "is unreachable"),
    ],
)
def test_bad_settings_fail_the_flow_run_before_any_trial(
    params: dict[str, Any], reason: str
) -> None:
    state = sweep(n_trials=1, overrides=TINY_BASE, **params, return_state=True)
    assert state.is_failed()
    assert reason in (state.message or "")
    assert "s3cret" not in (state.message or "")
    assert _children(state.state_details.flow_run_id) == []
    assert not runs_dir().exists() or not [
        p for p in runs_dir().iterdir() if not p.name.startswith("_")
    ]
