"""The GPU path without a GPU: mixed precision through CPU bf16 autocast, channels_last, pinned
and persistent loaders. `python -m benchmarks gpu` is what measures it on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures.tiny_index import write_tiny_index
from fixtures.tiny_runs import TINY_MODEL_CONFIG
from torch import nn
from torch.utils.data import Dataset

from geoloc.compute import FP32, Compute, resolve_compute
from geoloc.config import TrainConfig, load_config
from geoloc.data.dataset import GeoDataset, build_transforms, make_loader
from geoloc.geo import LabelSpace
from geoloc.model import create_loss, create_model
from geoloc.runfolder.layout import RunPaths
from geoloc.train.epoch_loader import EpochLoader
from geoloc.train.run import train_run
from geoloc.train.steps import evaluate, train_one_epoch

CPU = torch.device("cpu")
BF16 = Compute("cpu", torch.bfloat16)


def test_amp_resolves_per_device_and_cpu_autocasts_only_when_bf16_is_asked() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    # the default (amp=true, amp_dtype=auto) is float32 on CPU: nothing changes for CPU runs
    assert resolve_compute(TrainConfig(), CPU, model) == FP32
    bf16 = resolve_compute(TrainConfig(amp_dtype="bf16"), CPU, model)
    assert bf16.amp_dtype == torch.bfloat16 and bf16.precision == "bf16"
    assert not bf16.grad_scaler().is_enabled()  # bf16 needs no loss scaling
    assert resolve_compute(TrainConfig(amp=False, amp_dtype="bf16"), CPU, model) == FP32
    assert not resolve_compute(TrainConfig(channels_last=True), CPU, model).channels_last


def _tiny_setup(index: Path) -> tuple[nn.Module, GeoDataset, GeoDataset, nn.Module, LabelSpace]:
    torch.manual_seed(0)
    labels = LabelSpace.from_json(index / "labels.json")
    tc = TrainConfig(image_size=32, augment=False)
    train = GeoDataset(index, "train", build_transforms(tc, train=True))
    val = GeoDataset(index, "val", build_transforms(tc, train=False))
    model = create_model(TINY_MODEL_CONFIG, labels.num_classes, labels.num_parents)
    return model, train, val, create_loss(tc, labels), labels


def test_one_step_and_evaluate_under_cpu_bf16_autocast(tmp_path: Path) -> None:
    """The autocast path computes in bf16 where autocast says so and still gives a finite loss,
    float32 metrics and predictions of the usual shape."""
    index = write_tiny_index(tmp_path / "data")
    model, train, val, criterion, labels = _tiny_setup(index)
    seen: list[torch.dtype] = []
    model.backbone.stem.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.neck[0].weight.detach().clone()
    result = train_one_epoch(
        model, make_loader(train, 6, shuffle=False, seed=0), criterion, opt, None,
        BF16.grad_scaler(), CPU, epoch=1, parent_loss_weight=0.5, compute=BF16,
        max_steps=1, progress=False,
    )  # fmt: skip
    assert seen == [torch.bfloat16]  # the conv ran in bf16
    assert np.isfinite(result.loss) and result.images == 6
    assert model.neck[0].weight.dtype == torch.float32  # parameters stay float32
    assert not torch.equal(model.neck[0].weight, before)  # and the step updated them
    assert (result.pred_labels >= 0).sum() == 6
    out = evaluate(model, make_loader(val, 4, shuffle=False, seed=0), criterion, labels, CPU,
                   parent_loss_weight=0.5, compute=BF16, progress=False)  # fmt: skip
    assert seen[-1] == torch.bfloat16
    assert all(np.isfinite(v) for k, v in out.metrics.items() if "km" not in k)
    assert out.metrics["val_loss"] > 0 and len(out.predictions) == len(val)
    assert out.predictions["prob"].dtype == np.float64
    assert out.predictions["topk_probs"].map(len).eq(labels.num_classes).all()


def test_amp_bf16_on_cpu_is_selectable_from_the_config(tmp_path: Path) -> None:
    """`train.amp=true train.amp_dtype=bf16 train.device=cpu` trains through autocast: a finite
    run whose first loss differs from the float32 run's at bf16 precision."""
    index = write_tiny_index(tmp_path / "data")
    base = {"name": "amp", "epochs": 1, "batch_size": 6, "image_size": 24, "augment": False,
            "arch": "multiscale_cnn", "width": 8, "depth": 3, "embed_dim": 16, "device": "cpu",
            "tracking.enabled": False, "index_dir": str(index)}  # fmt: skip
    losses = {}
    for dtype in ("auto", "bf16"):
        cfg = load_config(None, {**base, "amp": True, "amp_dtype": dtype})
        run = train_run(cfg, run_dir=tmp_path / dtype, progress=False)
        table = pd.read_csv(RunPaths(run).metrics_csv)
        assert np.isfinite(table[["train_loss", "val_loss", "val_top1"]].to_numpy()).all()
        losses[dtype] = float(table["train_loss"].iloc[0])
    assert losses["bf16"] != losses["auto"]
    assert losses["bf16"] == pytest.approx(losses["auto"], rel=0.05)


def test_channels_last_batches_and_model_give_the_same_outputs() -> None:
    torch.manual_seed(0)
    model = create_model(TINY_MODEL_CONFIG, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)["logits"]
        nhwc = Compute("cpu", None, channels_last=True)
        nhwc.prepare_model(model)
        batch = nhwc.images(x, CPU)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(batch)["logits"], expected, atol=1e-5)
    features = torch.randn(2, 7)  # stored features (2-D) are left as they are
    assert nhwc.images(features, CPU).is_contiguous()


def test_loader_pins_memory_only_when_asked(tmp_path: Path) -> None:
    ds = GeoDataset(write_tiny_index(tmp_path / "data"), "val", build_transforms(TrainConfig(),
                    train=False))  # fmt: skip
    assert not make_loader(ds, 2, shuffle=False, seed=0, pin_memory=False).pin_memory
    assert make_loader(ds, 2, shuffle=False, seed=0, pin_memory=True).pin_memory
    assert not make_loader(ds, 2, shuffle=False, seed=0).persistent_workers  # no workers
    assert make_loader(ds, 2, shuffle=False, seed=0, num_workers=1).persistent_workers


class _Draws(Dataset):
    """Row -> (a draw from torch's RNG, as augmentation would take, the loading process)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int]:
        return torch.rand(1), row, os.getpid()


def _epoch(loader: EpochLoader, rows: list[int], seed: int) -> tuple[dict, set]:
    draws, pids = {}, set()
    for values, batch_rows, batch_pids in loader.epoch(rows, seed):
        draws.update(zip(batch_rows.tolist(), values[:, 0].tolist(), strict=True))
        pids.update(batch_pids.tolist())
    return draws, pids


def test_training_workers_persist_and_draw_per_sample_seeds() -> None:
    """One loader for the whole run: the same worker processes every epoch, and an image's
    random draws depend on (epoch seed, row) only: not on the worker count or the order."""
    rows = list(range(8))
    two = EpochLoader(_Draws(), batch_size=2, num_workers=2)
    first, pids_1 = _epoch(two, rows, seed=11)
    again, pids_2 = _epoch(two, rows[::-1], seed=11)
    other, pids_3 = _epoch(two, rows, seed=12)
    assert pids_1 == pids_2 == pids_3 and os.getpid() not in pids_1 and len(pids_1) == 2
    assert again == first  # same seed, other order: the same draws per row
    assert all(other[r] != first[r] for r in rows)  # another epoch draws anew
    one, _ = _epoch(EpochLoader(_Draws(), batch_size=3, num_workers=1), rows, seed=11)
    assert one == first


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_fails_loudly_without_cuda(repo_root: Path) -> None:
    """`python -m benchmarks gpu` on a machine without a GPU: exit 2 and one line saying why."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "gpu"], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is available" in lines[0]
    assert "NVIDIA GPU" in lines[0]


@pytest.mark.slow
def test_compiled_training_matches_eager_training(tmp_path: Path) -> None:
    """`train.compile=true` trains through torch.compile (about 1.5 min of compiling on 2 busy
    cores) and ends where the eager run ends."""
    index = write_tiny_index(tmp_path / "data")
    base = {"name": "compile", "epochs": 2, "batch_size": 4, "image_size": 24, "augment": False,
            "arch": "multiscale_cnn", "width": 8, "depth": 3, "embed_dim": 16, "dropout": 0.0,
            "device": "cpu",
            "tracking.enabled": False, "index_dir": str(index)}  # fmt: skip
    tables = []
    for compiled in (False, True):
        cfg = load_config(None, {**base, "compile": compiled})
        run = train_run(cfg, run_dir=tmp_path / str(compiled), progress=False)
        tables.append(pd.read_csv(RunPaths(run).metrics_csv)[["train_loss", "val_loss"]])
    assert np.allclose(tables[0].to_numpy(), tables[1].to_numpy(), rtol=1e-4)
