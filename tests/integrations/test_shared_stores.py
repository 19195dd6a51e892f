"""Shared stores on a real PostgreSQL cluster: what several machines rely on.

MLflow tracking, Optuna studies and the Prefect server each keep their state in one
PostgreSQL database when a team outgrows SQLite (see docs/scale-out.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fixtures.postgres import PostgresCluster
from fixtures.prefect_server import STARTUP_TIMEOUT_S, api_get, api_post, free_port

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


_PREFECT_CLIENT = textwrap.dedent(
    """
    from prefect import flow, task

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(name="shared-store-check")
    def check(n: int) -> int:
        return sum(double.map(range(n)).result())

    state = check(4, return_state=True)
    print(state.state_details.flow_run_id, state.result())
    """
)


@contextmanager
def prefect_server_on(database_url: str, home: Path) -> Iterator[str]:
    """`prefect server start` on a free loopback port over `database_url`; yields the API URL.

    The server runs in its own process group, killed whole on the way out, test failed or not.
    """
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                api_get(api_url, "health")
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"prefect server did not start:\n{_tail(home / 'server.log')}")
                time.sleep(1.0)
        yield api_url
    finally:
        _stop_group(proc)
        log.close()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM the server's process group (uvicorn and services), KILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.server
def test_prefect_server_on_postgres_records_a_completed_flow_run(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    import psycopg2

    home = tmp_path / "prefect-home"
    home.mkdir()
    with prefect_server_on(postgres_cluster.url("prefect", "postgresql+asyncpg"), home) as api:
        script = tmp_path / "client.py"
        script.write_text(_PREFECT_CLIENT)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-home"))
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        run_id, result = done.stdout.split()[-2:]
        assert result == "12"

        run = api_get(api, f"flow_runs/{run_id}")
        assert run["state"]["type"] == "COMPLETED"
        tasks = api_post(api, "task_runs/filter",
                         {"flow_runs": {"id": {"any_": [run_id]}}})  # fmt: skip
        assert sorted(t["state"]["type"] for t in tasks) == ["COMPLETED"] * 4

    # the run is in PostgreSQL itself, not in a SQLite file next to the server
    conn = psycopg2.connect(host=postgres_cluster.host, port=postgres_cluster.port,
                            user=postgres_cluster.user, dbname="prefect")  # fmt: skip
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state_type FROM flow_run WHERE id = %s", (run_id,))
            assert cur.fetchone() == ("COMPLETED",)
    finally:
        conn.close()
    assert not list(home.glob("*.db"))
