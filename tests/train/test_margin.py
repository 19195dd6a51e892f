"""`hardneg.mode=margin`: far negatives mined from the train split, a distance-weighted margin
against class prototypes, and runs that stay reproducible and resumable with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures.tiny_runs import TINY
from fixtures.toy_labels import toy_labels

import geoloc.train.loop as loop_module
import geoloc.train.margin as margin_module
from geoloc.config import HardNegConfig, RunConfig, load_config
from geoloc.data.dataset import read_split_table
from geoloc.errors import ConfigError
from geoloc.geo import LabelSpace, haversine_km, mine_far_negatives
from geoloc.geo.hardneg import distance_weight
from geoloc.model.margin_loss import prototype_margin_loss
from geoloc.paths import DATA_DIR_ENV, DataPaths, runs_dir
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary
from geoloc.train.run import train_run

MARGIN_TINY = {
    **TINY,
    "name": "margin",
    "epochs": 3,
    "checkpoint_every_steps": 3,  # 8 steps per epoch on the demo fixture
    "hardneg.enabled": True,
    "hardneg.mode": "margin",
    "hardneg.start_epoch": 1,
}


def margin_cfg(demo: DataPaths, **overrides: Any) -> RunConfig:
    return load_config(None, {**MARGIN_TINY, "index_dir": str(demo.index), **overrides})


def metrics_table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(RunPaths(run_dir).metrics_csv).drop(columns=["epoch_time_s"])


# ---- mining ------------------------------------------------------------------------------------


@pytest.fixture
def meridian() -> LabelSpace:
    """Six classes on the prime meridian, 10 degrees (1,112 km) apart."""
    return LabelSpace.from_dict(toy_labels(6, "meridian", 5))


def test_far_negatives_skip_near_cells_and_rank_by_confusion(meridian: LabelSpace) -> None:
    # class 0 is mistaken for its neighbour 1 (1,112 km) most, then 2 (5x), 3 and 4 (2x), 5 (1x)
    pred = np.array([1] * 9 + [2] * 5 + [3] * 2 + [4] * 2 + [5] + [0] * 30 + [-1] * 4)
    true = np.zeros_like(pred)
    cfg = HardNegConfig(mode="margin", negatives_per_cell=3, min_km=2000.0)
    negatives = mine_far_negatives(true, pred, meridian, cfg)
    # the near cell is no negative however confused; the tie 3/4 breaks by class index;
    # correct predictions and unseen rows (-1) count for nothing
    assert negatives.classes[0].tolist() == [2, 3, 4]
    assert (negatives.classes[1:] == -1).all() and (negatives.weights[1:] == 0).all()
    assert negatives.num_pairs == 3


def test_negative_weights_grow_with_distance(meridian: LabelSpace) -> None:
    true = np.array([0] * 5 + [5] * 5)
    pred = np.array([1, 2, 3, 4, 5, 4, 3, 2, 1, 0])
    negatives = mine_far_negatives(true, pred, meridian, HardNegConfig(negatives_per_cell=5))
    for c in (0, 5):
        held = negatives.classes[c][negatives.classes[c] >= 0]
        km = haversine_km(meridian.lat[c], meridian.lon[c], meridian.lat[held], meridian.lon[held])
        w = negatives.weights[c][: held.size]
        order = np.argsort(km)
        assert (np.diff(w[order]) > 0).all()  # farther confusions weigh more
        assert ((w > 0) & (w < 1)).all()
    km = np.array([0.0, 100.0, 1000.0, 2500.0, 5000.0, 20000.0])
    assert (np.diff(distance_weight(km)) > 0).all() and distance_weight(km)[-1] <= 1.0


def test_margin_mode_with_a_val_pool_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="hardneg.pool_split=train") as info:
        load_config(None, {"hardneg.mode": "margin", "hardneg.pool_split": "val"})
    assert "\n" not in str(info.value)


# ---- the term ----------------------------------------------------------------------------------


def _tables(n_neg: int = 1) -> tuple[torch.Tensor, ...]:
    """Four classes with orthogonal unit prototypes; class c's one negative is c + 2 (mod 4),
    weight 0.5; class 3 has no prototype."""
    prototypes = torch.eye(4, 8)
    present = torch.tensor([True, True, True, False])
    negatives = torch.tensor([[2], [3], [0], [1]])
    weights = torch.full((4, n_neg), 0.5)
    return prototypes, present, negatives, weights


def test_margin_term_is_zero_when_images_are_clear_of_their_negatives() -> None:
    prototypes, present, negatives, weights = _tables()
    labels = torch.tensor([0, 1, 2])
    # each image on its own prototype: cos(own) 1, cos(negative) 0, clear by more than 0.2
    clear = prototypes[labels] * 3.0
    assert prototype_margin_loss(clear, labels, prototypes, present, negatives, weights,
                                 0.2).item() == 0.0  # fmt: skip

    # image 0 sits on its negative's prototype: 0.5 * (0.2 + 1 - 0); image 1's negative (3)
    # has no prototype, image 2 is clear: the mean over the 2 valid pairs
    confused = clear.clone().requires_grad_(True)
    with torch.no_grad():
        confused[0] = prototypes[2]
    term = prototype_margin_loss(confused, labels, prototypes, present, negatives, weights, 0.2)
    assert term.item() == pytest.approx(0.5 * 1.2 / 2)
    term.backward()
    assert confused.grad[0].abs().sum() > 0 and confused.grad[2].abs().sum() == 0


# ---- in a run ----------------------------------------------------------------------------------


@dataclass
class Reference:
    """An uninterrupted margin run and what its miner was given, epoch by epoch."""

    run_dir: Path
    mined: list[tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def margin_reference(demo_index: DataPaths, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One uninterrupted margin run (one intra-op thread, like every test), shared below; the
    real miner is wrapped to record the (true, predicted) labels the loop passes it."""
    mined: list[tuple[np.ndarray, np.ndarray]] = []
    real = margin_module.mine_far_negatives

    def recording(true: np.ndarray, pred: np.ndarray, *args: Any) -> Any:
        mined.append((true.copy(), pred.copy()))
        return real(true, pred, *args)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(margin_module, "mine_far_negatives", recording)
            run_dir = train_run(margin_cfg(demo_index), progress=False,
                                run_dir=tmp_path_factory.mktemp("margin") / "run")  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return Reference(run_dir, mined)


def test_the_miner_sees_only_train_split_labels_and_predictions(
    margin_reference: Reference, demo_index: DataPaths
) -> None:
    train = read_split_table(demo_index.index, "train")["label"].to_numpy()
    val = read_split_table(demo_index.index, "val")["label"].to_numpy()
    assert len(margin_reference.mined) == 2  # epochs 2 and 3 (start_epoch 1), refreshed each
    ckpt = torch.load(RunPaths(margin_reference.run_dir).last_checkpoint, weights_only=True)
    for true, pred in margin_reference.mined:
        assert np.array_equal(true, train) and true.size != val.size
        assert pred.shape == train.shape and (pred >= 0).all()  # every train row predicted
    assert not np.array_equal(margin_reference.mined[0][1], margin_reference.mined[1][1])
    # what the last epoch's training predicted is what the next epoch would mine from
    assert ckpt["extra"]["pool_pred_labels"].shape == train.shape


def test_a_margin_run_logs_its_term_and_is_deterministic(
    margin_reference: Reference, demo_data: DataPaths
) -> None:
    reference = metrics_table(margin_reference.run_dir)
    # nothing before start_epoch, a working term after it
    assert reference["train_margin_loss"].iloc[0] == 0.0
    assert (reference["train_margin_loss"].iloc[1:] > 0).all()
    assert (reference["train_margin_loss"] < reference["train_loss"]).all()
    again = train_run(margin_cfg(demo_data), progress=False)
    pd.testing.assert_frame_equal(metrics_table(again), reference)


def test_a_margin_run_killed_mid_epoch_resumes_to_the_same_result(
    margin_reference: Reference, demo_data: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after step 13 (epoch 2, step 5; last.pt at its step 3): the resume needs epoch 1's
    prototypes and the half-epoch's prototype sums from the checkpoint to end identically."""

    def fault(stage: str, count: int) -> None:
        if stage == "train" and count >= 13:
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(loop_module, "maybe_fault", fault)
    cut = runs_dir() / "cut"
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_run(margin_cfg(demo_data), run_dir=cut, progress=False)
    ckpt = torch.load(RunPaths(cut).last_checkpoint, weights_only=True)
    assert ckpt["extra"]["position"]["step"] == 3 and ckpt["extra"]["prototypes"] is not None
    assert ckpt["extra"]["position"]["margin"]["counts"].sum() == 3 * 64
    monkeypatch.setattr(loop_module, "maybe_fault", lambda stage, count: None)
    assert train_run(margin_cfg(demo_data), resume=cut, progress=False) == cut
    assert read_summary(cut)["status"] == "completed"
    pd.testing.assert_frame_equal(metrics_table(cut), metrics_table(margin_reference.run_dir))
    a = torch.load(RunPaths(cut).last_checkpoint, weights_only=True)["model"]
    b = torch.load(RunPaths(margin_reference.run_dir).last_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_margin_term_trains_the_factorised_head_under_autocast(demo_data: DataPaths) -> None:
    cfg = margin_cfg(demo_data, epochs=2, head="factorised", loss="geosoft_sparse",
                     amp_dtype="bf16", device="cpu")  # fmt: skip
    metrics = metrics_table(train_run(cfg, progress=False))
    assert np.isfinite(metrics["train_loss"]).all() and metrics["train_margin_loss"].iloc[1] > 0


def test_margin_mode_trains_on_a_streamed_train_split(
    sharded_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oversampling needs random access to the train images; the margin term draws no rows, so
    a train split streamed from its shards (larger than train.cache_mb) can use it."""
    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    streamed = {"epochs": 2, "batch_size": 8, "image_size": 16, "arch": "multiscale_cnn",
                "width": 8, "depth": 3, "embed_dim": 16, "lr": 3e-3, "tracking.enabled": False,
                "device": "cpu", "cache_mb": 0, "shuffle_buffer": 16, "hardneg.enabled": True,
                "hardneg.mode": "margin", "hardneg.start_epoch": 1}  # fmt: skip
    metrics = metrics_table(train_run(load_config(None, streamed), progress=False))
    assert metrics["train_margin_loss"].iloc[0] == 0.0 and np.isfinite(metrics["train_loss"]).all()


@pytest.mark.slow  # two spawned ranks (~40 s); the reductions are DDP's only path
def test_two_processes_sum_the_prototypes_of_both_shards(demo_data: DataPaths) -> None:
    """Each rank sums the prototypes of its shard; all-reduced, both ranks mine and push away
    the same prototypes, and the run trains like one process (see test_distributed's tolerance:
    BatchNorm normalises per shard on CPU)."""
    from geoloc.compose.training import run_training

    same = {"augment": False, "dropout": 0.0, "rerank.enabled": False}
    one = metrics_table(train_run(margin_cfg(demo_data, **same), progress=False))
    two = metrics_table(run_training(margin_cfg(demo_data, nproc=2, **same), progress=False))
    assert (two["train_margin_loss"].iloc[1:] > 0).all()
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=0.03)
