"""Sharded ingestion: shards processed at the same time give the index of one-after-another."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from fixtures.demo_data import DEMO_FIXTURE_CONFIG
from fixtures.shards import N_IMAGES, assert_same_index, make_shards, sequential_index

from geoloc.config import IndexConfig
from geoloc.data.index import build_index
from geoloc.data.shards import ingest_shards, merge_shards
from geoloc.errors import DataError
from geoloc.paths import DataPaths


@pytest.fixture(scope="module")
def shard_specs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def plain(shard_specs: list[str], tmp_path_factory: pytest.TempPathFactory) -> DataPaths:
    return sequential_index(
        shard_specs, tmp_path_factory.mktemp("plain") / "data", IndexConfig(**DEMO_FIXTURE_CONFIG)
    )


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
