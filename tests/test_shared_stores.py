"""Shared stores on a real PostgreSQL cluster: what several machines rely on.

MLflow tracking, Optuna studies and the Prefect server each keep their state in one
PostgreSQL database when a team outgrows SQLite (see README, Scale-out).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fixtures.postgres import PostgresCluster

pytestmark = pytest.mark.postgres


def test_mlflow_tracking_store_on_postgres_keeps_runs_and_metric_history(
    postgres_cluster: PostgresCluster,
) -> None:
    from mlflow import MlflowClient

    uri = postgres_cluster.url("mlflow")
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("geoloc-shared")
    run = client.create_run(exp_id, tags={"geoloc.run_id": "r1"})
    for step, value in enumerate([900.0, 700.0, 650.0]):
        client.log_metric(run.info.run_id, "val_p90_km", value, step=step)
    client.set_terminated(run.info.run_id)

    found = MlflowClient(tracking_uri=uri).search_runs(
        [exp_id], filter_string="tags.`geoloc.run_id` = 'r1'"
    )
    assert len(found) == 1
    history = client.get_metric_history(found[0].info.run_id, "val_p90_km")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [900.0, 700.0, 650.0]


_OPTUNA_WORKER = textwrap.dedent(
    """
    import sys, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, n = sys.argv[1], int(sys.argv[2])
    study = optuna.create_study(study_name="shared", storage=storage, load_if_exists=True,
                                direction="minimize")
    study.optimize(lambda t: (t.suggest_float("x", -5, 5) - 1.0) ** 2, n_trials=n)
    """
)


def test_two_processes_share_one_optuna_study_on_postgres(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    import optuna

    storage = postgres_cluster.url("optuna")
    # the coordinator creates the study (and the schema) once; workers join it. Two processes
    # creating the schema at the same instant race on PostgreSQL's CREATE TYPE.
    optuna.create_study(study_name="shared", storage=storage, direction="minimize")
    script = tmp_path / "worker.py"
    script.write_text(_OPTUNA_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), storage, "6"], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 12
    assert len({t.number for t in done}) == 12  # no trial counted twice
