"""`geoloc train --config r7`: the factorised head with sparse GeoSoft trains on an r7 index,
reports parent and child metrics and comes back through `load_trained`; incompatible inputs
are refused before any training step."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from geoloc.cli import main
from geoloc.config import load_config
from geoloc.data.dataset import GeoDataset, make_loader
from geoloc.errors import ConfigError, TrainingError
from geoloc.infer.evaluation import rerank_run
from geoloc.infer.trained import load_trained
from geoloc.model import FactorisedHead
from geoloc.paths import DataPaths, runs_dir
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary
from geoloc.train.run import train_run

TINY_R7 = {
    "arch": "multiscale_cnn",
    "width": 8,
    "depth": 3,
    "embed_dim": 32,
    "image_size": 24,
    "batch_size": 32,
    "epochs": 2,
    "num_workers": 0,
    "geosoft_neighbours": 16,
    "tracking.enabled": False,
}
"""The r7 preset with a tiny backbone and small images (what a test can afford)."""


def sets(**overrides: object) -> list[str]:
    return [arg for k, v in {**TINY_R7, **overrides}.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def r7_run(r7_index: DataPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `geoloc train --config r7` run (train, rerank, report) on the tiny r7 index."""
    cfg = load_config("r7", {**TINY_R7, "index_dir": str(r7_index.index)})
    from geoloc.compose.training import run_training

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(cfg, run_dir=tmp_path_factory.mktemp("r7run") / "run", progress=False)
    finally:
        torch.set_num_threads(before)


def test_cli_trains_the_r7_preset(r7_index: DataPaths, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--config", "r7", *sets(index_dir=r7_index.index, epochs=1)]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert read_summary(run_dir)["status"] == "completed"
    saved = json.loads(RunPaths(run_dir).config.read_text())
    assert saved["model"]["head"] == "factorised" and saved["train"]["loss"] == "geosoft_sparse"


def test_r7_run_reports_parent_and_child_metrics(r7_run: Path) -> None:
    summary = read_summary(r7_run)
    assert summary["status"] == "completed"
    assert summary["dataset"]["resolution"] == 7 and summary["dataset"]["parent_resolution"] == 6
    assert summary["dataset"]["num_parents"] < summary["dataset"]["num_classes"]
    metrics = pd.read_csv(RunPaths(r7_run).metrics_csv)
    for column in ("val_top1", "val_top5", "val_parent_acc", "val_median_km", "train_loss"):
        assert metrics[column].map(math.isfinite).all(), column
    # a right class is in the right parent: parent accuracy bounds top-1 from above
    assert (metrics["val_parent_acc"] >= metrics["val_top1"]).all()
    assert summary["test"]["test_parent_acc"] is not None


def test_r7_checkpoint_comes_back_and_scores_as_evaluation_did(
    r7_run: Path, r7_index: DataPaths
) -> None:
    trained = load_trained(r7_run, index_dir=r7_index.index)
    assert isinstance(trained.model.head, FactorisedHead)
    assert trained.model.topk_parents == trained.config.train.hier_topk_parents == 5
    val = GeoDataset(r7_index.index, "val", trained.transform())
    images = torch.cat([batch[0] for batch in make_loader(val, 64, shuffle=False, seed=0)])
    scores = trained.scores(images)  # (N, K), through class_scores
    assert scores.shape == (len(val), trained.label_space.num_classes)
    assert torch.allclose(scores.sum(dim=1), torch.ones(len(val)), atol=1e-5)
    # the scored classes are children of the 5 best parents only
    support = (scores > 0).sum(dim=1)
    assert int(support.max()) <= 5 * trained.model.head.max_children
    predictions = pd.read_parquet(RunPaths(r7_run).val_predictions).set_index("image_id")
    pred = scores.argmax(dim=1).numpy()
    expected = predictions.loc[val.table["image_id"].astype(str), "pred_label"].to_numpy()
    assert (pred == expected).mean() > 0.95  # same model, same scoring (ties aside)


def test_rerank_chooses_the_number_of_parents_on_val(r7_run: Path) -> None:
    params = json.loads((RunPaths(r7_run).data / "rerank_params.json").read_text())
    assert params["hier_topk_parents"] in (1, 2, 3, 5, 7)  # 7 = every parent of this index
    assert (RunPaths(r7_run).data / "outputs_val.npz").is_file()


def test_factorised_run_resumes_from_its_checkpoint(r7_index: DataPaths) -> None:
    cfg = load_config("r7", {**TINY_R7, "index_dir": str(r7_index.index), "epochs": 1})
    run_dir = train_run(cfg, progress=False)
    longer = load_config("r7", {**TINY_R7, "index_dir": str(r7_index.index), "epochs": 2})
    resumed = train_run(longer, resume=run_dir, progress=False)
    assert resumed == run_dir and read_summary(run_dir)["epochs_completed"] == 2


# ------------------------------------------------------------------------------------------
# bad input: refused before any training step, naming the setting and the fix
# ------------------------------------------------------------------------------------------


def test_checkpoint_for_another_index_is_refused(
    r7_run: Path, r7_index: DataPaths, demo_index: DataPaths
) -> None:
    cfg = load_config(RunPaths(r7_run).config, {"index_dir": str(demo_index.index), "epochs": 3})
    with pytest.raises(TrainingError, match=r"classes.*resume with the run's own index"):
        train_run(cfg, resume=r7_run, progress=False)
    with pytest.raises(TrainingError, match=r"34 classes|classes .* index at"):
        load_trained(r7_run, index_dir=demo_index.index)
    with pytest.raises(TrainingError, match="index-dir"):
        rerank_run(r7_run, index_dir=demo_index.index, progress=False)
    assert json.loads(RunPaths(r7_run).config.read_text())["index_dir"] == str(r7_index.index)


def test_checkpoint_weights_for_other_classes_are_a_clear_error(
    r7_run: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(r7_run, broken)
    path = RunPaths(broken).best_checkpoint
    ckpt = torch.load(path, weights_only=True)
    ckpt["label_space"]["classes"] = ckpt["label_space"]["classes"][:-1]  # one class fewer
    torch.save(ckpt, path)
    with pytest.raises(TrainingError, match="does not fit its own config and label space"):
        load_trained(broken)


def test_factorised_head_needs_a_coarser_parent_level(r7_index: DataPaths, tmp_path: Path) -> None:
    shutil.copytree(r7_index.root, tmp_path / "data")
    index = tmp_path / "data" / "index"
    labels = json.loads((index / "labels.json").read_text())
    labels["parent_resolution"] = labels["resolution"]
    (index / "labels.json").write_text(json.dumps(labels))
    cfg = load_config("r7", {**TINY_R7, "index_dir": str(index)})
    with pytest.raises(ConfigError, match="model.head=factorised.*parent_resolution 7"):
        train_run(cfg, progress=False)
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


def test_factorised_with_dense_geosoft_is_refused_before_a_run(r7_index: DataPaths) -> None:
    cfg = load_config("r7", {**TINY_R7, "index_dir": str(r7_index.index), "loss": "geosoft"})
    with pytest.raises(ConfigError, match="geosoft_sparse"):
        train_run(cfg, progress=False)
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


def test_factorised_head_trains_on_the_demo_resolution_pair(demo_data: DataPaths) -> None:
    """r1 classes under r0 parents (the demo fixture): any resolution pair works."""
    cfg = load_config(
        None, {**TINY_R7, "epochs": 1, "batch_size": 64, "head": "factorised", "loss": "ce"}
    )
    run_dir = train_run(cfg, progress=False)
    trained = load_trained(run_dir)
    assert trained.label_space.resolution == 1 and trained.label_space.parent_resolution == 0
    assert isinstance(trained.model.head, FactorisedHead)
    history = pd.read_csv(RunPaths(run_dir).metrics_csv)
    assert np.isfinite(history["val_loss"]).all()
