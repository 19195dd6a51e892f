"""Two ingests of the same source at once lose nothing and store nothing twice: each journal
part is created exclusively (never replaced by a concurrent writer), and the second ingest of a
job waits for the first, then finds the work done."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from geoloc.data.state import Journal
from geoloc.paths import DataPaths


def test_two_writers_that_saw_the_same_parts_both_keep_their_rows(tmp_path: Path) -> None:
    first, second = Journal(tmp_path / "job"), Journal(tmp_path / "job")
    stale = first.parts()  # both decide on the next part number from the same listing
    second.append([{"key": "b", "n": 2}])
    first.parts = lambda: stale  # type: ignore[method-assign]
    first.append([{"key": "a", "n": 1}])
    assert sorted(Journal(tmp_path / "job").read()["key"]) == ["a", "b"]
    assert not list((tmp_path / "job").glob("*.tmp"))  # no temp file left behind


def test_writers_taking_turns_number_their_parts_in_order_and_replace_none(
    tmp_path: Path,
) -> None:
    first, second = Journal(tmp_path / "job"), Journal(tmp_path / "job")
    counts = [w.append([{"key": k}]) for w, k in zip([first, second] * 3, "abcdef", strict=True)]
    assert counts == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in first.parts()] == [f"part-{n:06d}.parquet" for n in range(6)]
    assert list(Journal(tmp_path / "job").read()["key"]) == list("abcdef")
    first.clear()
    assert first.append([{"key": "g"}]) == 1  # a cleared journal starts at part 0 again


def test_a_second_writer_of_a_job_waits_for_the_first(tmp_path: Path) -> None:
    holder, waiter = Journal(tmp_path / "job"), Journal(tmp_path / "job")
    holder.lock()
    got = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.lock(), got.set()), daemon=True)
    thread.start()
    assert not got.wait(1.0)  # still waiting while the first holds the job
    holder.unlock()
    assert got.wait(10)
    waiter.unlock()


def test_concurrent_ingests_of_one_source_keep_every_row_once(tmp_path: Path) -> None:
    from geoloc.data.demo import make_demo

    paths = DataPaths.default()
    make_demo(paths.demo, n=240, seed=1, min_population=200_000)
    cmd = [sys.executable, "-m", "geoloc", "data", "ingest", "demo", "--workers", "1",
           "--set", "max_side=32"]  # fmt: skip
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
        time.sleep(0.2)
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    manifest = pd.read_parquet(paths.processed_manifest)
    assert len(manifest) == manifest["sha256"].nunique()
    journals = list((paths.state / "ingest").iterdir())
    assert len(journals) == 1
    rows = Journal(journals[0]).read()
    assert rows["key"].is_unique  # each item journaled once
    members: Counter[str] = Counter()
    for shard in (paths.processed / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            members.update(tar.getnames())
    assert members and max(members.values()) == 1, members.most_common(3)
    accepted = int(outs[0].split(" = accepted ")[1].split()[0])
    assert len(manifest) == accepted
