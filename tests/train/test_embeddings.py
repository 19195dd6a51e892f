"""The frozen-backbone embedding cache: embed once, reuse, never stale, same results as computing
the features on the fly; rerank's gallery comes from the same stored features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures.counting_model import CALLS
from fixtures.tiny_index import write_tiny_index

from geoloc.config import TrainConfig, load_config
from geoloc.data.dataset import GeoDataset, build_transforms
from geoloc.errors import ConfigError
from geoloc.infer.outputs import compute_outputs, split_outputs
from geoloc.infer.trained import load_trained
from geoloc.runfolder.layout import RunPaths
from geoloc.train.checkpoint import load_checkpoint
from geoloc.train.embeddings import embed_split, embeddings_dir
from geoloc.train.run import train_run


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS["images"] = 0


@pytest.fixture
def index(tmp_path: Path) -> Path:
    return write_tiny_index(tmp_path / "data")  # 12 train, 6 val, 6 test images


def _cfg(index: Path, **overrides: Any) -> Any:
    base = {"name": "emb", "epochs": 2, "batch_size": 4, "image_size": 24, "lr": 3e-3,
            "arch": "counting_cnn", "embed_dim": 16, "freeze_backbone": True, "augment": False,
            "device": "cpu", "tracking.enabled": False, "index_dir": str(index)}  # fmt: skip
    return load_config(None, {**base, **overrides})


def _metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(RunPaths(run).metrics_csv).drop(columns=["epoch_time_s"])


def test_heads_on_stored_embeddings_train_like_the_online_frozen_run(
    index: Path, tmp_path: Path
) -> None:
    online = train_run(_cfg(index), run_dir=tmp_path / "online", progress=False)
    online_calls = CALLS["images"]
    CALLS["images"] = 0
    cached = train_run(_cfg(index, embeddings="cache"), run_dir=tmp_path / "cache", progress=False)
    assert CALLS["images"] == 24  # every image of the three splits, once
    assert online_calls > 24  # on the fly: every epoch and every evaluation again
    a, b = _metrics(online), _metrics(cached)
    assert np.isfinite(b["train_loss"]).all()
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-6)
    wa = load_checkpoint(RunPaths(online).best_checkpoint)["model"]
    wb = load_checkpoint(RunPaths(cached).best_checkpoint)["model"]
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key
    pa = pd.read_parquet(RunPaths(online).test_predictions)
    pb = pd.read_parquet(RunPaths(cached).test_predictions)
    assert (pa["pred_label"] == pb["pred_label"]).all()
    assert np.allclose(pa["prob"], pb["prob"], atol=1e-5)


def test_a_second_run_reuses_the_stored_embeddings(index: Path, tmp_path: Path) -> None:
    train_run(_cfg(index, embeddings="cache"), run_dir=tmp_path / "first", progress=False)
    folders = list(embeddings_dir(index).iterdir())
    assert len(folders) == 1
    files = {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()}
    assert {"key.json", "train-00000.npy", "train.manifest.json", "val.manifest.json",
            "test.manifest.json"} <= files.keys()  # fmt: skip
    manifest = json.loads((folders[0] / "train.manifest.json").read_text())
    assert manifest["rows"] == 12 and manifest["feature_dim"] == 8 + 16 + 32
    CALLS["images"] = 0
    second = train_run(_cfg(index, embeddings="cache", epochs=1), run_dir=tmp_path / "second",
                       progress=False)  # fmt: skip
    assert CALLS["images"] == 0  # the backbone never ran
    assert {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()} == files
    assert np.isfinite(_metrics(second)["train_loss"]).all()


def test_another_backbone_or_input_never_reuses_stale_embeddings(
    index: Path, tmp_path: Path
) -> None:
    train_run(_cfg(index, embeddings="cache", epochs=1), run_dir=tmp_path / "a", progress=False)
    CALLS["images"] = 0
    # another seed initialises another random backbone; another image size changes the input
    train_run(_cfg(index, embeddings="cache", epochs=1, seed=1), run_dir=tmp_path / "b",
              progress=False)  # fmt: skip
    train_run(_cfg(index, embeddings="cache", epochs=1, image_size=32), run_dir=tmp_path / "c",
              progress=False)  # fmt: skip
    assert CALLS["images"] == 2 * 24
    keys = [json.loads((d / "key.json").read_text()) for d in embeddings_dir(index).iterdir()]
    assert len(keys) == 3 and sorted(k["image_size"] for k in keys) == [24, 24, 32]


class _FailAfter:
    """An eval transform that breaks on its n-th image (an interrupted embedding pass)."""

    def __init__(self, transform: Any, n: int) -> None:
        self.transform, self.left = transform, n

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("interrupted")
        return self.transform(image)


def test_an_interrupted_pass_resumes_after_its_finished_shards(index: Path) -> None:
    cfg = _cfg(index, embeddings="cache")
    torch.manual_seed(0)
    from geoloc.model import create_model

    model = create_model(cfg.model, num_classes=3)
    tf = build_transforms(cfg.train, train=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        embed_split(model, GeoDataset(index, "train", _FailAfter(tf, 10)), cfg,
                    torch.device("cpu"), index, shard_rows=4, progress=False)  # fmt: skip
    folder = next(embeddings_dir(index).iterdir())
    assert sorted(p.name for p in folder.glob("train-*.npy")) == [
        "train-00000.npy", "train-00001.npy"
    ]
    assert not (folder / "train.manifest.json").exists()  # unfinished: never read as done
    CALLS["images"] = 0
    stored = embed_split(model, GeoDataset(index, "train", tf), cfg, torch.device("cpu"), index,
                         shard_rows=4, progress=False)  # fmt: skip
    assert CALLS["images"] == 4  # only the rows of the missing third shard
    with torch.no_grad():
        images = torch.stack([tf(GeoDataset(index, "train").raw_image(i)) for i in range(12)])
        expected = model.backbone(images)
    got = torch.stack([stored[i][0] for i in range(len(stored))])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [stored[i][1:] for i in (0, 11)] == [
        (int(stored.labels[0]), int(stored.parent_labels[0]), 0),
        (int(stored.labels[11]), int(stored.parent_labels[11]), 11),
    ]


def test_rerank_outputs_come_from_the_stored_embeddings(index: Path, tmp_path: Path) -> None:
    """The gallery of a cached run is built from the stored features, not a new backbone pass,
    and equals what a pass over the images would give."""
    run = train_run(_cfg(index, embeddings="cache", epochs=1), run_dir=tmp_path / "r",
                    progress=False)  # fmt: skip
    trained = load_trained(run)
    CALLS["images"] = 0
    out = split_outputs(trained, index, "train", RunPaths(run), key="k", use_cache=False,
                        progress=False)  # fmt: skip
    assert CALLS["images"] == 0
    direct = compute_outputs(trained.model, GeoDataset(index, "train", trained.transform()),
                             trained.device, progress=False)  # fmt: skip
    assert CALLS["images"] == 12
    assert np.allclose(out.embeddings, direct.embeddings, atol=1e-5)
    assert out.logits is None  # the train split is the gallery: no (images x classes) logits
    gallery = out.to_gallery()
    assert len(gallery) == 12 and gallery.dim == 16
    rows = np.array([1, 5, 6, 10])  # a sample (rerank's gallery or val sample): its rows only
    part = split_outputs(trained, index, "train", RunPaths(run), key="k", use_cache=False,
                         progress=False, rows=rows)  # fmt: skip
    assert CALLS["images"] == 12, "the sample is read from the stored features too"
    assert part.image_ids.tolist() == out.image_ids[rows].tolist()
    assert np.array_equal(part.embeddings, out.embeddings[rows])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"freeze_backbone": False}, "needs model.freeze_backbone=true"),
        ({"augment": True}, "set train.augment=false"),
        ({"nproc": 2}, "set train.nproc=1"),
    ],
)
def test_the_cache_refuses_settings_it_cannot_honour(
    index: Path, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg = _cfg(index, embeddings="cache", batch_size=4, **overrides)
        train_run(cfg, run_dir=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert TrainConfig().embeddings == "online"  # the cache is opt-in
