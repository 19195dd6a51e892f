"""A run's summary.json tells the truth: a stage that fails after training leaves `failed` with
its reason (never `completed`), a run whose trainer was killed does not stay `running` for
ever, and training refuses splits made from other images than the index holds."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fixtures.sharded_index import damage_member

from geoloc.cli import main
from geoloc.compose.training import run_training
from geoloc.config import load_config
from geoloc.integrations.mlflow import discover_runs
from geoloc.paths import DataPaths
from geoloc.presentation.leaderboard import read_runs
from geoloc.runfolder.summary import (
    ABANDONED_REASON,
    TRAINING_LOCK,
    hold_training_lock,
    read_summary,
)

TINY = {"epochs": 1, "batch_size": 32, "image_size": 32,
        "arch": "multiscale_cnn", "width": 8, "depth": 3,
        "embed_dim": 32, "tracking.enabled": False}  # fmt: skip


def test_a_rerank_that_fails_after_training_leaves_the_run_failed(demo_data: DataPaths) -> None:
    def step(name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if name == "evaluate-rerank":
            raise OSError("gallery shard unreadable")  # what a damaged store does mid-stage
        return fn(*args, **kwargs)

    cfg = load_config(None, {**TINY, "name": "rerank-fails"})
    with pytest.raises(OSError, match="gallery"):
        run_training(cfg, progress=False, step=step)
    (run_dir,) = discover_runs()
    summary = read_summary(run_dir)
    assert summary["status"] == "failed"
    assert summary["failure_reason"].startswith("evaluate-rerank: OSError: gallery")


def kill_holder_of(run_dir: Path) -> None:
    """A training process that took the run's lock, then died by SIGKILL before its end."""
    code = (
        "import os, signal; from geoloc.runfolder.summary import hold_training_lock; "
        f"hold_training_lock({str(run_dir)!r}); os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ}, timeout=120)
    assert done.returncode == -9


def test_a_run_whose_trainer_was_killed_is_marked_failed_by_the_next_listing(
    make_run: Callable[..., Path],
) -> None:
    dead = make_run("killed-early", status="running", with_checkpoints=False)
    kill_holder_of(dead)
    alive = make_run("still-training", status="running", with_checkpoints=False)
    held = hold_training_lock(alive)  # a live trainer
    try:
        old = make_run("pre-lock", status="running", with_checkpoints=False)  # no lock file
        discover_runs()
        assert read_summary(dead)["status"] == "failed"
        assert read_summary(dead)["failure_reason"] == ABANDONED_REASON
        assert read_summary(alive)["status"] == "running"
        assert read_summary(old)["status"] == "running"  # cannot tell: left alone
        with pytest.raises(Exception, match="being trained by another process"):
            hold_training_lock(alive)
    finally:
        held.close()
    assert (alive / TRAINING_LOCK).is_file()
    rows, skipped = read_runs(alive.parent)  # the leaderboard sees the trainer gone too
    assert {r["run_id"] for r in rows} >= {dead.name, alive.name}
    assert read_summary(alive)["status"] == "failed"
    assert [s.run_id for s in skipped] == [old.name]


def test_training_refuses_splits_made_from_other_images(
    demo_data_copy: DataPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    # an index build cut after its images stage: a new images.parquet beside the old splits
    images = pd.read_parquet(demo_data_copy.images)
    images.iloc[:-1].to_parquet(demo_data_copy.images, index=False)
    args = [a for k, v in TINY.items() for a in ("--set", f"{k}={str(v).lower()}")]
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: index file") and "made from another 'images.parquet'" in err
    assert not any(Path(os.environ["GEOLOC_RUNS_DIR"]).glob("*/summary.json"))


def test_images_left_out_for_damaged_shards_are_counted_and_the_run_marked_degraded(
    sharded_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geoloc.compose.training import write_report
    from geoloc.paths import DATA_DIR_ENV
    from geoloc.runfolder.layout import RunPaths
    from geoloc.train.run import train_run

    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    damage_member(sharded_index, "val", 1)
    damage_member(sharded_index, "test", 0)
    cfg = load_config(None, {"epochs": 1, "batch_size": 8, "image_size": 16, "cache_mb": 64,
                             "arch": "multiscale_cnn", "width": 8, "depth": 3,
                             "embed_dim": 16})  # fmt: skip
    run_dir = train_run(cfg, progress=False)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["degraded"] is True
    assert summary["skipped_images"] == {"train": 0, "val": 1, "test": 1}
    write_report(run_dir)
    assert "**Degraded**: unreadable images left out (train 0, val 1, test 1)" in (
        RunPaths(run_dir).report.read_text()
    )


def test_a_streamed_run_that_skipped_damaged_training_images_says_so_everywhere(
    sharded_index: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's headline case: a train split streamed from its shards (larger than
    train.cache_mb) with damaged members counts the distinct images it trained without, and the
    summary, dashboard, epoch line and leaderboard tell that run from a healthy one."""
    import pandas as pd

    from geoloc.compose.training import write_report
    from geoloc.paths import DATA_DIR_ENV
    from geoloc.presentation.leaderboard import aggregate_runs
    from geoloc.runfolder.layout import RunPaths
    from geoloc.train.run import train_run

    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    cfg = {"epochs": 2, "batch_size": 8, "image_size": 16, "cache_mb": 0, "shuffle_buffer": 16,
           "arch": "multiscale_cnn", "width": 8, "depth": 3, "embed_dim": 16, "device": "cpu",
           "tracking.enabled": False, "rerank.enabled": False}  # fmt: skip
    healthy = train_run(load_config(None, {**cfg, "name": "healthy"}), progress=False)
    damage_member(sharded_index, "train", 2)
    damage_member(sharded_index, "train", 5)
    with caplog.at_level(logging.INFO, logger="geoloc.progress"):
        degraded = train_run(load_config(None, {**cfg, "name": "damaged"}), progress=False)
    summary = read_summary(degraded)
    assert summary["status"] == "completed" and summary["degraded"] is True
    # two damaged members, read in each of 2 epochs: 2 distinct images, not 4
    assert summary["skipped_images"]["train"] == 2
    assert "epoch 2/2" in caplog.text and "2 unreadable training images skipped" in caplog.text
    assert read_summary(healthy)["degraded"] is False
    for run_dir in (healthy, degraded):
        write_report(run_dir)
    page = RunPaths(degraded).dashboard.read_text()
    assert 'id="degraded"' in page and "train 2, val 0, test 0" in page
    assert 'id="degraded"' not in RunPaths(healthy).dashboard.read_text()
    result = aggregate_runs()
    assert result.csv_path is not None
    board = pd.read_csv(result.csv_path).set_index("run_id")["unreadable_images"]
    assert board[degraded.name] == 2 and board[healthy.name] == 0
    assert result.dashboard_path is not None
    assert "2 (degraded)" in result.dashboard_path.read_text()
