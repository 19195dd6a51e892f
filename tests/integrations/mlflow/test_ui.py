"""What a newcomer sees in the MLflow UI (headless Chromium against a real `mlflow server`): the
link geoloc prints opens the runs table in the training view with the key km metrics as columns,
and a registered version shows its description and what it takes and answers."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from fixtures.tiny_runs import add_tiny_model
from mlflow import MlflowClient

from geoloc.geo import LabelSpace
from geoloc.integrations import mlflow as tracking
from geoloc.integrations.mlflow.store import runs_page_url
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary

pytestmark = [pytest.mark.server, pytest.mark.browser]


def with_tiny_model(run_dir: Path, label_space: LabelSpace) -> Path:
    """A synthetic run with a real, loadable checkpoint of the tiny model (and its config)."""
    add_tiny_model(run_dir, label_space)
    return run_dir


def wait_for_text(page, needles: list[str], timeout: float = 120.0) -> str:
    """The page's visible text once it holds every needle (the UI renders in steps)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = page.page.inner_text("body")
        if all(n in text for n in needles):
            return text
        time.sleep(1)
    page.screenshot("first-hour-timeout")
    missing = [n for n in needles if n not in text]
    raise AssertionError(f"MLflow UI never showed {missing}; it showed:\n{text[:2000]}")


@pytest.fixture
def server(mlflow_server_factory, tmp_path, monkeypatch):
    """A private server: registration decisions depend on what the registry already holds."""
    srv = mlflow_server_factory(f"sqlite:///{tmp_path / 'ui.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    monkeypatch.delenv("GEOLOC_MLFLOW_UI_URL", raising=False)
    return srv


def test_the_printed_link_opens_training_runs_with_metric_columns(make_run, page, server) -> None:
    runs = [make_run("alpha", seed=0), make_run("beta", seed=1, quality=0.5)]
    tracking.sync_runs(runs, log_model=False)
    c = MlflowClient(server.url)
    exp_id = c.get_experiment_by_name("geoloc").experiment_id
    url = runs_page_url(exp_id)
    assert url.startswith(server.url)

    # wide enough that the grid renders every column (it skips the ones scrolled out of view)
    page.page.set_viewport_size({"width": 2400, "height": 900})
    page.goto(url)
    text = wait_for_text(page, ["rerank_median_km", "test_p90_km", "best_p90_km", "alpha-"])
    assert "Send your first trace" not in text, "the GenAI view, not the training runs"
    assert "workflowType=machine_learning" in page.page.url
    run = c.search_runs([exp_id], filter_string="tags.`geoloc.run_name` = 'alpha'")[0]
    shown = f"{run.data.metrics['rerank_median_km']:.2f}".rstrip("0").rstrip(".")[:4]
    assert shown in text, "the metric's value is in the table, not only its header"
    assert page.screenshot("first-hour-runs-table").stat().st_size > 10_000


def test_a_registered_version_page_shows_description_and_signature(
    make_run, page, server, tiny_label_space
) -> None:
    run_dir = with_tiny_model(make_run("demo", seed=0), tiny_label_space)
    result = tracking.sync_run(run_dir)
    assert result.model_version == "1"

    page.goto(f"{server.url}/#/models/{tracking.MODEL_NAME}/versions/1")
    # the description, the tags and the schema with named inputs and outputs
    text = wait_for_text(page, [read_summary(run_dir)["run_id"], "P90", "geoloc.data_digest",
                                "test_p90_km", "Inputs (2)", "Outputs (17)"])  # fmt: skip
    assert "Outputs (0)" not in text
    assert page.screenshot("first-hour-model-version").stat().st_size > 10_000


def test_the_prefect_artifact_links_open_the_dashboard_and_the_mlflow_run(
    make_run, page, server, monkeypatch, prefect_harness
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows._artifacts import publish_run
    from geoloc.paths import runs_dir
    from geoloc.presentation.serve import make_server, server_url

    run_dir = make_run("linked", seed=0)
    RunPaths(run_dir).dashboard.write_text(f"<html><body>dashboard of {run_dir.name}</body></html>")
    tracking.sync_run(run_dir, log_model=False)
    http = make_server(runs_dir(), port=0)  # what `geoloc serve` runs
    threading.Thread(target=http.serve_forever, daemon=True).start()
    monkeypatch.setenv("GEOLOC_DASHBOARD_URL", server_url(http))
    try:

        @flow(name="publish-check")
        def publish() -> None:
            publish_run(run_dir)

        state = publish(return_state=True)
        assert state.is_completed(), state.message
        by_run = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=by_run))
        links = {a.key: re.search(r"\((http[^)]+)\)", a.data).group(1) for a in arts
                 if a.type == "markdown" and a.key != "geoloc-run-summary"}  # fmt: skip
        assert set(links) == {"geoloc-run-dashboard", "geoloc-mlflow-run"}, links

        page.goto(links["geoloc-run-dashboard"])
        wait_for_text(page, [f"dashboard of {run_dir.name}"])
        page.goto(links["geoloc-mlflow-run"])
        suffix = run_dir.name.rsplit("-", 1)[-1]
        wait_for_text(page, [f"linked-{suffix}", "geoloc.run_id", "Model training"])
        assert "workflowType=machine_learning" in page.page.url, "the training view"
    finally:
        http.shutdown()
        http.server_close()
