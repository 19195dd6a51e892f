"""Tracking under hostile or unlucky conditions, as a user meets them.

- A password in a tracking URI (environment, `--set`, `--tracking-uri`, a flow parameter) never
  reaches a file of the run, MLflow params or any output line; it still authenticates.
- Concurrent first users of a new SQLite store (MLflow's or Optuna's) are all served; a store
  left half-migrated gets a one-line error with the fix.
- A tracking server that hangs or dies mid-run never holds up training; the run keeps its MLflow
  run id and the next sync resumes that run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures.mlflow_server import closed_port_uri, fast_fail_env
from fixtures.tiny_runs import TINY_TRAINING, csv_rows
from mlflow import MlflowClient

from geoloc.cli import main
from geoloc.compose.params import run_config_from_params
from geoloc.compose.training import run_training
from geoloc.config import load_config
from geoloc.errors import redact, split_password
from geoloc.integrations import mlflow as tracking
from geoloc.integrations import optuna as sweeps
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary

SECRET_SET = "pw-from-set-7Qx"
SECRET_ENV = "pw-from-env-9Kz"
SECRET_CLI = "pw-from-cli-3Jv"
SECRETS = (SECRET_SET, SECRET_ENV, SECRET_CLI)


def tiny_args(name: str, **extra: Any) -> list[str]:
    """`--set` arguments of a seconds-long `geoloc train` on the demo index."""
    args: list[str] = []
    for key, value in {**TINY_TRAINING, "name": name, **extra}.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def geoloc(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`geoloc ARGS` as a user runs it: its own process, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "geoloc", *args], env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + (err or "")


def strings_in(obj: Any) -> Iterator[str]:
    """Every string (keys included) in a nested dict/list of an unpickled checkpoint."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from strings_in(value)


def leaks(root: Path, texts: dict[str, str]) -> list[str]:
    """Where a secret shows: any file under `root` (bytes, and checkpoints unpickled) or text."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
        if path.suffix == ".pt":
            text = "\n".join(strings_in(torch.load(path, weights_only=True, map_location="cpu")))
            found += [f"{path} (unpickled): {s}" for s in SECRETS if s in text]
    for name, text in texts.items():
        found += [f"{name}: {s}" for s in SECRETS if s in text]
    return found


# --------------------------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://u:pw@h:5000/x", "http://u:***@h:5000/x"),
        ("postgresql+psycopg://geoloc:pw@db:5432/m", "postgresql+psycopg://geoloc:***@db:5432/m"),
        ("API request to http://a:p%40ss@h/api failed; see https://b:q@k", "API request to "
         "http://a:***@h/api failed; see https://b:***@k"),  # fmt: skip
        ("http://u:p@ss@host/x", "http://u:***@host/x"),  # an unencoded '@' in the password
        ("https://x/images?access_token=abc&bbox=1", "https://x/images?access_token=***&bbox=1"),
        ("sqlite:////tmp/mlflow.db and http://user@h:1", "sqlite:////tmp/mlflow.db and http://user@h:1"),
    ],
)  # fmt: skip
def test_redact_masks_every_password_in_a_text(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected
    assert sweeps.redact is redact  # one helper for Optuna storage URLs too


def test_cli_log_lines_and_tracebacks_mask_passwords(capsys):
    from geoloc.cli import _REDACT, _redacted_excepthook

    url = f"http://u:{SECRET_ENV}@h/api"
    record = logging.LogRecord("mlflow", logging.WARNING, "x.py", 1, "request to %s", (url,), None)
    assert _REDACT.filter(record) and record.getMessage() == "request to http://u:***@h/api"
    try:
        raise RuntimeError(f"unexpected: {url} is down")
    except RuntimeError as exc:
        _redacted_excepthook(RuntimeError, exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "RuntimeError: unexpected: http://u:***@h/api is down" in err
    assert SECRET_ENV not in err


def test_a_password_in_the_tracking_uri_moves_to_the_environment(monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "restored-after-the-test")
    assert split_password("http://bob:s%3Acret@h:1/p") == ("http://bob@h:1/p", "bob", "s:cret")

    cfg = load_config(None, [f"tracking.tracking_uri=http://bob:{SECRET_SET}@h:5000/"])
    assert cfg.tracking.tracking_uri == "http://bob@h:5000/"
    assert SECRET_SET not in cfg.model_dump_json()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob"  # what MLflow's client sends
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET_SET
    # a Prefect flow parameter goes through the same config
    flow_cfg = run_config_from_params(
        None, {"epochs": 1}, {"tracking.tracking_uri": f"https://eve:{SECRET_ENV}@mlflow:443"}
    )
    assert flow_cfg.tracking.tracking_uri == "https://eve@mlflow:443"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET_ENV


def test_no_file_or_output_line_of_a_run_holds_a_tracking_password(
    demo_data, make_run, monkeypatch, capsys, caplog, isolated_env
):
    fast_fail_env(monkeypatch)
    down = closed_port_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down.replace("//", f"//alice:{SECRET_ENV}@"))
    monkeypatch.setenv("GEOLOC_LOG_LEVEL", "INFO")
    set_uri = down.replace("//", f"//bob:{SECRET_SET}@") + "/"
    # a real `geoloc train` with the password in --set; the server is down
    code, train_out = finish(geoloc("train", *tiny_args("secret"), "--set",
                                    f"tracking.tracking_uri={set_uri}"))  # fmt: skip
    assert code == 0, train_out
    (trained,) = tracking.discover_runs()
    summary = read_summary(trained)
    assert summary["status"] == "completed"
    host = down.removeprefix("http://")
    assert f"bob@{host}" in summary["tracking"]["error"]  # the URI is named, not its password
    state = torch.load(RunPaths(trained).best_checkpoint, weights_only=True)
    assert state["config"]["tracking"]["tracking_uri"] == down.replace("//", "//bob@") + "/"

    # `geoloc mlflow sync`: a run using the environment's URI, then an explicit --tracking-uri
    fake = make_run("env-uri", with_checkpoints=False)
    assert main(["mlflow", "sync"]) == 1
    assert f"alice:***@{host}" in read_summary(fake)["tracking"]["error"]
    cli_uri = down.replace("//", f"//carol:{SECRET_CLI}@")
    assert main(["mlflow", "sync", "--tracking-uri", cli_uri]) == 1
    sync_out = capsys.readouterr()
    assert "carol:***@" in sync_out.out
    # MLflow params and tags: the trained run mirrored into a local store after all
    (result,) = tracking.sync_runs([trained], tracking_uri="sqlite:///local.db", log_model=False)
    run = MlflowClient("sqlite:///local.db").get_run(result.mlflow_run_id)
    assert run.data.params["tracking.tracking_uri"] == down.replace("//", "//bob@") + "/"
    mlflow_text = repr(run.data.params) + repr(run.data.tags)
    texts = {"train output": train_out, "sync stdout": sync_out.out, "sync stderr": sync_out.err,
             "log records": caplog.text, "MLflow params and tags": mlflow_text}  # fmt: skip
    assert leaks(isolated_env, texts) == []


@pytest.mark.server
def test_a_password_given_in_the_config_still_authenticates(
    make_run, monkeypatch, mlflow_server_factory, tmp_path
):
    admin_password = SECRET_SET + "-long-enough"
    server = mlflow_server_factory(
        f"sqlite:///{tmp_path / 'auth-backend.db'}", args=["--app-name", "basic-auth"],
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
             "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"},
    )  # fmt: skip
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    run_dir = make_run("auth")
    url = server.url.replace("//", "//admin@")
    with pytest.raises(tracking.TrackingError, match="401"):  # no password anywhere: refused
        tracking.sync_run(run_dir, tracking_uri=url, log_model=False)

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "restored-after-the-test")
    uri = server.url.replace("//", f"//admin:{admin_password}@")
    cfg = load_config(RunPaths(run_dir).config, [f"tracking.tracking_uri={uri}"])
    RunPaths(run_dir).config.write_text(cfg.model_dump_json())  # what training saves
    assert admin_password not in RunPaths(run_dir).config.read_text()
    result = tracking.sync_run(run_dir, log_model=False)  # the URI from config.json
    assert result.action == "created"
    assert read_summary(run_dir)["tracking"]["mirrored"] is True


# --------------------------------------------------------------------------------------------
# concurrent first use of a new SQLite store
# --------------------------------------------------------------------------------------------


def test_concurrent_first_syncs_into_a_new_sqlite_store_all_land(make_run, isolated_env):
    uri = f"sqlite:///{isolated_env / 'fresh' / 'mlflow.db'}"
    runs = [make_run(f"together-{i}", epochs=2, seed=i) for i in range(4)]
    procs = [geoloc("mlflow", "sync", str(r), "--no-model", "--tracking-uri", uri) for r in runs]
    outcomes = [finish(p) for p in procs]
    assert [code for code, _ in outcomes] == [0] * 4, "\n".join(out for _, out in outcomes)

    c = MlflowClient(uri)
    mirrored = c.search_runs([c.get_experiment_by_name("geoloc").experiment_id])
    assert sorted(r.data.tags[tracking.TAG_RUN_ID] for r in mirrored) == sorted(
        r.name for r in runs
    )
    assert all(read_summary(r)["tracking"]["mirrored"] for r in runs)


def test_concurrent_first_users_of_a_new_optuna_storage_all_get_the_study(isolated_env):
    url = f"sqlite:///{isolated_env / 'sweeps' / 'optuna.db'}"
    code = (
        "import sys, optuna; from geoloc.integrations.optuna import open_storage; "
        "optuna.create_study(study_name='s', storage=open_storage(sys.argv[1]), "
        "load_if_exists=True)"
    )
    run = [sys.executable, "-c", code, url]
    procs = [
        subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(4)
    ]
    outcomes = [finish(p) for p in procs]
    assert [rc for rc, _ in outcomes] == [0] * 4, "\n".join(out for _, out in outcomes)
    import optuna

    assert optuna.get_all_study_names(sweeps.open_storage(url)) == ["s"]


def test_a_half_migrated_store_gets_one_line_with_the_fix(make_run, isolated_env, capsys):
    db = isolated_env / "broken.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments()  # a complete store...
    with sqlite3.connect(db) as con:  # ...that an interrupted migration left a table in
        con.execute("CREATE TABLE _alembic_tmp_experiments (id INTEGER)")
    run_dir = make_run("victim")
    assert main(["mlflow", "sync", str(run_dir), "--no-model", "--tracking-uri", uri]) == 1
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("failed")]
    assert f"MLflow store '{db}' is half-migrated" in line
    assert f"mlflow db upgrade {uri}" in line

    # the fix it names works
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE _alembic_tmp_experiments")
    upgrade = subprocess.run([Path(sys.executable).parent / "mlflow", "db", "upgrade", uri],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    assert main(["mlflow", "sync", str(run_dir), "--no-model", "--tracking-uri", uri]) == 0


@pytest.mark.slow
def test_concurrent_trainings_against_a_new_sqlite_store_are_all_mirrored(demo_data, isolated_env):
    uri = f"sqlite:///{isolated_env / 'shared' / 'mlflow.db'}"
    procs = [geoloc("train", *tiny_args(f"par-{i}", seed=i), env={"MLFLOW_TRACKING_URI": uri})
             for i in range(4)]  # fmt: skip
    outcomes = [finish(p, timeout=1200) for p in procs]
    assert [code for code, _ in outcomes] == [0] * 4, "\n".join(out for _, out in outcomes)

    run_dirs = tracking.discover_runs()
    assert len(run_dirs) == 4
    c = MlflowClient(uri)
    for run_dir in run_dirs:
        state = read_summary(run_dir)["tracking"]
        assert state["mirrored"] is True, state
        run = c.get_run(state["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert len(c.get_metric_history(run.info.run_id, "val_loss")) == 2
    versions = c.search_model_versions(f"name='{tracking.MODEL_NAME}'")
    assert len(versions) == 4


# --------------------------------------------------------------------------------------------
# outages: training never waits for the tracking server
# --------------------------------------------------------------------------------------------


def test_a_tracking_server_that_never_answers_does_not_hold_up_the_epochs(make_run):
    with socket.socket() as black_hole:  # accepts connections, never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        run_dir = make_run("hung", epochs=3)
        uri = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        cfg = load_config(RunPaths(run_dir).config, {"tracking.tracking_uri": uri})
        mirror = tracking.LiveMirror(cfg, close_timeout_s=0.5)

        t0 = time.monotonic()
        mirror.begin(run_dir)  # the health check alone would wait 5 s
        for row in csv_rows(run_dir):
            mirror(int(row["epoch"]), {k: float(v) for k, v in row.items()})
        mirror.close()
        waited = time.monotonic() - t0
    assert waited < 3.0  # a behaviour bound (close's 0.5 s plus slack), not a speed claim
    error = read_summary(run_dir)["tracking"]["error"]
    assert "did not take the last epochs within 0.5 s" in error


def wait_for_mirrored_epoch(url: str, run_name: str, epoch: int, timeout: float = 180) -> None:
    """Poll the server until the live mirror logged `epoch` of the run named `run_name`."""
    c = MlflowClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = c.get_experiment_by_name("geoloc")
        query = f"tags.`geoloc.run_name` = '{run_name}'"
        runs = c.search_runs([exp.experiment_id], query) if exp is not None else []
        steps = {m.step for r in runs for m in c.get_metric_history(r.info.run_id, "val_loss")}
        if epoch in steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"the live mirror never logged epoch {epoch} of {run_name}")


@pytest.mark.server
def test_a_server_killed_mid_run_costs_training_nothing_and_the_next_sync_resumes(
    demo_data, mlflow_server_factory, tmp_path
):
    three_epochs = {**TINY_TRAINING, "epochs": 3}
    t0 = time.monotonic()
    run_training(load_config(None, {**three_epochs, "name": "baseline",
                                    "tracking.enabled": False}), progress=False)  # fmt: skip
    baseline = time.monotonic() - t0

    backend = tmp_path / "backend.db"
    server = mlflow_server_factory(f"sqlite:///{backend}")
    outside_training: list[float] = []  # the test's own waiting, not the run's

    def kill_after_first_epoch(epoch: int, metrics: dict) -> None:
        if epoch != 1:
            return
        k0 = time.monotonic()
        wait_for_mirrored_epoch(server.url, "outage", epoch=1)  # the MLflow run is open...
        os.killpg(server.process.pid, signal.SIGKILL)  # ...when its server dies
        server.process.wait(timeout=30)
        outside_training.append(time.monotonic() - k0)

    cfg = load_config(None, {**three_epochs, "name": "outage",
                             "tracking.tracking_uri": server.url})  # fmt: skip
    t0 = time.monotonic()
    run_dir = run_training(cfg, callbacks=[kill_after_first_epoch], progress=False)
    elapsed = time.monotonic() - t0 - sum(outside_training)
    print(f"baseline {baseline:.1f} s, with the server killed {elapsed:.1f} s "
          f"(ratio {elapsed / baseline:.2f})")  # fmt: skip

    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    state = summary["tracking"]
    assert state["mirrored"] is False and state["error"]
    assert state["mlflow_run_id"] is not None  # kept for the sync that resumes it
    assert elapsed < baseline * 1.1 + 10  # generous bound; without it: a ~240 s stall
    stored = MlflowClient(f"sqlite:///{backend}").get_run(state["mlflow_run_id"])
    assert stored.data.tags[tracking.TAG_RUN_ID] == run_dir.name

    # the server comes back (same backend store): the next sync resumes that very run
    revived = mlflow_server_factory(f"sqlite:///{backend}")
    result = tracking.sync_run(run_dir, tracking_uri=revived.url, log_model=False)
    assert result.mlflow_run_id == state["mlflow_run_id"] and result.action == "updated"
    c = MlflowClient(revived.url)
    assert c.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert len(c.get_metric_history(result.mlflow_run_id, "val_loss")) == 3
    assert read_summary(run_dir)["tracking"] == {
        "mirrored": True, "mlflow_run_id": state["mlflow_run_id"], "error": None
    }  # fmt: skip
