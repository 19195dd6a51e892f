"""A 2-rank DDP run killed mid-epoch resumes each rank's own random draws and ends bit-identical.

Each rank draws its own augmentation and dropout (`seed_everything(seed, rank)`); a mid-epoch
checkpoint must carry every rank's RNG state, not rank 0's for all (which resumed rank 1 on
rank 0's stream: a different run from the interrupted one).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from geoloc.config import RunConfig, load_config
from geoloc.errors import TrainingError
from geoloc.paths import DataPaths, runs_dir
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary
from geoloc.train.run import train_run

DDP_RESUME = {
    "name": "ddp-resume",
    "nproc": 2,
    "epochs": 2,
    "batch_size": 64,
    "image_size": 24,
    "arch": "multiscale_cnn", "width": 8, "depth": 3,
    "embed_dim": 32,
    "lr": 3e-3,
    "augment": True,  # drawn from each rank's own RNG stream
    "dropout": 0.2,  # likewise
    "checkpoint_every_steps": 3,  # ~8 steps per epoch on the demo fixture
    "tracking.enabled": False,
}


def _cfg() -> RunConfig:
    return load_config(None, DDP_RESUME)


@pytest.mark.slow
def test_two_ranks_killed_mid_epoch_resume_to_the_uninterrupted_run(
    demo_data: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = train_run(_cfg(), run_dir=runs_dir() / "whole", progress=False)

    cut = runs_dir() / "cut"
    monkeypatch.setenv("GEOLOC_FAULT_AFTER", "train:5")  # both ranks die after their 5th step
    with pytest.raises(TrainingError):
        train_run(_cfg(), run_dir=cut, progress=False)
    monkeypatch.delenv("GEOLOC_FAULT_AFTER")
    ckpt = torch.load(RunPaths(cut).last_checkpoint, weights_only=True)
    assert ckpt["extra"]["position"]["step"] == 3 and len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])

    assert train_run(_cfg(), resume=cut, progress=False) == cut
    assert read_summary(cut)["status"] == "completed"
    columns = ["epoch", "train_loss", "val_loss", "val_top1", "val_median_km", "lr"]
    pd.testing.assert_frame_equal(
        pd.read_csv(RunPaths(cut).metrics_csv)[columns],
        pd.read_csv(RunPaths(whole).metrics_csv)[columns],
    )
    a = torch.load(RunPaths(cut).last_checkpoint, weights_only=True)["model"]
    b = torch.load(RunPaths(whole).last_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
