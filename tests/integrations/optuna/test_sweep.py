"""Sweeps: bad input fails before any trial; studies resume and are shared; trials are runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fixtures.sweep_settings import TAU_SPACE, TINY_SWEEP_BASE

from geoloc.cli import main
from geoloc.compose.training import run_training
from geoloc.integrations.optuna import (
    ParamSpec,
    SweepConfig,
    SweepError,
    check_sweep,
    create_study,
    redact,
    run_sweep,
    validate_sweep,
)
from geoloc.paths import DataPaths, runs_dir, sweeps_dir
from geoloc.runfolder.summary import read_summary


def _cfg(**kw) -> SweepConfig:
    return SweepConfig.model_validate(kw)


def test_empty_space_is_refused_before_any_trial() -> None:
    with pytest.raises(SweepError, match="search space is empty"):
        validate_sweep(_cfg(space=[]))


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ([{"key": "no_such_key", "type": "float", "low": 0, "high": 1}], "unknown config key"),
        ([{"key": "lr", "type": "float", "low": -1.0, "high": 0.1}], "lr=-1.0 is not a valid"),
        (
            [
                {"key": "lr", "type": "float", "low": 1e-4, "high": 1e-2},
                {"key": "train.lr", "type": "float", "low": 1e-4, "high": 1e-2},
            ],
            "set the same key",
        ),
        ([{"key": "loss", "type": "categorical", "choices": ["ce", "hinge"]}], "hinge"),
    ],
)
def test_inconsistent_space_names_the_parameter(space, needle) -> None:
    with pytest.raises(SweepError, match=needle):
        validate_sweep(_cfg(space=space))


def test_spec_bounds_are_checked_when_the_space_is_read() -> None:
    with pytest.raises(ValueError, match="low .* must be < high"):
        ParamSpec(key="lr", type="float", low=1.0, high=0.1)
    with pytest.raises(ValueError, match="log scale needs low > 0"):
        ParamSpec(key="lr", type="float", low=0.0, high=0.1, log=True)


@pytest.mark.parametrize(
    "settings",
    [
        {"base_overrides": {"nproc": 2, "batch_size": 64}},
        {"space": [{"key": "nproc", "type": "categorical", "choices": [1, 2]}]},
    ],
)
def test_pruning_distributed_trials_is_refused_before_any_trial(settings) -> None:
    with pytest.raises(SweepError, match="train.nproc=2 cannot be pruned"):
        validate_sweep(_cfg(**settings))
    validate_sweep(_cfg(pruner="none", **settings))  # fine when nothing prunes


def test_searching_a_key_fixed_by_set_is_refused() -> None:
    with pytest.raises(SweepError, match="both searched and fixed"):
        validate_sweep(_cfg(base_overrides={"lr": 0.01}))


def test_unreachable_storage_is_one_clear_error_without_the_password() -> None:
    cfg = _cfg(storage="postgresql+psycopg://user:s3cret@127.0.0.1:9/optuna")
    with pytest.raises(SweepError, match="unreachable") as err:
        create_study(cfg)
    assert "s3cret" not in str(err.value)
    assert redact("postgresql://u:pw@h:1/db") == "postgresql://u:***@h:1/db"


def test_cli_reports_a_bad_space_in_one_line(tmp_path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("- {key: epochz, type: int, low: 1, high: 3}\n")
    code = main(["sweep", "--n-trials", "1", "--space", str(space)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "epochz" in err[0]


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"prune_metric": "val_top1"}, "prune_metric 'val_top1' is not a per-epoch metric"),
        ({"pruner": "threshold"}, "the threshold pruner needs prune_threshold"),
        ({"n_trials": -1}, "n_trials: Input should be greater than or equal to 0"),
        ({"space": [{"key": "lr", "type": "uniform"}]}, "space.0.type"),
    ],
)
def test_bad_settings_are_one_sweep_error_line(settings, needle) -> None:
    with pytest.raises(SweepError, match=needle) as err:
        check_sweep(settings)
    assert "\n" not in str(err.value)


def test_resumes_and_workers_propose_new_configs_yet_sweeps_are_reproducible(tmp_path) -> None:
    def proposals(study: str, runs: int) -> list[float]:
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        for _ in range(runs):  # each call is what a new process (a resume, a worker) does
            create_study(_cfg(study=study, storage=storage)).optimize(
                lambda t: t.suggest_float("x", 0, 1), n_trials=2
            )
        return [t.params["x"] for t in create_study(_cfg(study=study, storage=storage)).trials]

    resumed = proposals("a", runs=2)
    assert len(set(resumed)) == 4
    assert proposals("b", runs=1) == resumed[:2]


def test_studies_resume_from_the_same_storage(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = create_study(_cfg(study="resume-me", storage=storage))
    first.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = create_study(_cfg(study="resume-me", storage=storage))
    assert len(again.trials) == 2


# ------------------------------------------------------------------------------------------
# Real sweeps: tiny trainings on the demo fixture index
# ------------------------------------------------------------------------------------------

TINY_BASE = TINY_SWEEP_BASE


def _sweep(storage: str | None = None, **kw) -> SweepConfig:
    base = {**TINY_BASE, **kw.pop("base_overrides", {})}
    return _cfg(storage=storage, base_overrides=base, space=kw.pop("space", TAU_SPACE), **kw)


def _set_args(overrides: dict) -> list[str]:
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]


def _trials(study: str) -> pd.DataFrame:
    return pd.read_csv(sweeps_dir() / study / "trials.csv")


def test_cli_sweep_trains_full_runs_and_a_rerun_resumes_the_study(
    demo_data: DataPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": TAU_SPACE}))
    args = ["sweep", "-n", "1", "--study", "cli", "--space", str(space), "--pruner", "none"]
    args += _set_args(TINY_BASE)
    assert main(args) == 0
    assert main(args) == 0  # the same command again adds to the same study
    out, err = capsys.readouterr()
    assert "optuna-dashboard sqlite:///" in out
    # not a terminal (`geoloc sweep > log 2>&1`): one line per epoch, no progress bars
    assert "epoch 2/2: " in err and "%|" not in err and "\r" not in err, err[-2000:]

    table = _trials("cli")
    assert table["number"].tolist() == [0, 1]
    assert table["state"].tolist() == ["COMPLETE", "COMPLETE"]
    for row in table.itertuples():
        summary = read_summary(runs_dir() / row.run_id)
        assert summary["status"] == "completed"
        assert summary["best_p90_km"] == pytest.approx(row.value)
        assert Path(row.dashboard).is_file()
    best = json.loads((sweeps_dir() / "cli" / "best.json").read_text())
    assert best["trials_complete"] == 2
    assert best["value"] == pytest.approx(table["value"].min())
    summary_md = (sweeps_dir() / "cli" / "summary.md").read_text()
    assert best["run_id"] in summary_md and "complete 2" in summary_md


def test_a_pruned_trial_leaves_a_run_marked_pruned(demo_data: DataPaths) -> None:
    # no demo run reaches a val P90 of 1 km: the threshold pruner stops the trial after epoch 1
    result = run_sweep(
        _sweep(study="pruned", n_trials=1, pruner="threshold", prune_threshold=1.0),
        train_fn=run_training,
    )
    (row,) = result.trials.to_dict("records")
    assert row["state"] == "PRUNED"
    assert row["reason"].startswith("pruned at epoch 1")
    summary = read_summary(runs_dir() / row["run_id"])
    assert summary["status"] == "pruned"
    assert summary["epochs_completed"] == 1 < TINY_BASE["epochs"]
    assert Path(row["dashboard"]).is_file()
    assert result.best == {"trials_complete": 0}


def test_a_crashing_trial_is_failed_with_its_reason_and_the_sweep_goes_on(
    demo_data: DataPaths,
) -> None:
    # lr=1e9 passes every config check and blows the loss up to NaN at run time
    cfg = _sweep(
        study="crash",
        n_trials=2,
        pruner="none",
        space=[{"key": "lr", "type": "categorical", "choices": [3e-3, 1e9]}],
    )
    study = create_study(cfg)
    study.enqueue_trial({"lr": 1e9})
    study.enqueue_trial({"lr": 3e-3})
    result = run_sweep(cfg, train_fn=run_training)

    crashed, fine = result.trials.to_dict("records")
    assert crashed["state"] == "FAIL" and "loss is nan" in crashed["reason"]
    assert read_summary(runs_dir() / crashed["run_id"])["status"] == "failed"
    assert fine["state"] == "COMPLETE"
    assert result.best["number"] == fine["number"]
    assert "loss is nan" in _trials("crash")["reason"][0]


def test_multi_objective_reports_the_pareto_front(demo_data: DataPaths) -> None:
    result = run_sweep(_sweep(study="multi", n_trials=2, objective="multi"), train_fn=run_training)
    table = result.trials
    assert set(table["state"]) == {"COMPLETE"}
    front = result.best["pareto_front"]
    assert front
    points = list(zip(table["val_top1"], table["val_p90_km"], strict=True))
    for entry in front:
        summary = read_summary(runs_dir() / entry["run_id"])
        assert entry["val_top1"] == pytest.approx(summary["best_val_acc"])
        assert entry["val_p90_km"] == pytest.approx(summary["best_p90_km"])
        # nothing on the front is dominated by another trial
        assert not any(
            acc >= entry["val_top1"] and p90 <= entry["val_p90_km"]
            and (acc, p90) != (entry["val_top1"], entry["val_p90_km"])
            for acc, p90 in points
        )  # fmt: skip
    assert "Pareto front" in (result.out_dir / "summary.md").read_text()


def test_trials_are_child_runs_of_one_mlflow_parent_across_resumes(demo_data: DataPaths) -> None:
    from mlflow import MlflowClient

    cfg = _sweep(
        study="tracked",
        n_trials=1,
        pruner="none",
        base_overrides={"tracking.enabled": True, "tracking.register_model": False},
    )
    first = run_sweep(cfg, train_fn=run_training)
    second = run_sweep(cfg, train_fn=run_training)
    assert first.mlflow_run_id and second.mlflow_run_id == first.mlflow_run_id

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(first.mlflow_run_id)
    assert parent.data.tags["geoloc.sweep"] == "tracked"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert sorted(c.data.tags["geoloc.run_id"] for c in children) == sorted(second.trials["run_id"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/best.json", "sweep/summary.md"} <= logged


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_worker_processes_share_one_study(
    store: str, demo_data: DataPaths, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    study = f"shared-{uuid.uuid4().hex[:8]}"
    if store == "postgres":
        storage = request.getfixturevalue("postgres_cluster").url("optuna")
    else:
        storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ["sweep", "--study", study, "--storage", storage, "--pruner", "none"]
    args += _set_args(TINY_BASE)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TAU_SPACE))
    args += ["--space", str(space)]
    # the study (and its schema) first, then the workers: schema creation races on PostgreSQL
    assert main([*args, "-n", "0"]) == 0
    geoloc = str(Path(sys.executable).parent / "geoloc")
    workers = [
        subprocess.Popen(
            [geoloc, *args, "-n", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]

    trials = create_study(_cfg(study=study, storage=storage)).trials
    assert sorted(t.number for t in trials) == [0, 1]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    run_ids = {t.user_attrs["run_id"] for t in trials}
    assert len(run_ids) == 2
    assert len({t.params["tau_km"] for t in trials}) == 2  # not the same proposal twice
    assert all(read_summary(runs_dir() / r)["status"] == "completed" for r in run_ids)


def test_an_interrupted_sweep_still_writes_where_the_study_stands(demo_data: DataPaths) -> None:
    def interrupted(cfg, *, run_dir, callbacks):  # what Ctrl-C during a trial does
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(_sweep(study="interrupted", n_trials=3), train_fn=interrupted)
    assert _trials("interrupted")["state"].tolist() == ["FAIL"]


def test_storage_defaults_to_the_stack_env_var(monkeypatch, tmp_path) -> None:
    from geoloc.integrations.optuna import default_storage

    assert default_storage().startswith("sqlite:///") and "_sweeps" in default_storage()
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("GEOLOC_OPTUNA_STORAGE", url)
    assert default_storage() == url


def test_default_space_searches_only_knobs_the_base_config_uses(tmp_path) -> None:
    """demo has hard negatives off and a factorised head: its default space has no `share` and
    no `hierarchy` (a knob that changes nothing would top the importance plot; hierarchy=false is
    invalid with that head); oversampling on a flat head searches both, margins no `share`."""
    demo = {s.key for s in _cfg(base_config="demo").space}
    assert not {"share", "hierarchy"} & demo and {"lr", "tau_km", "width"} <= demo
    flat = {"hardneg.enabled": True, "head": "flat", "loss": "geosoft"}
    on = _cfg(base_config="demo", base_overrides=flat)
    assert {"share", "hierarchy"} <= {s.key for s in on.space}
    margin = _cfg(base_config="demo", base_overrides={**flat, "hardneg.mode": "margin"})
    assert "share" not in {s.key for s in margin.space}
    ce = {s.key for s in _cfg(base_config="demo", base_overrides={"loss": "ce"}).space}
    assert "tau_km" not in ce
    explicit = _cfg(base_config="demo", space=[{"key": "share", "type": "float", "low": 0,
                                                "high": 0.5}])  # fmt: skip
    assert [s.key for s in explicit.space] == ["share"]  # a given space is kept as given


@pytest.mark.parametrize(
    ("objective", "names"),
    [("p90", ["best_val_p90_km"]), ("multi", ["best_val_top1", "best_val_p90_km"])],
)
def test_studies_name_their_objectives(tmp_path, objective, names) -> None:
    storage = f"sqlite:///{tmp_path / 'names.db'}"
    study = create_study(_cfg(storage=storage, objective=objective, space=TAU_SPACE))
    assert study.metric_names == names
    import optuna

    assert optuna.load_study(study_name=study.study_name, storage=storage).metric_names == names
