"""Processed images in tar shards: few files, plain tars, resumable, checked when read."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from fixtures.shards import random_blobs, shard_tree
from PIL import Image

from geoloc.config import IndexConfig
from geoloc.data.imagestore import ImageLocations, Member, ShardError, shard_problems
from geoloc.data.index import build_index
from geoloc.data.ingest import ingest
from geoloc.data.shardwriter import ShardWriter
from geoloc.paths import DataPaths


def _locations(members: list[Member], root: Path) -> ImageLocations:
    table = pd.DataFrame([{"path": m.shard, **m.__dict__} for m in members])
    return ImageLocations(table, root)


def test_a_truncated_or_corrupt_shard_names_itself_and_the_others_still_read(tmp_path: Path):
    blobs = random_blobs(12)
    writer = ShardWriter(tmp_path, "job", 3 * 1024)
    members = [writer.add(sha, data) for sha, data in blobs]
    writer.close()
    by_shard: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_shard.setdefault(m.shard, []).append(i)
    cut, bad, *good = sorted(by_shard)
    os.truncate(tmp_path / cut, members[by_shard[cut][1]].offset + 10)
    with open(tmp_path / bad, "r+b") as fh:  # flip bytes inside the second member's data
        fh.seek(members[by_shard[bad][1]].offset + 5)
        fh.write(b"\xff\x00\xff")
    locations = _locations(members, tmp_path)
    with pytest.raises(ShardError, match=f"member {members[by_shard[cut][1]].member} of shard "
                                         f"'.*{cut}'.*cut short"):  # fmt: skip
        locations.read(by_shard[cut][1])
    with pytest.raises(ShardError, match=f"{members[by_shard[bad][1]].member}.*{bad}.*sha256"):
        locations.read(by_shard[bad][1])
    # a sequential pass yields the error in place of the unusable members and reads on
    got = dict(locations.iter_bytes(locations.storage_order()))
    unusable = {r for r, v in got.items() if isinstance(v, ShardError)}
    assert unusable == {*by_shard[cut][1:], by_shard[bad][1]}
    for i in set(range(12)) - unusable:
        assert got[i] == blobs[i][1]
    need = max(members[i].offset + members[i].length for i in by_shard[cut])
    size = (tmp_path / cut).stat().st_size
    assert shard_problems(locations_table(members), tmp_path) == [
        f"shard '{tmp_path / cut}' is cut short: {size} bytes, its {len(by_shard[cut])} images "
        f"need {need}"
    ]


def locations_table(members: list[Member]) -> pd.DataFrame:
    return pd.DataFrame([{"path": m.shard, **m.__dict__} for m in members])


# ------------------------------------------------------------------------------------------
# ingest into shards
# ------------------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path: Path, write_image) -> Path:
    root = tmp_path / "photos"
    for i in range(60):
        write_image(root / f"p{i:03d}.jpg", -50 + i, -170 + 5 * i, size=(48, 48), seed=i)
    write_image(root / "zz_copy.jpg", -50, -170, size=(48, 48), seed=0)  # same pixels as p000
    return root


def test_ingest_stores_images_in_a_few_shards_with_their_place_in_the_manifest(photos: Path):
    paths = DataPaths.default()
    report = ingest(str(photos), paths, IndexConfig(workers=1, max_side=64, shard_size_mb=1))
    assert (report.accepted, report.duplicates) == (60, 1)
    files = [p for p in paths.processed.rglob("*") if p.is_file()]
    shards = sorted(p for p in files if p.suffix == ".tar")
    assert len(files) == len(shards) + 1  # the shards and manifest.parquet, nothing per image
    m = pd.read_parquet(paths.processed_manifest)
    assert set(m["path"]) == {f"processed/shards/{p.name}" for p in shards}
    locations = ImageLocations(m, paths.root)
    for i, row in enumerate(m.itertuples()):
        data = locations.read(i)
        assert hashlib.sha256(data).hexdigest() == row.sha256
        with Image.open(io.BytesIO(data)) as im:
            assert (im.width, im.height) == (row.width, row.height)
    # the duplicate was not stored twice: every member of every shard is one manifest row
    names = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    assert sorted(names) == sorted(m["member"])


def test_an_ingest_killed_mid_way_resumes_to_the_same_shards_and_manifest(photos, tmp_path):
    cmd = [sys.executable, "-c", "from geoloc.cli import run; run()", "data", "ingest",
           str(photos), "--set", "max_side=64", "--workers", "2", "--chunk-size", "8"]  # fmt: skip
    reference = tmp_path / "reference"
    env = dict(os.environ, GEOLOC_DATA_DIR=str(reference))
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=180).returncode == 0
    paths = DataPaths.default()
    killed = subprocess.run(cmd, env=dict(os.environ, GEOLOC_FAULT_AFTER="ingest:3"),
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    tail = paths.processed / "shards"
    # bytes of a chunk the journal never recorded, as a kill between the two writes leaves
    with open(next(tail.glob("*.tar")), "ab") as fh:
        fh.write(os.urandom(3000))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "24 resumed" in done.stdout
    assert shard_tree(tail) == shard_tree(reference / "processed" / "shards")
    pd.testing.assert_frame_equal(
        pd.read_parquet(paths.processed_manifest),
        pd.read_parquet(reference / "processed" / "manifest.parquet"),
    )


def test_a_missing_shard_is_reported_by_the_index_check(photos: Path, caplog) -> None:
    paths = DataPaths.default()
    cfg = IndexConfig(workers=1, max_side=64, resolution=1, parent_resolution=0,
                      split="random", min_images_per_class=1)  # fmt: skip
    ingest(str(photos), paths, cfg)
    m = pd.read_parquet(paths.processed_manifest)
    shard = paths.root / m["path"].iloc[0]
    shard.unlink()
    assert shard_problems(m, paths.root) == [f"shard '{shard}' is missing (60 images)"]
    with caplog.at_level(logging.WARNING, logger="geoloc.data.index"):
        build_index(paths, cfg)  # the index is built; the shard is named
    assert [r.getMessage() for r in caplog.records if r.name == "geoloc.data.index"] == [
        f"shard '{shard}' is missing (60 images): its images are in the index but cannot be read"
    ]
