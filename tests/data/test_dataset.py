"""GeoDataset, transforms and loaders: what training and rerank rely on from the data side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from geoloc.config import TrainConfig
from geoloc.data.dataset import GeoDataset, build_transforms, make_loader
from geoloc.errors import DataError, IndexMissingError


def test_samples_carry_labels_from_splits_and_their_row(tiny_index: Path) -> None:
    cfg = TrainConfig(image_size=24)
    ds = GeoDataset(tiny_index, "val", build_transforms(cfg, train=False))
    assert len(ds) == 6
    for row in range(len(ds)):
        image, label, parent, index = ds[row]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        assert index == row
        image_id = ds.table.loc[row, "image_id"]
        assert label == int(image_id[1]) and parent == label % 2


def test_a_subset_of_rows_gives_those_images_cached_or_streamed(tiny_index: Path) -> None:
    """`rows` (rerank's val sample) keeps those images of the split, in order, and nothing else."""
    whole = GeoDataset(tiny_index, "val", None, cache=False)
    rows = [1, 4, 5]
    for cache in (True, False):
        ds = GeoDataset(tiny_index, "val", None, cache=cache, rows=rows)
        assert len(ds) == 3 and ds.labels.tolist() == whole.labels[rows].tolist()
        assert ds.table["image_id"].tolist() == whole.table["image_id"].iloc[rows].tolist()
        for i, row in enumerate(rows):
            assert torch.equal(ds[i][0], whole[row][0]) and ds[i][3] == i


def test_paths_are_relative_to_the_data_root(tiny_index: Path, tmp_path: Path) -> None:
    """An index copied with its data root elsewhere still finds its images."""
    moved = tmp_path / "elsewhere"
    (tiny_index.parent).rename(moved)
    ds = GeoDataset(moved / "index", "test", None, cache=False)
    assert ds[0][0].dtype == torch.uint8


def test_cached_and_uncached_samples_are_identical(tiny_index: Path) -> None:
    """Caching decoded pixels is an optimisation, never a change in what the model sees."""
    cfg = TrainConfig(image_size=32, augment=True)
    for train in (False, True):
        tf = build_transforms(cfg, train=train)
        cached = GeoDataset(tiny_index, "train", tf, cache=True)
        lazy = GeoDataset(tiny_index, "train", tf, cache=False)
        assert cached.cached and not lazy.cached
        for i in range(len(cached)):
            torch.manual_seed(i)
            a = cached[i][0]
            torch.manual_seed(i)
            b = lazy[i][0]
            assert torch.equal(a, b)


def test_eval_transform_is_deterministic_and_normalised(tiny_index: Path) -> None:
    tf = build_transforms(TrainConfig(image_size=32), train=False)
    ds = GeoDataset(tiny_index, "train", tf)
    a, b = ds[0][0], ds[0][0]
    assert torch.equal(a, b)
    assert -3.0 < float(a.mean()) < 3.0 and a.min() < 0 < a.max()


def test_same_seed_same_batches_even_with_workers(tiny_index: Path) -> None:
    """Augmented batches depend only on the seed, with or without worker processes."""
    tf = build_transforms(TrainConfig(image_size=24, augment=True), train=True)
    ds = GeoDataset(tiny_index, "train", tf)

    def batches(seed: int, workers: int) -> list[torch.Tensor]:
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=seed, num_workers=workers)
        return [torch.cat([x.flatten(), rows.float()]) for x, _, _, rows in loader]

    first, again = batches(3, 2), batches(3, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = batches(4, 2)
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_missing_index_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(IndexMissingError, match="nowhere"):
        GeoDataset(tmp_path / "nowhere", "train")


def test_empty_index_file_is_an_error_naming_it(tiny_index: Path) -> None:
    (tiny_index / "splits.parquet").write_bytes(b"")
    with pytest.raises(IndexMissingError, match="splits.parquet"):
        GeoDataset(tiny_index, "train")


def test_empty_split_is_an_error_naming_the_split(tiny_index: Path) -> None:
    splits = pd.read_parquet(tiny_index / "splits.parquet")
    splits.loc[splits["split"] == "val", "split"] = "train"
    splits.to_parquet(tiny_index / "splits.parquet", index=False)
    with pytest.raises(DataError, match="split 'val'.*no images"):
        GeoDataset(tiny_index, "val")


def test_unreadable_image_is_an_error_naming_the_file(tiny_index: Path) -> None:
    (tiny_index.parent / "processed" / "c0-0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="c0-0.png"):
        GeoDataset(tiny_index, "train", cache=True)
