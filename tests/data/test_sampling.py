"""Balancing the epoch (`train.sampling`): class-balanced and inverse-density draws, uniform kept
as it was, the same rows on every DDP rank, streamed splits refused, tiny runs end to end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h3
import numpy as np
import pytest
from fixtures.tiny_runs import TINY as RUN_TINY

from geoloc.config import HardNegConfig, TrainConfig, load_config
from geoloc.data.sampling import (
    class_balanced_probabilities,
    density_resolution,
    inverse_density_probabilities,
)
from geoloc.errors import ConfigError
from geoloc.paths import DATA_DIR_ENV, DataPaths, runs_dir
from geoloc.runfolder.summary import read_summary
from geoloc.train.distributed import shard_order
from geoloc.train.loop import epoch_order
from geoloc.train.run import train_run
from geoloc.train.steps import epoch_seed

NO_HARDNEG = HardNegConfig(enabled=False)
SKEWED = np.repeat(np.arange(5), [1000, 300, 100, 30, 10])  # 1,440 rows, 100:1 head to tail


def test_uniform_sampling_is_todays_seeded_permutation() -> None:
    """`sampling=uniform` passes no probabilities: the order stays bit-identical to before."""
    for seed, epoch in [(0, 0), (7, 3)]:
        expected = np.random.default_rng(epoch_seed(seed, epoch)).permutation(SKEWED.size)
        np.testing.assert_array_equal(epoch_order(SKEWED, epoch, seed, None, None, NO_HARDNEG),
                                      expected)  # fmt: skip


def test_class_balanced_epoch_draws_every_class_about_equally() -> None:
    p = class_balanced_probabilities(SKEWED)
    order = epoch_order(SKEWED, 0, 0, None, None, NO_HARDNEG, p)
    assert order.size == SKEWED.size  # the epoch keeps its N draws (schedule, budget)
    share = np.bincount(SKEWED[order], minlength=5) / order.size
    # uniform order: 69% head, 0.7% tail; balanced: 20% each (binomial sd ~1.1 points)
    assert np.abs(share - 0.2).max() < 0.04, share
    assert len(np.unique(order)) < order.size  # with replacement: tail rows repeat


def _points_in_cell(cell: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lat, lon = h3.cell_to_latlng(cell)  # jitter of ~10 m stays inside an r7 cell (~1.4 km)
    return lat + rng.normal(0, 1e-4, n), lon + rng.normal(0, 1e-4, n)


def test_inverse_density_draws_an_image_density_to_the_minus_power_as_often() -> None:
    """Two r7 cells with 1,000 and 10 images: per image, the sparse cell's is drawn
    (1000 / 10) ** 0.75 = 31.6x as often (power 0.5 would give 10x, power 1 100x)."""
    rng = np.random.default_rng(0)
    cfg = TrainConfig(sampling="inverse_density")
    res = density_resolution(cfg, class_resolution=6)
    assert res == 7  # default: one finer than the classes
    dense, sparse = h3.latlng_to_cell(48.85, 2.35, res), h3.latlng_to_cell(45.76, 4.84, res)
    points = [_points_in_cell(dense, 1000, rng), _points_in_cell(sparse, 10, rng)]
    lat, lon = (np.concatenate(xs) for xs in zip(*points, strict=True))
    in_sparse = np.arange(lat.size) >= 1000
    p = inverse_density_probabilities(lat, lon, res, cfg.density_power)
    assert p.sum() == pytest.approx(1.0)
    assert p[in_sparse][0] / p[~in_sparse][0] == pytest.approx(100**0.75)
    labels = np.zeros(lat.size, dtype=np.int64)
    draws = np.concatenate([epoch_order(labels, e, 3, None, None, NO_HARDNEG, p)
                            for e in range(10)])  # fmt: skip
    per_image = np.array([in_sparse[draws].sum() / 10, (~in_sparse[draws]).sum() / 1000])
    assert per_image[0] / per_image[1] == pytest.approx(100**0.75, rel=0.1)


def test_a_balanced_order_is_a_function_of_seed_and_epoch() -> None:
    p = class_balanced_probabilities(SKEWED)
    a = epoch_order(SKEWED, 2, 5, None, None, NO_HARDNEG, p)
    np.testing.assert_array_equal(a, epoch_order(SKEWED, 2, 5, None, None, NO_HARDNEG, p))
    assert not np.array_equal(a, epoch_order(SKEWED, 3, 5, None, None, NO_HARDNEG, p))
    assert not np.array_equal(a, epoch_order(SKEWED, 2, 6, None, None, NO_HARDNEG, p))


def test_hard_negatives_take_their_share_on_top_of_a_balanced_draw() -> None:
    """Classes 3 and 4 (the tail) are confused: half the epoch comes from them, the other half
    is the balanced draw (~2/5 of it theirs): ~0.7 in all, and every rank gets the same rows."""
    p = class_balanced_probabilities(SKEWED)
    preds = SKEWED.copy()
    preds[SKEWED == 3] = 4
    hardneg = HardNegConfig(enabled=True, start_epoch=0, share=0.5)
    order = epoch_order(SKEWED, 1, 0, preds, SKEWED, hardneg, p)
    assert order.size == SKEWED.size
    assert 0.62 < np.isin(SKEWED[order], [3, 4]).mean() < 0.78
    np.testing.assert_array_equal(order, epoch_order(SKEWED, 1, 0, preds, SKEWED, hardneg, p))
    shards = [shard_order(order, 64, r, 2) for r in range(2)]  # DDP: repeated rows survive
    assert Counter(shards[0] + shards[1]) == Counter(order.tolist())


STREAMED = {"epochs": 1, "batch_size": 8, "image_size": 16, "arch": "multiscale_cnn",
            "width": 8, "depth": 3, "embed_dim": 16, "tracking.enabled": False,
            "rerank.enabled": False, "device": "cpu", "cache_mb": 0}  # fmt: skip


def test_sampling_on_a_streamed_split_is_refused_in_one_line(
    sharded_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    with pytest.raises(ConfigError) as info:
        train_run(load_config(None, {**STREAMED, "sampling": "class_balanced"}), progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert "train.sampling=class_balanced" in msg and "streamed" in msg
    assert "train.cache_mb" in msg and "set train.sampling=uniform" in msg
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


TINY = {**RUN_TINY, "rerank.enabled": False}


@pytest.mark.parametrize(
    "overrides",
    [
        {"sampling": "inverse_density"},
        {"sampling": "class_balanced", "hardneg.enabled": True, "hardneg.start_epoch": 1},
        # effective-number class weights with the dense GeoSoft loss and the factorised head
        {"sampling": "uniform", "class_weighting": "effective", "loss": "geosoft"},
        {
            "sampling": "class_balanced",
            "class_weighting": "effective",
            "head": "factorised",
            "hierarchy": True,
            "loss": "geosoft_sparse",
        },
    ],
    ids=["inverse_density", "class_balanced+hardneg", "effective+geosoft", "effective+factorised"],
)
def test_a_tiny_run_trains_with_each_balancing(demo_data: DataPaths, overrides: dict) -> None:
    summary = read_summary(train_run(load_config(None, {**TINY, **overrides}), progress=False))
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["config"]["sampling"] == overrides["sampling"]
    assert summary["config"]["class_weighting"] == overrides.get("class_weighting", "none")
    assert np.isfinite(summary["last"]["train_loss"]) and np.isfinite(summary["last"]["val_loss"])
