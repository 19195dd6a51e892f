"""`train_run` and `geoloc train`: a run is a reproducible, resumable, self-describing product."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from fixtures.tiny_runs import TINY

from geoloc.cli import main
from geoloc.config import RunConfig, load_config
from geoloc.errors import GeolocError, TrainingError, TrialPruned
from geoloc.infer.trained import load_trained
from geoloc.paths import DataPaths, runs_dir
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary
from geoloc.train.run import METRIC_COLUMNS, train_run

PREDICTION_COLUMNS = [
    "image_id", "true_lat", "true_lon", "true_cell", "true_label", "pred_label", "pred_cell",
    "pred_lat", "pred_lon", "error_km", "prob", "topk_labels", "topk_cells", "topk_probs",
]  # fmt: skip
def tiny_cfg(**overrides: Any) -> RunConfig:
    return load_config(None, {**TINY, **overrides})


def metrics_table(run_dir: Path) -> pd.DataFrame:
    """metrics.csv without wall-clock time, the one column that may differ between runs."""
    return pd.read_csv(RunPaths(run_dir).metrics_csv).drop(columns=["epoch_time_s"])


FULL = {
    "epochs": 3,
    "loss": "geosoft",
    "hierarchy": True,
    "hier_topk_parents": 2,
    "warmup_epochs": 1,
    "hardneg.enabled": True,
    "hardneg.start_epoch": 1,
    "hardneg.share": 0.5,
}
"""Every stateful feature on: GeoSoft, hierarchy with masking, hard negatives, warm-up."""


@pytest.fixture(scope="module")
def reference(demo_index: DataPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of the FULL config, shared by the reproducibility tests.

    Bitwise reproducibility holds for the same number of intra-op threads (float reductions
    are split by thread), so it trains with the one thread every test gets (conftest).
    """
    cfg = tiny_cfg(index_dir=str(demo_index.index), **FULL)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_run(cfg, run_dir=tmp_path_factory.mktemp("reference") / "run", progress=False)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def full_cfg(demo_data: DataPaths) -> RunConfig:
    return tiny_cfg(index_dir=str(demo_data.index), **FULL)


def test_run_writes_every_contract_file(demo_data: DataPaths) -> None:
    run_dir = train_run(tiny_cfg())
    paths = RunPaths(run_dir)
    assert run_dir.parent == runs_dir()
    assert RunConfig.model_validate(json.loads(paths.config.read_text())) == tiny_cfg()

    metrics = pd.read_csv(paths.metrics_csv)
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert metrics["epoch"].tolist() == [1, 2]

    for preds_path in (paths.val_predictions, paths.test_predictions):
        preds = pd.read_parquet(preds_path)
        assert list(preds.columns) == PREDICTION_COLUMNS
        assert (preds["prob"] == preds["topk_probs"].map(lambda p: p[0])).all()
        assert (preds["pred_label"] == preds["topk_labels"].map(lambda p: p[0])).all()

    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["failure_reason"] is None
    assert summary["epochs_completed"] == 2
    assert summary["best_val_acc"] == pytest.approx(metrics["val_top1"].max())
    assert summary["best_p90_km"] == pytest.approx(metrics["val_p90_km"].min())
    assert summary["last_geo_median_km"] == pytest.approx(metrics["val_median_km"].iloc[-1])
    assert summary["last"]["epoch"] == 2
    assert set(summary["test"]) >= {"test_top1", "test_median_km", "test_p90_km", "test_geoscore"}
    assert summary["dataset"]["num_classes"] > 1 and summary["dataset"]["fingerprint"]
    assert summary["artifacts"]["checkpoint_best"] and summary["artifacts"]["test_predictions"]

    for ckpt in (paths.last_checkpoint, paths.best_checkpoint):
        state = torch.load(ckpt, weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "label_space"} <= set(
            state
        )


def test_test_metrics_come_from_the_best_checkpoint(demo_data: DataPaths) -> None:
    run_dir = train_run(tiny_cfg())
    trained = load_trained(run_dir, "best")
    assert not trained.model.training
    preds = pd.read_parquet(RunPaths(run_dir).test_predictions)
    from geoloc.data.dataset import GeoDataset

    ds = GeoDataset(demo_data.index, "test", trained.transform())
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    pred = trained.scores(images).argmax(dim=1).numpy()
    assert (pred == preds["pred_label"].to_numpy()).all()
    summary = read_summary(run_dir)
    assert summary["test"]["test_top1"] == pytest.approx(
        float((preds["pred_label"] == preds["true_label"]).mean())
    )


def test_same_config_and_seed_give_identical_metrics(reference: Path, full_cfg: RunConfig) -> None:
    again = train_run(full_cfg)
    pd.testing.assert_frame_equal(metrics_table(again), metrics_table(reference))
    pd.testing.assert_frame_equal(
        pd.read_parquet(RunPaths(again).test_predictions),
        pd.read_parquet(RunPaths(reference).test_predictions),
    )


def test_the_best_last_epochs_val_pass_is_not_repeated(
    demo_data: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the last epoch is the best, the final val numbers are that epoch's pass (the model
    in memory is best.pt), not a second pass: one fewer val pass (~4 min at 10^6 images), and
    the written val predictions are still those of best.pt."""
    import geoloc.train.loop as loop
    import geoloc.train.run as run

    passes: list[str] = []
    for module in (loop, run):
        real = module.evaluate
        monkeypatch.setattr(module, "evaluate", lambda *a, _real=real, **k: (
            passes.append(k["prefix"]), _real(*a, **k))[1])  # fmt: skip
    run_dir = train_run(tiny_cfg(epochs=1))
    assert read_summary(run_dir)["best_epoch"] == 1
    assert passes == ["val", "test"]

    trained = load_trained(run_dir, "best")
    from geoloc.data.dataset import GeoDataset

    ds = GeoDataset(demo_data.index, "val", trained.transform())
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    preds = pd.read_parquet(RunPaths(run_dir).val_predictions)
    assert (trained.scores(images).argmax(dim=1).numpy() == preds["pred_label"].to_numpy()).all()


def test_crash_then_resume_ends_like_an_uninterrupted_run(
    reference: Path, full_cfg: RunConfig
) -> None:
    uninterrupted = reference

    def crash_after_first_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == 1:
            raise RuntimeError("simulated crash")

    crashed = runs_dir() / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(full_cfg, run_dir=crashed, callbacks=[crash_after_first_epoch])
    summary = read_summary(crashed)
    assert summary["status"] == "failed" and "simulated crash" in summary["failure_reason"]
    assert summary["epochs_completed"] == 1

    assert train_run(full_cfg, resume=crashed) == crashed
    assert read_summary(crashed)["status"] == "completed"
    pd.testing.assert_frame_equal(metrics_table(crashed), metrics_table(uninterrupted))
    assert read_summary(crashed)["test"] == read_summary(uninterrupted)["test"]


def _geoloc(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    code = "import sys; from geoloc.cli import run; sys.argv[0] = 'geoloc'; run()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # two fresh interpreters (~25 s idle); the in-process crash test above is quick
def test_killed_process_resumes_from_the_cli(reference: Path, full_cfg: RunConfig) -> None:
    """SIGKILL mid-run (no chance to clean up), then `geoloc train --resume`: same metrics."""
    run_dir = runs_dir() / "killed"
    env = dict(os.environ)
    cfg_file = Path("killed.json")
    cfg_file.write_text(json.dumps(full_cfg.model_dump(mode="json")))
    # start a run into a known folder through the library entry point the CLI uses
    code = (
        "from pathlib import Path; from geoloc.config import load_config; "
        "from geoloc.train.run import train_run; "
        f"train_run(load_config('{cfg_file}'), run_dir=Path('{run_dir}'), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    last = RunPaths(run_dir).last_checkpoint
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.is_file(), "the run never finished an epoch"
    if read_summary(run_dir)["status"] == "completed":
        pytest.skip("the run finished before it could be killed")
    assert read_summary(run_dir)["status"] == "running"  # killed: nobody wrote a final status

    resumed = _geoloc("train", "--resume", str(run_dir), env=env)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert out.strip().splitlines()[-1] == str(run_dir)
    pd.testing.assert_frame_equal(metrics_table(run_dir), metrics_table(reference))


def test_pruning_callback_ends_the_run_as_pruned(demo_data: DataPaths) -> None:
    def prune(epoch: int, metrics: dict[str, Any]) -> None:
        raise TrialPruned(f"pruned at epoch {epoch}")

    run_dir = runs_dir() / "pruned"
    with pytest.raises(TrialPruned):
        train_run(tiny_cfg(), run_dir=run_dir, callbacks=[prune])
    summary = read_summary(run_dir)
    assert summary["status"] == "pruned" and summary["epochs_completed"] == 1
    assert pd.read_csv(RunPaths(run_dir).metrics_csv)["epoch"].tolist() == [1]


def test_early_stopping_stops_when_the_metric_stalls(demo_data: DataPaths) -> None:
    # nothing in the demo data is predicted within 1 km: the metric stays 0 after epoch 1
    cfg = tiny_cfg(
        epochs=5,
        early_stopping_metric="val_acc_1km",
        early_stopping_mode="max",
        early_stopping_patience=1,
    )
    summary = read_summary(train_run(cfg))
    assert summary["status"] == "completed"
    assert summary["epochs_completed"] == 2 and summary["best_epoch"] == 1


def test_missing_index_fails_before_creating_a_run(tmp_path: Path) -> None:
    with pytest.raises(GeolocError, match="index"):
        train_run(tiny_cfg(index_dir=str(tmp_path / "none")))
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


def test_resume_with_another_model_is_refused(demo_data: DataPaths) -> None:
    run_dir = train_run(tiny_cfg(epochs=1))
    with pytest.raises(TrainingError, match="another model config.*embed_dim"):
        train_run(tiny_cfg(epochs=2, embed_dim=16), resume=run_dir)


def test_cli_prints_the_run_dir_last(demo_data: DataPaths, capsys: pytest.CaptureFixture) -> None:
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    assert main(["train", *sets, "--set", "epochs=1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    run_dir = Path(out[-1])
    assert read_summary(run_dir)["status"] == "completed"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "nonsense=1"], "unknown config key 'nonsense'"),
        (["--set", "epochs=0"], "epochs"),
        (["--config", "no-such-preset"], "no-such-preset"),
        (["--resume", "not-a-run"], "not-a-run"),
        (["--set", "arch=resnet99"], "model.arch 'resnet99' is not a registered model"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(
    args: list[str], needle: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not runs_dir().exists() or not any(runs_dir().iterdir())  # nothing half-written


def test_cli_without_an_index_is_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--set", "tracking.enabled=false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index" in err[0]
