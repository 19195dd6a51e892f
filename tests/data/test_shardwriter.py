"""The shard writer: plain tars any tool reads, equal content stored once, and a writer killed
after its last commit resumes to the very bytes of one that was not."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from fixtures.shards import random_blobs, shard_tree

from geoloc.data.imagestore import ImageLocations, ShardError
from geoloc.data.shardwriter import ShardWriter


def test_members_are_read_back_by_offset_and_by_any_tar_tool(tmp_path: Path) -> None:
    blobs = random_blobs(20)
    writer = ShardWriter(tmp_path, "job", max_bytes=6 * 1024)
    members = [writer.add(sha, data) for sha, data in blobs]
    writer.close()
    shards = sorted(tmp_path.glob("job-*.tar"))
    assert len(shards) == 5  # 4 members of 1.5 KiB (header + padded data) in 6 KiB
    assert all(p.stat().st_size <= 6 * 1024 + 1024 for p in shards)  # + the end-of-archive
    for (sha, data), m in zip(blobs, members, strict=True):
        with tarfile.open(tmp_path / m.shard) as tar:  # a plain tar: the stdlib lists it
            assert tar.extractfile(m.member).read() == data  # type: ignore[union-attr]
        with open(tmp_path / m.shard, "rb") as fh:
            fh.seek(m.offset)
            assert fh.read(m.length) == data and m.member == f"{sha}.jpg"
    # the same content again is not stored twice
    again = ShardWriter(tmp_path, "job", 6 * 1024, members)
    assert again.add(*blobs[3]) == members[3]
    again.close()
    assert sorted(tmp_path.glob("job-*.tar")) == shards


def test_a_writer_killed_after_its_last_commit_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    blobs = random_blobs(30)
    whole = ShardWriter(tmp_path / "whole", "job", 8 * 1024)
    for sha, data in blobs:
        whole.add(sha, data)
    whole.close()

    first = ShardWriter(tmp_path / "cut", "job", 8 * 1024)
    committed = [first.add(sha, data) for sha, data in blobs[:17]]
    first.commit()
    for sha, data in blobs[17:23]:  # written, never journaled: the kill came first
        first.add(sha, data)
    first.abort()
    resumed = ShardWriter(tmp_path / "cut", "job", 8 * 1024, committed)
    for sha, data in blobs[17:]:
        resumed.add(sha, data)
    resumed.close()
    assert shard_tree(tmp_path / "cut") == shard_tree(tmp_path / "whole")


def test_a_shard_cut_after_it_was_committed_is_named_and_fresh_stores_it_again(tmp_path):
    blobs = random_blobs(6)
    writer = ShardWriter(tmp_path, "job", 1 << 20)
    members = [writer.add(sha, data) for sha, data in blobs]
    writer.close()
    shard = tmp_path / members[0].shard
    os.truncate(shard, members[3].offset)  # the disk lost the end of the shard
    with pytest.raises(ShardError, match=f"{shard.name}.*cut after it was written.*--fresh"):
        ShardWriter(tmp_path, "job", 1 << 20, members)
    again = ShardWriter(tmp_path, "job", 1 << 20, members, drop_lost=True)
    stored = [again.add(sha, data) for sha, data in blobs]
    again.close()
    assert stored[:3] == members[:3]  # what survived is kept where it was
    table = pd.DataFrame([{"path": m.shard, **m.__dict__} for m in stored])
    locations = ImageLocations(table, tmp_path)
    assert [locations.read(i) for i in range(6)] == [d for _, d in blobs]
