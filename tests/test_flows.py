"""Flows against a real (ephemeral) Prefect server: results, artifacts, failures, caching."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.train import train
from geoloc.paths import runs_dir

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]


def _task_states(flow_run_id: UUID) -> dict[str, list[str]]:
    """Task name -> state names of one flow run, read back from the server."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name if run.state else "")
    return out


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in arts}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"epochs": 0}, "train.epochs: Input should be greater than or equal to 1"),
        ({"overrides": {"no_such_key": 1}}, "unknown config key 'no_such_key'"),
        ({"preset": "nope"}, "config file 'nope' does not exist"),
        ({"epochs": "two"}, "epochs: Input should be a valid integer"),
    ],
)
def test_bad_parameters_fail_the_run_before_any_work(params: dict[str, Any], reason: str) -> None:
    state = train(**params, return_state=True)
    assert state.is_failed()
    assert reason in (state.message or "")
    # nothing was started: no run directory, no training task
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
    states = _task_states(state.state_details.flow_run_id)
    assert "train-model" not in states
    assert states.get("validate-config", ["Failed"]) == ["Failed"]
