"""MLflow mirror: what a user sees in MLflow after training or `geoloc mlflow sync`.

Every test talks to a real store: the per-test SQLite file that `conftest.py` points
`MLFLOW_TRACKING_URI` at, or a real `mlflow server` on a free loopback port (`server` marker).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from fixtures.mlflow_server import closed_port_uri, fast_fail_env
from fixtures.tiny_runs import TINY_TRAINING, add_tiny_model, csv_rows
from mlflow import MlflowClient
from PIL import Image

from geoloc.cli import main
from geoloc.config import load_config
from geoloc.integrations import mlflow as tracking
from geoloc.paths import DataPaths
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary

EPOCH_METRICS = ("train_loss", "val_loss", "val_top1", "val_p90_km", "val_median_km", "lr")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.resolve_tracking_uri(uri))


def mirrored_runs(c: MlflowClient, experiment: str = "geoloc") -> list:
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], max_results=1000)


def history_lengths(c: MlflowClient, run_id: str) -> dict[str, int]:
    keys = c.get_run(run_id).data.metrics
    return {k: len(c.get_metric_history(run_id, k)) for k in keys}


def bucket_keys(s3_env, prefix: str) -> list[str]:
    s3 = s3_env.client()
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_env.bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


# --------------------------------------------------------------------------------------------
# local SQLite store
# --------------------------------------------------------------------------------------------


def test_two_runs_mirrored_with_metrics_per_step_and_resync_changes_nothing(make_run):
    good = make_run("good", epochs=4, seed=0)
    weak = make_run("weak", epochs=3, seed=1, quality=0.4)

    first = tracking.sync_runs(log_model=False)
    assert sorted(r.action for r in first) == ["created", "created"]

    df = mlflow.search_runs(experiment_names=["geoloc"])
    assert len(df) == 2
    by_id = {row[f"tags.{tracking.TAG_RUN_ID}"]: row for _, row in df.iterrows()}
    assert set(by_id) == {good.name, weak.name}
    c = client()
    for run_dir in (good, weak):
        row = by_id[run_dir.name]
        summary = read_summary(run_dir)
        # the mirror is recorded in the run, and points at the right MLflow run
        assert summary["tracking"] == {
            "mirrored": True, "mlflow_run_id": row["run_id"], "error": None
        }  # fmt: skip
        assert row["status"] == "FINISHED"
        assert row["metrics.best_p90_km"] == pytest.approx(summary["best_p90_km"])
        assert row["metrics.test_median_km"] == pytest.approx(summary["test"]["test_median_km"])
        assert row["params.train.lr"] == "0.002"
        assert row["tags.geoloc.loss"] == "geosoft"
        assert row["tags.geoloc.dataset_fingerprint"] == summary["dataset"]["fingerprint"]
        assert row["tags.geoloc.run_dir"] == str(run_dir.resolve())
        # every epoch of metrics.csv is a point at step=epoch
        rows = csv_rows(run_dir)
        for key in EPOCH_METRICS:
            points = sorted((m.step, m.value) for m in c.get_metric_history(row["run_id"], key))
            assert points == [(int(r["epoch"]), pytest.approx(float(r[key]))) for r in rows]
        artifacts = {a.path for a in c.list_artifacts(row["run_id"])}
        assert {"summary.json", "config.json", "artifacts"} <= artifacts
        tables = {a.path for a in c.list_artifacts(row["run_id"], "artifacts/tables")}
        assert "artifacts/tables/metrics.csv" in tables

    before = {rid: history_lengths(c, rid) for rid in df["run_id"]}
    params_before = {rid: c.get_run(rid).data.params for rid in df["run_id"]}
    second = tracking.sync_runs(log_model=False)
    assert [r.action for r in second] == ["unchanged", "unchanged"]
    assert len(mlflow.search_runs(experiment_names=["geoloc"])) == 2
    assert {rid: history_lengths(c, rid) for rid in df["run_id"]} == before
    assert {rid: c.get_run(rid).data.params for rid in df["run_id"]} == params_before


def test_final_values_are_single_values_at_step_0_so_the_ui_shows_values_not_dots(make_run):
    """MLflow's UI draws a metric whose latest step is >= 1 as a line over steps (a lone dot for
    one value) and one whose latest step is 0 as a bar: run-level values go at step 0, the
    epochs of metrics.csv stay a series over their epochs."""
    run_dir = make_run("final", epochs=3)
    (done,) = tracking.sync_runs([run_dir], log_model=False)
    c = client()
    latest = c.get_run(done.mlflow_run_id).data.metrics
    finals = ["best_epoch", "best_p90_km", "best_val_acc", "test_median_km", "test_p90_km",
              "test_geoscore", "epochs_completed"]  # fmt: skip
    for key in finals:
        history = c.get_metric_history(done.mlflow_run_id, key)
        assert [m.step for m in history] == [0], key
        assert latest[key] == history[0].value
    assert latest["best_epoch"] == read_summary(run_dir)["best_epoch"]
    steps = sorted(m.step for m in c.get_metric_history(done.mlflow_run_id, "val_p90_km"))
    assert steps == [1, 2, 3]
    assert tracking.sync_runs([run_dir], log_model=False)[0].action == "unchanged"


def test_sync_updates_a_run_that_changed_instead_of_duplicating_it(make_run):
    run_dir = make_run("grows", epochs=3)
    (created,) = tracking.sync_runs([run_dir], log_model=False)
    # the run goes on: one more epoch in metrics.csv, a report appears
    rows = csv_rows(run_dir)
    next_epoch = int(rows[-1]["epoch"]) + 1
    extra = {**rows[-1], "epoch": str(next_epoch), "val_p90_km": "123.5"}
    with RunPaths(run_dir).metrics_csv.open("a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(rows[0])).writerow(extra)
    RunPaths(run_dir).report.write_text("# report\n")

    (updated,) = tracking.sync_runs([run_dir], log_model=False)
    assert updated.action == "updated"
    assert updated.mlflow_run_id == created.mlflow_run_id
    assert "artifacts" in updated.changes
    c = client()
    assert len(mirrored_runs(c)) == 1
    history = c.get_metric_history(created.mlflow_run_id, "val_p90_km")
    assert sorted(m.step for m in history) == [int(r["epoch"]) for r in rows] + [next_epoch]
    assert {m.value for m in history if m.step == next_epoch} == {123.5}
    assert "REPORT.md" in {a.path for a in c.list_artifacts(created.mlflow_run_id)}


def test_sync_of_a_run_still_training_leaves_its_summary_to_the_trainer(make_run):
    run_dir = make_run("busy", status="running", epochs=2)
    before = RunPaths(run_dir).summary.read_bytes()
    (result,) = tracking.sync_runs([run_dir], log_model=False)
    assert result.action == "created"
    assert RunPaths(run_dir).summary.read_bytes() == before
    assert client().get_run(result.mlflow_run_id).info.status == "RUNNING"


def test_live_mirror_logs_each_epoch_and_the_final_sync_adds_no_duplicates(make_run):
    run_dir = make_run("live", epochs=3)
    cfg = load_config(RunPaths(run_dir).config)
    mirror = tracking.LiveMirror(cfg)
    mirror.begin(run_dir)  # the MLflow run is opened on the mirror thread
    assert mirror.flush() and mirror.error is None
    state = read_summary(run_dir)["tracking"]
    assert state["mirrored"] is False and state["mlflow_run_id"] == mirror.mlflow_run_id

    c = client()
    for row in csv_rows(run_dir):  # what the training loop hands the callback
        mirror(int(row["epoch"]), {k: float(v) for k, v in row.items()})
        assert mirror.flush()
        seen = c.get_metric_history(mirror.mlflow_run_id, "val_top1")
        assert max(m.step for m in seen) == int(row["epoch"])  # visible while training

    mirror.close()
    tracking.sync_run(run_dir)  # what the composer does once the run is done
    assert read_summary(run_dir)["tracking"] == {
        "mirrored": True, "mlflow_run_id": mirror.mlflow_run_id, "error": None
    }  # fmt: skip
    assert len(mirrored_runs(c)) == 1
    for key in EPOCH_METRICS:
        assert len(c.get_metric_history(mirror.mlflow_run_id, key)) == 3
    assert c.get_run(mirror.mlflow_run_id).data.metrics["best_val_acc"] == pytest.approx(
        read_summary(run_dir)["best_val_acc"]
    )


def test_model_is_registered_and_champion_is_the_lowest_p90_run(make_run, tiny_label_space):
    good = make_run("good", epochs=3, seed=0, quality=1.0)
    weak = make_run("weak", epochs=3, seed=1, quality=0.3)
    for run_dir in (weak, good):
        add_tiny_model(run_dir, tiny_label_space)
    assert read_summary(good)["best_p90_km"] < read_summary(weak)["best_p90_km"]

    results = {r.run_dir.name: r for r in tracking.sync_runs([weak, good])}
    assert {r.model_version for r in results.values()} == {"1", "2"}
    c = client()
    champion = c.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION_ALIAS)
    assert champion.run_id == results[good.name].mlflow_run_id

    # the champion is the good run's `geoloc predict`: a photo in, one of its cells out
    model = mlflow.pyfunc.load_model(f"models:/{tracking.MODEL_NAME}@{tracking.CHAMPION_ALIAS}")
    assert model.metadata.run_id == results[good.name].mlflow_run_id
    photo = io.BytesIO()
    Image.new("RGB", (48, 40), (90, 140, 60)).save(photo, format="JPEG")
    (answer,) = model.predict(pd.DataFrame({"image": [photo.getvalue()]})).to_dict("records")
    assert answer["error"] is None and answer["cell"] in tiny_label_space.cells
    assert 0 < answer["prob"] <= 1 and len(answer["topk_cells"]) == 5

    again = tracking.sync_runs([weak, good])
    assert [r.action for r in again] == ["unchanged", "unchanged"]
    assert len(c.search_model_versions(f"name='{tracking.MODEL_NAME}'")) == 2


def test_leaderboard_is_one_run_per_aggregation(make_run):
    from geoloc.presentation.leaderboard import aggregate_runs

    make_run("a", seed=0)
    make_run("b", seed=1, quality=0.5)
    result = aggregate_runs()
    run_id = tracking.log_leaderboard(result)
    assert tracking.log_leaderboard() == run_id  # the same leaderboard, from its folder

    c = client()
    run = c.get_run(run_id)
    assert run.data.tags[tracking.TAG_KIND] == "leaderboard"
    assert run.data.metrics["ranked_runs"] == 2
    files = {a.path for a in c.list_artifacts(run_id, "leaderboard")}
    assert "leaderboard/runs_summary.csv" in files
    assert "leaderboard.json" in {a.path for a in c.list_artifacts(run_id)}
    # in its own experiment, apart from the training runs it ranks
    assert c.get_experiment(run.info.experiment_id).name == "geoloc-leaderboard"
    kinds = [r.data.tags.get(tracking.TAG_KIND) for r in mirrored_runs(c, "geoloc-leaderboard")]
    assert kinds == ["leaderboard"]
    assert mirrored_runs(c) == []


def test_trial_runs_nest_under_a_sweep_parent(make_run):
    parent = tracking.start_parent_run("sweep-s", tags={"geoloc.sweep": "s"})
    assert parent is not None
    run_dir = make_run("trial", epochs=2)
    cfg = load_config(RunPaths(run_dir).config, {"tracking.parent_run_id": parent})
    mirror = tracking.LiveMirror(cfg)
    mirror.begin(run_dir)
    mirror.close()
    tracking.sync_run(run_dir, parent_run_id=parent)

    c = client()
    child = c.get_run(mirror.mlflow_run_id)
    assert child.data.tags[tracking.TAG_PARENT] == parent
    assert child.info.experiment_id == c.get_run(parent).info.experiment_id
    assert tracking.end_run(parent)
    assert c.get_run(parent).info.status == "FINISHED"


def test_a_parent_unknown_to_the_server_does_not_stop_the_mirror(make_run):
    run_dir = make_run("orphan", epochs=2)
    cfg = load_config(RunPaths(run_dir).config, {"tracking.parent_run_id": "f" * 32})
    (result,) = tracking.sync_runs([run_dir], log_model=False)  # config.json has no parent
    mirror = tracking.LiveMirror(cfg)
    mirror.begin(run_dir)
    mirror.close()
    assert mirror.error is None and mirror.mlflow_run_id == result.mlflow_run_id
    (result,) = tracking.sync_runs([run_dir], log_model=False, parent_run_id="f" * 32)
    assert result.action == "unchanged"
    assert tracking.TAG_PARENT not in client().get_run(result.mlflow_run_id).data.tags


def test_prefect_flow_run_id_is_tagged_when_prefect_runs_the_job(make_run, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b6c-flow-run")
    run_dir = make_run("flow")
    (result,) = tracking.sync_runs([run_dir], log_model=False)
    tags = client().get_run(result.mlflow_run_id).data.tags
    assert tags[tracking.TAG_PREFECT_FLOW_RUN] == "0b6c-flow-run"


def test_tracking_uri_defaults_to_sqlite_in_the_working_dir(monkeypatch, isolated_env):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{isolated_env / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1234")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:1234"
    assert tracking.resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{isolated_env / 'x.db'}"


def test_training_mirrors_live_and_registers_its_model(demo_data):
    from geoloc.compose.training import run_training

    cfg = load_config(None, {**TINY_TRAINING, "name": "live-train"})
    run_dir = run_training(cfg, progress=False)

    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    state = summary["tracking"]
    assert state["mirrored"] is True and state["error"] is None
    c = client()
    run = c.get_run(state["mlflow_run_id"])
    assert run.data.tags[tracking.TAG_RUN_ID] == run_dir.name
    assert run.data.tags["geoloc.dataset_fingerprint"] == summary["dataset"]["fingerprint"]
    epochs = [int(r["epoch"]) for r in csv_rows(run_dir)]  # step = the epoch metrics.csv says
    assert len(epochs) == 2
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_loss")) == epochs
    assert run.data.metrics["test_median_km"] == pytest.approx(summary["test"]["test_median_km"])
    assert "REPORT.md" in {a.path for a in c.list_artifacts(run.info.run_id)}
    champion = c.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION_ALIAS)
    assert champion.run_id == run.info.run_id
    assert_runs_table_columns(c, run.info.run_id, run_dir, champion)
    (again,) = tracking.sync_runs([run_dir])
    assert again.action == "unchanged"
    assert len(c.get_run(run.info.run_id).inputs.dataset_inputs) == 1


def assert_runs_table_columns(c: MlflowClient, mlflow_run_id: str, run_dir: Path, version) -> None:
    """What MLflow's runs table shows: a readable name, the dataset, the source, the model."""
    run = c.get_run(mlflow_run_id)
    summary = read_summary(run_dir)
    assert run.info.run_name == f"live-train-{run_dir.name.rsplit('-', 1)[-1]}"
    assert run.data.tags["mlflow.source.name"] == "geoloc train"
    (dataset,) = run.inputs.dataset_inputs
    fingerprint = summary["dataset"]["fingerprint"]
    assert fingerprint.startswith(dataset.dataset.digest) and len(dataset.dataset.digest) >= 12
    profile = json.loads(dataset.dataset.profile)
    assert profile["fingerprint"] == fingerprint
    labels = json.loads(DataPaths.default().labels.read_text())  # the demo index trained on
    counts = labels["split"]["counts"]
    assert profile["train_images"] == counts["train"] and profile["num_rows"] == sum(
        counts.values()
    )
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "train"
    # the Models column: the registered version's LoggedModel is an output of this run, filed in
    # the run's experiment (the runs table searches there; MLflow's default put it in "0")
    (output,) = run.outputs.model_outputs
    assert output.model_id in version.source  # models:/m-<id>: the registered version is it
    model = c.get_logged_model(output.model_id)
    assert model.source_run_id == mlflow_run_id
    assert model.experiment_id == run.info.experiment_id
    assert model.tags["mlflow.source.name"] == "geoloc train"
    assert model.params["train.epochs"] == run.data.params["train.epochs"]


# --------------------------------------------------------------------------------------------
# real servers
# --------------------------------------------------------------------------------------------


@pytest.mark.server
def test_server_down_during_training_then_sync_catches_up(
    make_run, monkeypatch, mlflow_server, capsys
):
    fast_fail_env(monkeypatch)
    dead = closed_port_uri()
    run_dir = make_run("offline", epochs=3)
    cfg = load_config(RunPaths(run_dir).config, {"tracking.tracking_uri": dead})

    t0 = time.monotonic()
    mirror = tracking.LiveMirror(cfg)
    mirror.begin(run_dir)
    for row in csv_rows(run_dir):
        mirror(int(row["epoch"]), {k: float(v) for k, v in row.items()})
    mirror.close()
    with pytest.raises(tracking.TrackingError):  # the composer logs it; the run is done anyway
        tracking.sync_run(run_dir, tracking_uri=dead)
    assert time.monotonic() - t0 < 30  # training is not held up by retries
    state = read_summary(run_dir)["tracking"]
    assert state["mirrored"] is False and "unreachable" in state["error"]
    assert tracking.start_parent_run("sweep", tracking_uri=dead) is None

    # the server is back (a busy machine answers slowly: default timeouts again)
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var)
    sync = ["mlflow", "sync", str(run_dir), "--tracking-uri", mlflow_server.url]
    sync += ["--experiment", "caught-up"]
    assert main(sync) == 0
    assert "created" in capsys.readouterr().out
    assert main(sync) == 0
    assert "1 unchanged" in capsys.readouterr().out

    state = read_summary(run_dir)["tracking"]
    assert state["mirrored"] is True and state["error"] is None
    c = client(mlflow_server.url)
    (run,) = mirrored_runs(c, "caught-up")
    assert run.info.run_id == state["mlflow_run_id"]
    assert len(c.get_metric_history(run.info.run_id, "val_loss")) == 3


@pytest.mark.server
def test_real_training_with_the_server_down_completes_and_syncs_later(
    demo_data, monkeypatch, mlflow_server
):
    from geoloc.compose.training import run_training

    fast_fail_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port_uri())
    run_dir = run_training(load_config(None, {**TINY_TRAINING, "name": "down"}), progress=False)

    summary = read_summary(run_dir)
    assert summary["status"] == "completed"  # nothing lost locally
    assert summary["tracking"]["mirrored"] is False
    assert "unreachable" in summary["tracking"]["error"]

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    (result,) = tracking.sync_runs(experiment="trained-offline")
    assert result.action == "created" and result.model_version is not None
    assert read_summary(run_dir)["tracking"]["mirrored"] is True
    c = client(mlflow_server.url)
    version = c.get_model_version(tracking.MODEL_NAME, result.model_version)
    assert version.run_id == result.mlflow_run_id
    assert len(c.get_metric_history(result.mlflow_run_id, "val_p90_km")) == 2


@pytest.mark.server
def test_mlflow_server_with_s3_artifacts_receives_run_and_model(
    make_run, tiny_label_space, tmp_path, s3_env, mlflow_server_factory
):
    server = mlflow_server_factory(
        f"sqlite:///{tmp_path / 's3-backed.db'}",
        artifacts_destination=s3_env.url("mlflow"),
        env=s3_env.env(),
    )
    run_dir = make_run("to-s3", epochs=2)
    add_tiny_model(run_dir, tiny_label_space)

    result = tracking.sync_run(run_dir, tracking_uri=server.url)
    assert result.action == "created" and result.model_version == "1"

    keys = bucket_keys(s3_env, "mlflow/")
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"summary.json", "config.json", "metrics.csv", "MLmodel"} <= names
    assert any(k.endswith("/artifacts/tables/metrics.csv") for k in keys)
    model_files = [k for k in keys if "/models/" in k or "/model/" in k]
    assert any(k.endswith("MLmodel") for k in model_files)
    # the pyfunc's packed run: the checkpoint it serves travels with the model
    assert any(k.endswith("/artifacts/run/checkpoints/best.pt") for k in model_files)
    c = client(server.url)
    champion = c.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION_ALIAS)
    assert champion.run_id == result.mlflow_run_id


@pytest.mark.server
@pytest.mark.browser
def test_mlflow_ui_lists_mirrored_runs_and_key_metrics(
    make_run, page, mlflow_server, tiny_label_space
):
    runs = [make_run("alpha", seed=0), make_run("beta", seed=1, quality=0.5)]
    add_tiny_model(runs[0], tiny_label_space)
    kw = {"experiment": "ui-check", "tracking_uri": mlflow_server.url, "register": False}
    tracking.sync_runs(runs, **kw)
    c = client(mlflow_server.url)
    exp_id = c.get_experiment_by_name("ui-check").experiment_id
    experiment_page = f"{mlflow_server.url}/#/experiments/{exp_id}/runs"
    names = [
        f"{n}-{r.name.rsplit('-', 1)[-1]}" for n, r in zip(("alpha", "beta"), runs, strict=True)
    ]
    mirrored = runs_by_name(c, exp_id, names)
    datasets = [r.inputs.dataset_inputs[0].dataset.name for r in mirrored]

    page.goto(experiment_page)
    text = wait_for_text(page, [*names, *datasets, "geoloc train"])
    assert "2 matching runs" in text
    # the runs table's row of each run: its dataset, its source and its own LoggedModel `model`,
    # linked to that model's page
    for name, dataset, found in zip(names, datasets, mirrored, strict=True):
        cells = wait_for_cells(page, name, {"Models": "model", "Source": "geoloc train"})
        assert cells["Dataset"].startswith(dataset)
        (output,) = found.outputs.model_outputs
        cell = page.page.locator(f"[role=row][row-index='{cells['row-index']}'] {MODELS_CELL}")
        href = cell.locator("a").get_attribute("href") or ""
        assert href.endswith(f"/experiments/{exp_id}/models/{output.model_id}"), href
    assert page.screenshot("mlflow-experiment-runs").stat().st_size > 10_000

    # the same page's chart view: one chart per metric, the leaderboard ingredients first
    page.goto(f"{experiment_page}?compareRunsMode=CHART")
    wait_for_text(page, ["best_p90_km", "best_val_acc", "last_geo_median_km", names[0]])
    assert page.screenshot("mlflow-experiment-charts").stat().st_size > 10_000


def runs_by_name(c: MlflowClient, experiment_id: str, names: list[str]) -> list:
    """The MLflow runs of `names`, in that order."""
    found = {r.info.run_name: r for r in c.search_runs([experiment_id])}
    assert set(found) == set(names)
    return [found[n] for n in names]


MODELS_CELL = '[col-id="attributes.`Models`"]'
_ROW_CELLS_JS = """([name, columns]) => {
  const nameCell = [...document.querySelectorAll('[role=row] [col-id="attributes.`Run Name`"]')]
    .find((cell) => cell.innerText.includes(name));
  if (!nameCell) return null;
  const index = nameCell.closest('[role=row]').getAttribute('row-index');
  const out = {'row-index': index};
  for (const column of columns) {
    const selector = '[role=row][row-index="' + index + '"] [col-id="attributes.`' + column + '`"]';
    const cell = document.querySelector(selector);
    out[column] = cell ? cell.innerText.trim() : null;
  }
  return out;
}"""


def wait_for_cells(
    page, run_name: str, expected: dict[str, str], timeout: float = 60.0
) -> dict[str, str]:
    """The runs table's cells (Dataset, Source, Models) of the row whose name holds `run_name`,
    once they show `expected` (the Models column fills after its own request); ag-grid splits a
    row across containers, joined here by `row-index`."""
    columns = ["Dataset", "Source", "Models"]
    deadline = time.monotonic() + timeout
    cells = None
    while time.monotonic() < deadline:
        cells = page.page.evaluate(_ROW_CELLS_JS, [run_name, columns])
        if cells and all(cells.get(k) == v for k, v in expected.items()):
            return cells
        time.sleep(1)
    page.screenshot("mlflow-timeout")
    raise AssertionError(f"runs table row {run_name!r} never showed {expected}; it showed {cells}")


def wait_for_text(page, needles: list[str], timeout: float = 120.0) -> str:
    """Poll the page's visible text until it holds every needle (the UI renders in steps and
    slowly on a busy machine); return the text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = page.page.inner_text("body")
        if all(n in text for n in needles):
            return text
        time.sleep(1)
    missing = [n for n in needles if n not in text]
    page.screenshot("mlflow-timeout")
    raise AssertionError(f"MLflow UI never showed {missing}; it showed:\n{text[:2000]}")


def test_a_sweep_keeps_one_parent_run_across_workers_and_logs_its_summary(tmp_path):
    first = tracking.sweep_parent_run("study-a")
    assert first is not None
    assert tracking.sweep_parent_run("study-a") == first  # another worker, or a resume
    assert tracking.sweep_parent_run("study-b") != first

    summary = tmp_path / "summary.md"
    summary.write_text("# sweep\n")
    assert tracking.log_sweep_summary(first, [summary, tmp_path / "missing.csv"])
    c = client()
    assert "sweep/summary.md" in {a.path for a in c.list_artifacts(first, "sweep")}
    assert c.get_run(first).info.status == "FINISHED"
