"""The streamed merge of ingest journals (`geoloc.data.finalize`) gives the tables the whole-
journal merge gave: same manifest, same rejects, same counts, whatever the slice size.

A user relies on the merge not changing what an ingest means when it stopped holding the whole
journal in memory: which copy of repeated content is kept, which id wins, which rows replace
an earlier run's, and which reject rows leave rejects.parquet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from fixtures.finalize_reference import reference_finalize

from geoloc.data import rejects as R
from geoloc.data.digests import digests
from geoloc.data.finalize import finalize_journals, normalise_manifest
from geoloc.data.state import Journal
from geoloc.paths import DataPaths


def _accepted(ref: str, sha: str, source: str = "job", **extra) -> dict:
    return {"key": f"{source}\t{ref}", "source": source, "source_ref": ref, "status": "accepted",
            "sha256": sha * 64, "lat": 1.5, "lon": 2.5, "width": 8, "height": 6,
            "path": "processed/shards/j-00000.tar", "shard": "j-00000.tar",
            "member": f"{sha * 64}.jpg", "offset": 512, "length": 99,
            "exif_captured_at": "2020-01-02T03:04:05+00:00"} | extra  # fmt: skip


def _refused(ref: str, reason: str, stage: str = "process") -> dict:
    return {"key": f"job\t{ref}", "source": "job", "source_ref": ref, "status": "rejected",
            "reason": reason, "detail": f"{reason} detail", "stage": stage}  # fmt: skip


def _world(root: Path) -> tuple[DataPaths, list[Path], list[str]]:
    """A data folder with an earlier manifest and rejects, and a job journal of 3 parts."""
    paths = DataPaths(root)
    base = pd.DataFrame([
        _accepted("o1", "a", source="other", image_id="other-1", country="fr"),
        _accepted("o2", "b", source="other", image_id="taken"),
        _accepted("r5", "9", image_id="stale"),  # r5 accepted by an earlier run, now refused
    ]).assign(captured_at=None, sequence_id="s1")  # fmt: skip
    paths.processed_manifest.parent.mkdir(parents=True)
    normalise_manifest(base).to_parquet(paths.processed_manifest, index=False)
    paths.rejects.parent.mkdir(parents=True)
    old = pd.DataFrame(
        [("job", "r8", R.CORRUPT, "x", "process"), ("job", "zgone", R.MISSING_FILE, "x", "source"),
         ("other", "o9", R.CORRUPT, "x", "process")], columns=R.COLUMNS,
    )  # fmt: skip
    R.write_rejects(paths.rejects, old.iloc[:0], old)
    journal = Journal(paths.state / "ingest" / "job")
    journal.append([
        _accepted("r1", "c", country="de", sequence_id="q"),
        _accepted("r2", "a"),  # same content as other-1: a duplicate
        _refused("r3", R.MISSING_FILE, stage="source"),  # listed again and ingested below
        _accepted("r4", "d", image_id="taken"),  # id of other content: duplicate_id
        _refused("zgone", R.MISSING_FILE, stage="source"),  # not listed any more
    ])  # fmt: skip
    journal.append([
        _refused("r5", R.NAN_COORDS),
        _accepted("r6", "d", captured_at="2021-05-05T00:00:00Z"),  # d was refused by id: kept
        _accepted("r7", "c"),  # same content as r1 (this job): a duplicate
        _accepted("r8", "e", land_cover=3.0),
        _accepted("unlisted", "f"),  # journaled but not in the listing now: left out
    ])  # fmt: skip
    journal.append([_accepted("r3", "g", image_id="img-r3"), _refused("r10", R.CORRUPT)])
    keys = [f"job\t{r}" for r in ("r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r10", "r1")]
    return paths, [journal.folder], keys


@pytest.mark.parametrize("first_wins", [False, True])
@pytest.mark.parametrize("slice_rows", [2, 3, 65_536])
def test_streamed_merge_equals_the_whole_journal_merge(
    tmp_path: Path, slice_rows: int, first_wins: bool
) -> None:
    ref_paths, journals, keys = _world(tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "new")
    paths = DataPaths(tmp_path / "new")
    journals_new = [paths.state / "ingest" / "job"]
    read, accepted, duplicates = reference_finalize(journals, keys, ref_paths, first_wins)
    counts = finalize_journals(journals_new, digests(keys), paths,
                               first_listed_wins=first_wins, slice_rows=slice_rows)  # fmt: skip
    assert (counts.read, counts.accepted, counts.duplicates) == (read, accepted, duplicates)
    assert (read, accepted, duplicates) == (9, 4, 2)
    assert counts.reasons == {R.CORRUPT: 1, R.DUPLICATE_ID: 1, R.NAN_COORDS: 1}
    want = pd.read_parquet(ref_paths.processed_manifest)
    got = pd.read_parquet(paths.processed_manifest)
    pd.testing.assert_frame_equal(got, want)
    assert list(got["image_id"]) == sorted(got["image_id"])
    assert "stale" not in set(got["image_id"]) and "country" in got and "land_cover" in got
    rejects = pd.read_parquet(paths.rejects)
    pd.testing.assert_frame_equal(rejects, pd.read_parquet(ref_paths.rejects))
    assert "zgone" not in set(rejects["source_ref"]) and "o9" in set(rejects["source_ref"])
    assert not list((paths.state / "merge").iterdir())  # no temp runs or buckets left


def test_merging_nothing_leaves_an_empty_valid_manifest(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path)
    counts = finalize_journals([paths.state / "ingest" / "none"], digests([]), paths)
    assert (counts.read, counts.accepted, counts.rejected) == (0, 0, 0)
    assert len(pd.read_parquet(paths.processed_manifest)) == 0
    assert len(pd.read_parquet(paths.rejects)) == 0


def test_a_merge_killed_midway_leaves_nothing_the_next_merge_keeps(tmp_path: Path) -> None:
    """A merge SIGKILLed mid-way leaves temp runs under data/state/merge/ (manifest.parquet is
    replaced atomically, never half written): the next merge removes them."""
    import subprocess
    import sys

    paths, journals, keys = _world(tmp_path)
    folder = paths.state / "merge"
    folder.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from geoloc.atomic import temp_path; "
            "p = temp_path(Path(sys.argv[1]) / 'run-0.parquet'); p.write_bytes(b'x'); print(p)")
    left = Path(subprocess.run([sys.executable, "-c", code, str(folder)], check=True,
                               capture_output=True, text=True).stdout.strip())  # fmt: skip
    assert left.is_file()  # its writer is gone now
    counts = finalize_journals(journals, digests(keys), paths)
    assert counts.accepted == 4
    assert not list(folder.iterdir())


def test_a_key_journaled_twice_in_one_part_takes_its_last_row(tmp_path: Path) -> None:
    """A resumed job may journal a key again in the same part (a source reject redone once the
    file is there): the merge takes the later verdict, as the whole-journal merge did."""
    paths = DataPaths(tmp_path)
    journal = Journal(paths.state / "ingest" / "job")
    journal.append([
        _refused("r1", R.MISSING_FILE, stage="source"), _accepted("r2", "b"),
        _accepted("r1", "a", image_id="img-r1"), _accepted("r2", "c"),
    ])  # fmt: skip
    keys = ["job\tr1", "job\tr2"]
    counts = finalize_journals([journal.folder], digests(keys), paths)
    assert (counts.read, counts.accepted, counts.rejected) == (2, 2, 0)
    got = pd.read_parquet(paths.processed_manifest)
    stored = dict(zip(got["source_ref"], got["sha256"], strict=True))
    assert stored == {"r1": "a" * 64, "r2": "c" * 64}
    assert len(pd.read_parquet(paths.rejects)) == 0
