"""prefect.yaml end to end: `infra/stack.sh up` (server, pool, deploy --all, worker), CLI runs.

One stack per module on a free loopback port with its own PREFECT_HOME; the worker trains on
the shared tiny demo index and writes runs into this module's folder. The stack is stopped by
its pid files when the module ends, also after a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fixtures.prefect_server import STACK, LocalStack, api_get, api_post, local_stack

from geoloc.paths import DataPaths
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary

pytestmark = pytest.mark.server

TINY = [
    "epochs=1",
    "batch_size=32",
    "image_size=32",
    "arch=multiscale_cnn",
    "width=8",
    "tracking=false",
    'overrides={"embed_dim": 32, "depth": 3}',
]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, demo_index: DataPaths
) -> Iterator[tuple[LocalStack, Path]]:
    work = tmp_path_factory.mktemp("stack")
    runs = work / "runs"
    env = {
        "GEOLOC_DATA_DIR": str(demo_index.root),
        "GEOLOC_RUNS_DIR": str(runs),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }
    with local_stack(work / "state", env) as s:
        yield s, runs


def _run_deployment(s: LocalStack, name: str, params: list[str]) -> tuple[str, dict]:
    """`prefect deployment run NAME --param ... --watch`; returns (CLI output, flow run)."""
    args = [arg for p in params for arg in ("--param", p)]
    watch = ["--watch", "--watch-timeout", "600"]
    r = s.prefect("deployment", "run", name, *args, *watch, timeout=660)
    out = r.stdout + r.stderr
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert found, f"no flow run id in the CLI output:\n{out}\n{s.logs()}"
    return out, api_get(s.api_url, f"flow_runs/{found.group(1)}")


def test_every_deployment_is_registered_with_the_nightly_cron(stack) -> None:
    s, _ = stack
    status = subprocess.run(
        ["bash", str(STACK), "status"], env=s.env, capture_output=True, text=True, check=False
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert "server: running" in status.stdout and "worker: running" in status.stdout
    names = {
        d["name"]: d
        for d in api_post(s.api_url, "deployments/filter", {"limit": 50})
        if d["work_pool_name"] == "geoloc-process"
    }
    assert {"geosoft", "ce", "demo", "nightly"} <= set(names)
    nightly = api_get(s.api_url, "deployments/name/aggregate/nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    geosoft = api_get(s.api_url, "deployments/name/train/geosoft")
    assert geosoft["parameters"] == {"preset": "geosoft"}
    # the UI builds its form from this schema: the flat config keys are there, typed
    props = geosoft["parameter_openapi_schema"]["properties"]
    assert {"epochs", "lr", "loss", "hierarchy", "overrides"} <= set(props)
    # resolved by each worker from its own environment when a run starts
    step = geosoft["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $GEOLOC_HOME }}"


def _flow_run_logs(s: LocalStack, flow_run_id: str, until: str) -> list[str]:
    """The flow run's log messages as the UI shows them (tasks included); the worker's flow
    process sends them in batches, so wait until one contains `until` (or 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
        messages = [log["message"] for log in api_post(s.api_url, "logs/filter", body)]
        if any(until in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(1)


def test_train_geosoft_deployment_trains_on_the_worker(stack) -> None:
    s, runs = stack
    params = [p for p in TINY if not p.startswith("epochs=")] + ["epochs=2"]
    out, flow_run = _run_deployment(s, "train/geosoft", params)
    assert flow_run["state"]["type"] == "COMPLETED", f"{out}\n{s.logs()}"
    (run_dir,) = [p for p in runs.iterdir() if not p.name.startswith("_")]
    summary = read_summary(run_dir)  # validates against schema v1
    assert summary["status"] == "completed"
    assert summary["epochs_completed"] == 2
    # the flow run's logs in the API hold one line per epoch (not only Prefect's own lines)
    logs = _flow_run_logs(s, flow_run["id"], until="epoch 2/2")
    epochs = [m.group(1) for m in map(re.compile(r"^epoch (\d+)/2: loss .* km").match, logs) if m]
    assert epochs == ["1", "2"], "\n".join(logs)
    # its dashboard opens from the UI: the artifact links the stack's `geoloc serve`
    arts = api_post(s.api_url, "artifacts/filter",
                    {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})  # fmt: skip
    (link,) = [a["data"] for a in arts if a["key"] == "geoloc-run-dashboard"]
    url = re.search(r"\((http://[^)]+)\)", link).group(1)
    assert url.endswith(f"/{run_dir.name}/dashboard.html")
    page = httpx.get(url, timeout=30)
    assert page.status_code == 200 and run_dir.name in page.text
    # and the run is on the leaderboard
    board = pd.read_csv(runs / "_aggregate" / "runs_summary.csv")
    assert run_dir.name in set(board["run_id"])
    assert RunPaths(run_dir).dashboard.is_file()
    # the deployment's preset, with the CLI's parameters on top
    cfg = json.loads(RunPaths(run_dir).config.read_text())
    assert (cfg["train"]["loss"], cfg["model"]["head"]) == ("geosoft_sparse", "factorised")
    assert cfg["hardneg"]["enabled"] is False


def test_bad_parameter_fails_the_flow_run_with_the_reason(stack) -> None:
    s, runs = stack
    before = set(runs.iterdir()) if runs.exists() else set()
    out, flow_run = _run_deployment(s, "train/ce", ["epochs=0"])
    assert flow_run["state"]["type"] == "FAILED"
    reason = "train.epochs: Input should be greater than or equal to 1"
    assert reason in flow_run["state"]["message"]
    assert (set(runs.iterdir()) if runs.exists() else set()) == before
