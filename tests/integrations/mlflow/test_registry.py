"""The first hour in the tools a user already has: the registry holds decisions that say what
they are, run pages link MLflow, sweeps say what they fixed and where each trial is, and the
leaderboard score of a run does not depend on which other runs exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from fixtures.tiny_runs import add_tiny_model
from mlflow import MlflowClient

from geoloc.config import RunConfig
from geoloc.geo import LabelSpace
from geoloc.integrations import mlflow as tracking
from geoloc.integrations.optuna import SweepConfig, run_sweep
from geoloc.paths import mlflow_run_url
from geoloc.presentation.digest import run_digest
from geoloc.presentation.leaderboard_score import reference_score
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary, update_summary


def with_tiny_model(run_dir: Path, label_space: LabelSpace) -> Path:
    """A synthetic run with a real, loadable checkpoint of the tiny model (and its config)."""
    add_tiny_model(run_dir, label_space)
    return run_dir


def versions(c: MlflowClient) -> list[Any]:
    return c.search_model_versions(f"name='{tracking.MODEL_NAME}'")


def test_a_run_that_does_not_beat_the_champion_is_not_registered_unless_asked(
    make_run, tiny_label_space
) -> None:
    good = with_tiny_model(make_run("good", seed=0, quality=1.0), tiny_label_space)
    weak = with_tiny_model(make_run("weak", seed=1, quality=0.3), tiny_label_space)
    assert tracking.sync_run(good).model_version == "1"

    skipped = tracking.sync_run(weak)
    assert skipped.model_version is None, "a weaker run must not become a registry version"
    c = MlflowClient()
    assert len(versions(c)) == 1
    # its model is still logged on the run (the runs table links it), just not registered
    assert c.get_run(skipped.mlflow_run_id).outputs.model_outputs

    asked = tracking.sync_run(weak, register=True)  # `geoloc mlflow sync --register`
    assert asked.model_version == "2"
    champion = c.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION_ALIAS)
    assert str(champion.version) == "1", "registering on request does not crown a weaker run"


def test_a_registered_version_says_what_it_is_and_what_it_answers(
    make_run, tiny_label_space
) -> None:
    run_dir = with_tiny_model(make_run("demo", seed=0), tiny_label_space)
    result = tracking.sync_run(run_dir)
    c = MlflowClient()
    version = c.get_model_version(tracking.MODEL_NAME, result.model_version)
    summary = read_summary(run_dir)
    assert summary["run_id"] in version.description and "P90" in version.description
    assert version.tags["geoloc.run_name"] == "demo"
    assert summary["dataset"]["fingerprint"].startswith(version.tags["geoloc.data_digest"])
    assert float(version.tags["test_p90_km"]) > 0 and float(version.tags["test_geoscore"]) >= 0

    info = mlflow.models.get_model_info(f"models:/{tracking.MODEL_NAME}/{version.version}")
    assert info.signature.inputs.input_names() == ["image", "path"]
    outputs = info.signature.outputs.input_names()
    assert {"lat", "lon", "prob", "radius_km", "topk_cells", "topk_lats", "topk_lons"} <= set(
        outputs
    )
    assert info.saved_input_example_info is not None, "the registry shows an input example"

    model = c.get_logged_model(info.model_id)
    metrics = {m.key: m for m in model.metrics or []}
    assert "test_p90_km" in metrics, "the model page lists the run's test metrics"
    assert metrics["test_p90_km"].dataset_digest, "...against the dataset it was tested on"


def test_a_runs_score_against_the_fixed_reference_does_not_depend_on_other_runs() -> None:
    good = {"best_val_acc": 0.4, "best_p90_km": 800.0, "last_geo_median_km": 120.0}
    weak = {"best_val_acc": 0.1, "best_p90_km": 8350.0, "last_geo_median_km": 3000.0}
    perfect = {"best_val_acc": 1.0, "best_p90_km": 0.0, "last_geo_median_km": 0.0}
    worst = {"best_val_acc": 0.0, "best_p90_km": 20037.5, "last_geo_median_km": 20037.5}
    assert reference_score(perfect) == pytest.approx(1.0)
    assert reference_score(worst) == pytest.approx(0.0)
    assert 0.0 < reference_score(weak) < reference_score(good) < 1.0
    assert reference_score({}) is None


def test_the_run_page_links_its_mlflow_run(fake_run, monkeypatch) -> None:
    update_summary(fake_run, tracking={"mirrored": True, "mlflow_run_id": "abc123", "error": None})
    monkeypatch.delenv("GEOLOC_MLFLOW_UI_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret@mlflow.example.org/")
    digest = run_digest(fake_run)
    assert digest["mlflow_url"] == "https://mlflow.example.org/#/runs/abc123"
    assert "[abc123](https://mlflow.example.org/#/runs/abc123)" in digest["markdown"]
    assert "s3cret" not in digest["markdown"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert mlflow_run_url("abc123") == "http://127.0.0.1:5000/#/runs/abc123"  # make mlflow-ui
    monkeypatch.setenv("GEOLOC_MLFLOW_UI_URL", "http://mlflow.lan:5000/")
    assert mlflow_run_url("abc123") == "http://mlflow.lan:5000/#/runs/abc123"


def test_a_study_records_its_fixed_settings_and_links_each_trial(make_run, monkeypatch) -> None:
    monkeypatch.setenv("GEOLOC_DASHBOARD_URL", "http://127.0.0.1:8765")

    def fake_train(cfg: RunConfig, *, run_dir: Path, callbacks: Any = ()) -> Path:
        made = make_run(cfg.name, run_id=run_dir.name)
        RunPaths(made).dashboard.write_text("<html></html>")
        update_summary(made, tracking={"mirrored": True, "mlflow_run_id": "r1", "error": None})
        return made

    cfg = SweepConfig.model_validate({
        "study": "linked", "n_trials": 1, "pruner": "none", "base_config": "demo",
        "base_overrides": {"epochs": 2, "max_steps_per_epoch": 3, "tracking.enabled": False},
        "space": [{"key": "tau_km", "type": "float", "low": 100.0, "high": 800.0}],
    })  # fmt: skip
    result = run_sweep(cfg, train_fn=fake_train)

    study = optuna.load_study(study_name="linked", storage=result.storage)
    attrs = study.user_attrs
    assert attrs["base_config"] == "demo" and attrs["epochs"] == 2
    assert attrs["max_steps_per_epoch"] == 3 and attrs["searched"] == ["tau_km"]
    (trial,) = study.trials
    run_id = trial.user_attrs["run_id"]
    assert trial.user_attrs["dashboard"] == f"http://127.0.0.1:8765/{run_id}/dashboard.html"
    assert trial.user_attrs["mlflow_run"].endswith("/#/runs/r1")
    assert Path(trial.user_attrs["run_dir"]).is_dir()


def test_dashboard_plots_say_whether_they_show_the_rerank_or_the_model_alone(make_run) -> None:
    import numpy as np
    import pandas as pd

    from geoloc.presentation.inputs import load_run_inputs
    from geoloc.presentation.plots import draw_error_map, draw_geo_error, pyplot

    run = make_run("labelled")
    n = 40
    pd.DataFrame({
        "image_id": [f"i{i}" for i in range(n)], "true_lat": np.linspace(-50, 50, n),
        "true_lon": np.linspace(-150, 150, n), "pred_lat": np.linspace(-50, 50, n),
        "pred_lon": np.linspace(-149, 151, n), "error_km": np.geomspace(5, 5000, n),
        "radius_km": np.full(n, 300.0), "radius_coverage": 0.9, "variant": "min_risk",
    }).to_parquet(RunPaths(run).rerank_test_predictions, index=False)  # fmt: skip
    plt = pyplot()
    cdf, world = plt.figure(), plt.figure()
    draw_geo_error(cdf, load_run_inputs(run))
    labels = [t.get_text() for t in cdf.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("test, after rerank (min_risk)"), labels
    assert any(label.startswith("test, model alone") for label in labels), labels
    draw_error_map(world, load_run_inputs(run))
    assert "after rerank (min_risk)" in world.axes[0].get_title()
    plt.close(cdf)
    plt.close(world)
