"""`prefect deployment run sweep/optuna` on a real local stack (server, pool, worker)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from fixtures.prefect_server import api_get, api_post, local_stack
from fixtures.sweep_settings import TAU_SPACE, TINY_SWEEP_BASE

from geoloc.paths import DataPaths
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary

pytestmark = pytest.mark.server

TINY_BASE = {**TINY_SWEEP_BASE, "rerank.enabled": False}


def test_sweep_optuna_deployment_runs_its_trials_on_the_worker(
    tmp_path: Path, demo_index: DataPaths
) -> None:
    runs = tmp_path / "runs"
    env = {
        "GEOLOC_DATA_DIR": str(demo_index.root),
        "GEOLOC_RUNS_DIR": str(runs),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    params = {
        "n_trials": "2",
        "pruner": "none",
        "overrides": json.dumps(TINY_BASE),
        "space": json.dumps(TAU_SPACE),
    }
    with local_stack(tmp_path / "state", env) as s:
        args = [arg for k, v in params.items() for arg in ("--param", f"{k}={v}")]
        r = s.prefect(
            "deployment", "run", "sweep/optuna", *args, "--watch", "--watch-timeout", "600",
            timeout=660,
        )  # fmt: skip
        out = r.stdout + r.stderr
        found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert found, f"no flow run id in the CLI output:\n{out}\n{s.logs()}"
        flow_run = api_get(s.api_url, f"flow_runs/{found.group(1)}")
        assert flow_run["state"]["type"] == "COMPLETED", f"{out}\n{s.logs()}"
        children = api_post(
            s.api_url,
            "flow_runs/filter",
            {"flow_runs": {"parent_flow_run_id": {"any_": [found.group(1)]}}},
        )
    trials = pd.read_csv(runs / "_sweeps" / "geoloc-sweep" / "trials.csv")
    assert trials["state"].tolist() == ["COMPLETE", "COMPLETE"]
    for run_id in trials["run_id"]:
        assert read_summary(runs / run_id)["status"] == "completed"
        assert RunPaths(runs / run_id).dashboard.is_file()
    # each trial was a `train` child flow run of the sweep's flow run
    assert sorted(c["parameters"]["run_dir"] for c in children) == sorted(
        str(runs / run_id) for run_id in trials["run_id"]
    )
