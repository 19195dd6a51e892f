"""Sharded ingestion: shards processed at the same time give the index of one-after-another."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from fixtures.demo_data import DEMO_FIXTURE_CONFIG

from geoloc.config import IndexConfig
from geoloc.data.index import build_index, index_fingerprint
from geoloc.data.ingest import ingest
from geoloc.data.shards import ingest_shards, merge_shards
from geoloc.errors import DataError
from geoloc.paths import DataPaths

N_IMAGES = 240
N_SHARDS = 3


def make_shards(root: Path, n_images: int = N_IMAGES, n_shards: int = N_SHARDS) -> list[str]:
    """Demo images dealt round-robin into `n_shards` folders; the first image is also copied
    into the last shard, so deduplication across shards has a winner to pick."""
    from geoloc.data.demo import make_demo

    demo = root / "demo"
    make_demo(demo, n=n_images, seed=1, min_population=200_000)
    shards = [root / f"shard_{i}" for i in range(n_shards)]
    for folder in shards:
        folder.mkdir(parents=True)
    images = sorted(demo.glob("demo_*.jpg"))
    for i, image in enumerate(images):
        shutil.copy(image, shards[i % n_shards] / image.name)
    shutil.copy(images[0], shards[-1] / "copy_of_first.jpg")
    return [str(s) for s in shards]


def index_tables(paths: DataPaths) -> dict[str, object]:
    """What a training run reads from an index, plus the processed manifest minus its refs."""
    manifest = pd.read_parquet(paths.processed_manifest)
    return {
        "images": pd.read_parquet(paths.images),
        "splits": pd.read_parquet(paths.splits),
        "labels": paths.labels.read_text(),
        "manifest": manifest.drop(columns=["source_ref"]),
        "refs": sorted(manifest["source_ref"]),
        "fingerprint": index_fingerprint(paths),
    }


def sequential_index(shards: list[str], root: Path, cfg: IndexConfig) -> DataPaths:
    """The plain way: ingest the shards one after another, then build the index."""
    paths = DataPaths(root)
    for spec in shards:
        ingest(spec, paths, cfg)
    build_index(paths, cfg)
    return paths


@pytest.fixture(scope="module")
def shard_specs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def plain(shard_specs: list[str], tmp_path_factory: pytest.TempPathFactory) -> DataPaths:
    return sequential_index(
        shard_specs, tmp_path_factory.mktemp("plain") / "data", IndexConfig(**DEMO_FIXTURE_CONFIG)
    )


def assert_same_index(got: DataPaths, want: DataPaths) -> None:
    a, b = index_tables(got), index_tables(want)
    for key in ("images", "splits", "manifest"):
        pd.testing.assert_frame_equal(a[key], b[key], obj=key)
    assert a["labels"] == b["labels"]
    assert a["refs"] == b["refs"]
    assert a["fingerprint"] == b["fingerprint"]


def test_shards_processed_in_parallel_give_the_sequential_index(
    shard_specs: list[str], plain: DataPaths, tmp_path: Path
) -> None:
    cfg = IndexConfig(**DEMO_FIXTURE_CONFIG)
    paths = DataPaths(tmp_path / "sharded")
    report = ingest_shards(shard_specs, paths, cfg, workers=2)
    build_index(paths, cfg)

    assert report.read == N_IMAGES + 1
    assert report.duplicates == 1 and report.accepted + report.rejected == N_IMAGES
    assert_same_index(paths, plain)
    # the copy in the last shard lost to the original in the first one, as sequentially
    manifest = pd.read_parquet(paths.processed_manifest)
    assert not manifest["source_ref"].str.endswith("copy_of_first.jpg").any()


def test_merging_again_is_idempotent_and_resumes_from_the_journals(
    shard_specs: list[str], plain: DataPaths, tmp_path: Path
) -> None:
    cfg = IndexConfig(**DEMO_FIXTURE_CONFIG)
    paths = DataPaths(tmp_path / "sharded")
    ingest_shards(shard_specs, paths, cfg, workers=1)
    again = ingest_shards(shard_specs, paths, cfg, workers=1)  # every shard already journaled
    build_index(paths, cfg)

    assert again.resumed == N_IMAGES + 1
    assert_same_index(paths, plain)


def test_merging_no_shards_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no shards"):
        merge_shards([], DataPaths(tmp_path / "data"))
