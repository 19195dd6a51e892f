"""Streaming input: shard plans split over ranks and workers, mid-epoch resume, S3, bad shards."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.sharded_index import damage_member

from geoloc.cli import main
from geoloc.config import TrainConfig, load_config
from geoloc.data.dataset import GeoDataset, build_transforms
from geoloc.data.imagestore import index_shards
from geoloc.data.streaming import eval_loader, stream_plan
from geoloc.errors import ConfigError, DataError
from geoloc.paths import DATA_DIR_ENV, runs_dir
from geoloc.runfolder.layout import RunPaths
from geoloc.train.epoch_loader import EpochLoader
from geoloc.train.run import train_run

TINY = {"epochs": 2, "batch_size": 8, "image_size": 16, "arch": "multiscale_cnn",
        "width": 8, "depth": 3, "embed_dim": 16, "lr": 3e-3, "tracking.enabled": False,
        "rerank.enabled": False, "device": "cpu", "cache_mb": 0, "shuffle_buffer": 16}  # fmt: skip


def _train(index: Path, **kw: object) -> GeoDataset:
    tf = build_transforms(TrainConfig(image_size=16, augment=True), train=True)
    return GeoDataset(index, "train", tf, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "world", "workers", "batch"),
    [(90, 1, 1, 8), (90, 2, 2, 8), (91, 3, 2, 4), (7, 2, 3, 2), (1000, 4, 2, 16), (5, 1, 4, 64)],
)
def test_ranks_and_workers_split_a_streamed_epoch_with_no_duplicate_and_no_gap(
    n: int, world: int, workers: int, batch: int
) -> None:
    rng = np.random.default_rng(n)
    storage = rng.permutation(n)  # rows in storage order
    shard_of = np.sort(rng.integers(0, 6, n))  # ~6 shards of consecutive members
    plans = [stream_plan(storage, shard_of, seed=5, batch=batch, rank=r, world=world,
                         producers=workers, buffer=10) for r in range(world)]  # fmt: skip
    rows = np.concatenate([p.rows for p in plans])
    assert sorted(rows.tolist()) == list(range(n))  # every row once, over ranks x workers
    assert len({p.steps for p in plans}) == 1  # every rank takes the same number of steps
    for plan in plans:
        sizes = np.diff(plan.bounds)
        assert sizes.min() >= 1 and sizes.max() <= batch
        assert sizes.max() - sizes.min() <= 1 or n < 2 * world  # no lone row: BatchNorm needs 2
        reads = plan.reads or []
        assert sorted(np.concatenate(reads).tolist()) == sorted(plan.rows.tolist())
        for p, part in enumerate(reads):  # a producer reads exactly the rows of its steps
            mine = [plan.step(j) for j in range(p, plan.steps, len(reads))]
            assert sorted(np.concatenate(mine).tolist()) == sorted(part.tolist())
    again = stream_plan(storage, shard_of, seed=5, batch=batch, world=world, producers=workers,
                        buffer=10)  # fmt: skip
    other = stream_plan(storage, shard_of, seed=6, batch=batch, world=world, producers=workers,
                        buffer=10)  # fmt: skip
    assert np.array_equal(again.rows, plans[0].rows)
    assert n < 20 or not np.array_equal(other.rows, plans[0].rows)


def test_worker_processes_deliver_each_train_image_once_per_epoch(sharded_index: Path) -> None:
    ds = _train(sharded_index, cache=False)
    assert not ds.cached and len(ds) == 90
    for seed in (1, 2):
        seen: Counter[int] = Counter()
        steps = []
        for rank in range(2):  # two DDP ranks, two workers each: what each process would load
            loader = EpochLoader(ds, batch_size=4, num_workers=2, rank=rank, world=2,
                                 shuffle_buffer=8)  # fmt: skip
            batches = [b[3].tolist() for b in loader.epoch(None, seed=seed)]
            workers = {p.pid for p in loader.loader._iterator._workers}  # type: ignore[union-attr]
            # persistent workers pick up the next epoch's plan: another order, same processes
            again = [b[3].tolist() for b in loader.epoch(None, seed=seed + 10)]
            assert again != batches and sorted(sum(again, [])) != []
            assert {p.pid for p in loader.loader._iterator._workers} == workers  # type: ignore[union-attr]
            seen.update(r for batch in batches for r in batch)
            steps.append(len(batches))
        assert seen == Counter(range(90))  # union over ranks x workers: all rows, no repeats
        assert steps[0] == steps[1]


def test_an_epoch_resumed_at_step_k_continues_with_the_same_batches(sharded_index: Path):
    ds = _train(sharded_index, cache=False)
    whole = [b for b in EpochLoader(ds, 8, num_workers=2, shuffle_buffer=16).epoch(None, 3)]
    for start in (1, 5):
        tail = list(EpochLoader(ds, 8, num_workers=2, shuffle_buffer=16).epoch(None, 3, start))
        assert len(tail) == len(whole) - start
        for a, b in zip(whole[start:], tail, strict=True):
            assert torch.equal(a[3], b[3]) and torch.equal(a[0], b[0])  # rows and pixels


def test_cached_and_streamed_splits_give_identical_samples(sharded_index: Path) -> None:
    tf = build_transforms(TrainConfig(image_size=16), train=False)
    cached = GeoDataset(sharded_index, "val", tf)
    streamed = GeoDataset(sharded_index, "val", tf, cache_bytes=0)
    assert cached.cached and not streamed.cached

    def by_row(ds: GeoDataset, workers: int) -> dict[int, torch.Tensor]:
        out = {}
        for images, _, _, rows in eval_loader(ds, 4, num_workers=workers):
            out.update(zip(rows.tolist(), images, strict=True))
        return out

    a, b = by_row(cached, 0), by_row(streamed, 2)
    assert sorted(a) == sorted(b) == list(range(len(cached)))
    assert all(torch.equal(a[r], b[r]) for r in a)


def test_an_unreadable_member_is_one_line_naming_it_and_the_rest_loads(sharded_index, caplog):
    ds = GeoDataset(sharded_index, "train", cache=False, unreadable="skip")  # as training does
    victim = 7
    shard = damage_member(sharded_index, "train", victim)
    with caplog.at_level(logging.WARNING, logger="geoloc.data.streaming"):
        rows = [r for b in EpochLoader(ds, 8).epoch(None, 0) for r in b[3].tolist()]
    assert sorted(rows) == [r for r in range(len(ds)) if r != victim]
    lines = [r.getMessage() for r in caplog.records if r.name == "geoloc.data.streaming"]
    assert len(lines) == 1
    assert ds.locations.member(victim) in lines[0] and str(shard) in lines[0]
    loader = EpochLoader(ds, 8, num_workers=2)  # marks made in worker processes come back
    for seed in (0, 1):
        list(loader.epoch(None, seed))
    assert loader.split.skipped == 1  # distinct images left out, not one per epoch
    with pytest.raises(DataError, match=ds.locations.member(victim)):  # readers that need all
        list(EpochLoader(GeoDataset(sharded_index, "train", cache=False), 8).epoch(None, 0))
    # a split decoded into memory leaves it out the same way when asked to skip
    skipping = GeoDataset(sharded_index, "train", cache=True, unreadable="skip")
    assert len(skipping) == len(ds) - 1
    with pytest.raises(DataError, match=ds.locations.member(victim)):
        GeoDataset(sharded_index, "train", cache=True)


def test_hard_negatives_on_a_streamed_split_are_refused_before_any_run(sharded_index, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    with pytest.raises(ConfigError, match="hardneg.*streamed.*train.cache_mb"):
        train_run(load_config(None, {**TINY, "hardneg.enabled": True}), progress=False)
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
    # the same split in memory draws them
    run = train_run(load_config(None, {**TINY, "hardneg.enabled": True, "hardneg.start_epoch": 0,
                                       "cache_mb": 64, "epochs": 1}), progress=False)  # fmt: skip
    assert RunPaths(run).last_checkpoint.is_file()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(RunPaths(run).last_checkpoint, weights_only=True)["model"]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    sharded_index: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 steps per epoch; last.pt every 4 steps; killed after step 18 (epoch 2, step 6): the
    resume starts at epoch 2, step 4 and ends with the very weights of an uninterrupted run."""
    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    cfg = {**TINY, "num_workers": workers, "checkpoint_every_steps": 4}
    whole = train_run(load_config(None, {**cfg, "name": "whole"}), progress=False)
    sets = [arg for k, v in {**cfg, "name": "cut"}.items() for arg in ("--set", f"{k}={v}")]
    env = dict(os.environ, GEOLOC_FAULT_AFTER="train:18")
    killed = subprocess.run([sys.executable, "-m", "geoloc", "train", *sets], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    cut = next(p for p in runs_dir().iterdir() if p.name.endswith(tuple("0123456789abcdef"))
               and "cut" in p.name)  # fmt: skip
    ckpt = torch.load(RunPaths(cut).last_checkpoint, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["extra"]["position"]["step"] == 4
    resumed = train_run(load_config(str(RunPaths(cut).config), {}), resume=cut, progress=False)
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_pushed_index_carries_its_shards_and_trains_from_the_bucket(
    sharded_index: Path, s3_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    url = s3_env.url("datasets/sharded")
    assert main(["s3", "push", "--index", url]) == 0
    listed = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="datasets/sharded/")
    keys = {o["Key"].removeprefix("datasets/sharded/") for o in listed["Contents"]}
    shards = index_shards(sharded_index / "images.parquet")
    assert len(shards) > 10 and keys == {"images.parquet", "splits.parquet", "labels.json",
                                          *(f"shards/{n}" for n in shards)}  # fmt: skip
    # the images stream from the bucket (ranged GETs, a client per worker process)
    tf = build_transforms(TrainConfig(image_size=16), train=False)
    local = GeoDataset(sharded_index, "val", tf, cache=False)
    remote = GeoDataset(sharded_index, "val", tf, cache=False, shards_url=url)
    a = {int(r): x for b in eval_loader(local, 4) for x, r in zip(b[0], b[3], strict=True)}
    b = {int(r): x for b in eval_loader(remote, 4, 2) for x, r in zip(b[0], b[3], strict=True)}
    assert sorted(a) == sorted(b) == list(range(len(local)))
    assert all(torch.equal(a[r], b[r]) for r in a)
    # another machine pulls the index with its shards, or without them
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv(DATA_DIR_ENV, str(elsewhere))
    assert main(["s3", "pull", "--index", url, "--no-images"]) == 0
    assert not (elsewhere / "processed").exists() and (elsewhere / "index/labels.json").is_file()
    assert main(["s3", "pull", "--index", url]) == 0
    pulled = sorted(p.name for p in (elsewhere / "processed/shards").iterdir())
    assert pulled == shards and not (elsewhere / "index/shards").exists()
    assert len(GeoDataset(elsewhere / "index", "train", cache=True)) == 90


@pytest.mark.slow  # ~40 s: two spawned ranks on a busy 2-core machine
def test_two_ranks_stream_their_parts_of_the_shards_to_the_end(sharded_index, monkeypatch):
    """DDP on a streamed split: each rank reads its part; both take the same number of steps,
    so the gradient all-reduce never waits forever, and the run completes; an image the rank
    reading it could not decode is counted once in the run's record."""
    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    damage_member(sharded_index, "train", 3)
    run = train_run(load_config(None, {**TINY, "name": "ddp", "epochs": 1, "nproc": 2}),
                    progress=False)
    summary = json.loads(RunPaths(run).summary.read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    assert summary["degraded"] is True and summary["skipped_images"]["train"] == 1
