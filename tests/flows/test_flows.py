"""Flows against a real (ephemeral) Prefect server: results, artifacts, failures, caching."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pandas as pd
import pytest
from fixtures.demo_data import DEMO_FIXTURE_CONFIG, DEMO_FIXTURE_N
from fixtures.prefect_server import free_port
from fixtures.tiny_runs import TINY_MODEL_SETTINGS
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)

from flows.aggregate import aggregate
from flows.index import index
from flows.pipeline import pipeline
from flows.train import train
from geoloc.formatting import fmt_km
from geoloc.paths import DataPaths, runs_dir
from geoloc.presentation.serve import make_server, server_url
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary

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


# tiny but real: 600 demo images at H3 r1, a tiny CNN, one epoch
TINY_INDEX = dict(DEMO_FIXTURE_CONFIG)
TINY_TRAIN = {
    "batch_size": 32,
    "image_size": 32,
    **TINY_MODEL_SETTINGS,
}


def test_pipeline_chains_index_train_report_aggregate() -> None:
    state = pipeline(
        source="demo",
        index_overrides=TINY_INDEX,
        demo_n=DEMO_FIXTURE_N,
        preset="demo",
        epochs=1,
        tracking=True,
        overrides=TINY_TRAIN,
        return_state=True,
    )
    assert state.is_completed(), state.message
    out = state.result()
    run_dir = Path(out["run"]["run_dir"])
    assert run_dir.parent == runs_dir()
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["dataset"]["fingerprint"] == out["index"]["fingerprint"]
    assert RunPaths(run_dir).dashboard.is_file()
    assert RunPaths(run_dir).rerank_eval.is_file()
    assert summary["rerank"]["variant"]
    # MLflow ids travel explicitly: the run's from its summary, the leaderboard's from the task
    assert summary["tracking"]["mirrored"] is True
    assert out["run"]["mlflow_run_id"] == summary["tracking"]["mlflow_run_id"]
    assert out["leaderboard"]["mlflow_run_id"]
    assert out["leaderboard"]["ranked"] == 1
    assert Path(out["leaderboard"]["csv"]).is_file()

    # every subflow published its artifacts on its own flow run
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
        flows = {client.read_flow(c.flow_id).name: c.id for c in children}
    assert set(flows) == {"index", "train", "aggregate"}
    train_art = _artifacts(flows["train"])
    page = train_art["geoloc-run-summary"].data
    assert summary["run_id"] in page
    assert fmt_km(summary["rerank"]["metrics"]["median_km"]) in page
    # without GEOLOC_DASHBOARD_URL no link a browser would refuse (file://), the path instead
    assert "geoloc-run-dashboard" not in train_art
    assert str(RunPaths(run_dir).dashboard) in page and "geoloc serve" in page
    board = json.loads(_artifacts(flows["aggregate"])["geoloc-leaderboard"].data)
    assert [row["run_id"] for row in board] == [summary["run_id"]]
    assert "geoloc-index" in _artifacts(flows["index"])
    own = _artifacts(state.state_details.flow_run_id)
    assert "geoloc-run-summary" in own


EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): loss .*, val top-1 .*%, median .* km, P90 .* km")


def _flow_run_logs(flow_run_id: UUID, until: str, timeout_s: float = 60) -> list[str]:
    """Messages of a flow run (its tasks' too) as the Prefect API stores them; waits until one
    contains `until` (the API log handler sends in batches, in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200,
            )
        messages = [log.message for log in logs]
        if any(until in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(1)


def test_train_flow_logs_each_epoch_and_links_its_dashboard_over_http(
    demo_data: DataPaths, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    runs_dir().mkdir(parents=True)
    server = make_server(runs_dir(), port=0)  # what `geoloc serve` runs
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GEOLOC_DASHBOARD_URL", server_url(server))
    try:
        state = train(preset="demo", epochs=2, tracking=False, overrides=TINY_TRAIN,
                      return_state=True)  # fmt: skip
        assert state.is_completed(), state.message
        out = state.result()
        flow_run_id = state.state_details.flow_run_id
        summary = read_summary(Path(out["run_dir"]))

        # one line per epoch in the flow run's logs, as the Prefect UI shows them
        logs = _flow_run_logs(flow_run_id, until="epoch 2/2")
        epochs = [m.groups() for m in map(EPOCH_LINE.match, logs) if m]
        assert epochs == [("1", "2"), ("2", "2")], logs
        assert any(m.startswith(f"run {summary['run_id']}: ") for m in logs)
        assert any(m.startswith("rerank: ") and " km -> " in m for m in logs)
        # long steps logged lines; no tqdm bar reached the terminal ("decode train" did)
        assert any(m.startswith("decode train: ") for m in logs)
        assert not re.search(r"\d+%\|", capfd.readouterr().err)

        # the run page: km formatted, the reranked result beside the model's, a working link
        arts = _artifacts(flow_run_id)
        page = arts["geoloc-run-summary"].data
        assert fmt_km(summary["rerank"]["metrics"]["median_km"]) in page
        assert fmt_km(summary["test"]["test_median_km"]) in page
        assert not re.search(r"\de[+-]\d", page), "numbers in scientific notation"
        url = f"{server_url(server)}/{summary['run_id']}/dashboard.html"
        assert f"({url})" in arts["geoloc-run-dashboard"].data and f"]({url})" in page
        dashboard = httpx.get(url, timeout=30)
        assert dashboard.status_code == 200 and summary["run_id"] in dashboard.text

        # and the run is on the leaderboard (the `aggregate` subflow), shown on this run's page
        assert out["leaderboard"]["ranked"] == 1
        board_here = json.loads(arts["geoloc-leaderboard"].data)
        assert [row["run_id"] for row in board_here] == [summary["run_id"]]
        board = pd.read_csv(out["leaderboard"]["csv"])
        assert list(board["run_id"]) == [summary["run_id"]]
    finally:
        server.shutdown()
        server.server_close()


def test_failing_task_fails_the_flow_and_a_rerun_reuses_the_cached_index() -> None:
    params = dict(
        source="demo",
        index_overrides=TINY_INDEX,
        demo_n=DEMO_FIXTURE_N,
        preset="demo",
        epochs=1,
        tracking=False,
        # passes every config check, then blows the loss up at run time
        overrides={**TINY_TRAIN, "lr": 1e9},
    )
    failed = pipeline(**params, return_state=True)
    assert failed.is_failed()
    assert "lower train.lr" in (failed.message or ""), failed.message
    # the run that failed says so: it never looks complete
    (run_dir,) = (p for p in runs_dir().iterdir() if not p.name.startswith("_"))
    assert read_summary(run_dir)["status"] == "failed"

    again = index(source="demo", overrides=TINY_INDEX, demo_n=DEMO_FIXTURE_N, return_state=True)
    assert again.is_completed(), again.message
    states = _task_states(again.state_details.flow_run_id)
    assert states["make-demo"] == ["Cached"]
    assert states["ingest"] == ["Cached"]
    assert states["build-index"] == ["Cached"]

    # a stage whose output vanished runs again even though its inputs did not change
    DataPaths.default().labels.unlink()
    third = index(source="demo", overrides=TINY_INDEX, demo_n=DEMO_FIXTURE_N, return_state=True)
    assert third.is_completed(), third.message
    states = _task_states(third.state_details.flow_run_id)
    assert states["ingest"] == ["Cached"]
    assert states["build-index"] == ["Completed"]
    assert DataPaths.default().labels.is_file()


def test_aggregate_publishes_the_leaderboard_and_survives_a_tracking_outage(
    make_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b", "c"):
        make_run(name)
    # nothing listens there: the MLflow task is retried, then only warned about
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    state = aggregate(return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["ranked"] == 3
    assert out["mlflow_run_id"] is None
    flow_run_id = state.state_details.flow_run_id
    board = json.loads(_artifacts(flow_run_id)["geoloc-leaderboard"].data)
    assert [row["rank"] for row in board] == [1, 2, 3]
    with get_client(sync_client=True) as client:
        (logged,) = [
            t
            for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if t.name.startswith("log-leaderboard")
        ]
    assert logged.state.is_failed()
    assert logged.run_count == 3  # two retries: I/O is retried
