"""A published dataset is read from inside its own folder only: an image that is a link to a
file outside it is a `path_escape` reject, a FIFO (or any non-regular file) named like an image
a `not_regular_file` reject; neither is read, and the ingest never blocks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
from fixtures.published_layouts import write_osv5m

from geoloc.paths import DataPaths


def test_osv5m_links_out_of_the_dataset_and_fifos_are_rejects(tmp_path: Path) -> None:
    osv = write_osv5m(tmp_path / "osv5m", n=6, form="folder")
    ids = list(osv.rows["id"])
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(osv.images[ids[0]])  # a real photo, just not the dataset's
    by_id = {p.stem: p for p in (osv.root / "images").rglob("*.jpg")}
    by_id[ids[0]].unlink()
    by_id[ids[0]].symlink_to(outside)
    by_id[ids[1]].unlink()
    os.mkfifo(by_id[ids[1]])  # opening it for reading would wait for a writer forever
    inside = by_id[ids[2]].with_name("inside-link.jpg")
    by_id[ids[2]].rename(inside)
    by_id[ids[2]].symlink_to(inside)  # a link that stays inside is fine

    done = subprocess.run(
        [sys.executable, "-m", "geoloc", "data", "ingest", str(osv.root), "--format", "osv5m",
         "--workers", "1"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "read 6 = accepted 4 + rejected 2" in done.stdout, done.stdout + done.stderr
    rejects = pd.read_parquet(DataPaths.default().rejects)
    refs = [ref.rsplit(":", 1)[-1] for ref in rejects["source_ref"]]
    reasons = dict(zip(refs, rejects["reason"], strict=True))
    assert reasons == {ids[0]: "path_escape", ids[1]: "not_regular_file"}
    manifest = pd.read_parquet(DataPaths.default().processed_manifest)
    assert ids[2] in set(manifest["image_id"]) and ids[0] not in set(manifest["image_id"])


def test_a_fifo_named_like_an_image_is_a_not_regular_file_reject_in_every_source(
    tmp_path: Path,
) -> None:
    from geoloc.data.sources import SourceReject, create_source

    root = tmp_path / "photos"
    root.mkdir()
    os.mkfifo(root / "pipe.jpg")
    (root / "photos.csv").write_text("path,lat,lon\npipe.jpg,45.0,7.0\n")
    for spec in (str(root / "photos.csv"), str(root)):
        entries = [e for e in create_source(spec).items() if "pipe" in e.source_ref]
        assert [type(e) for e in entries] == [SourceReject], spec
        assert entries[0].reason == "not_regular_file", spec


def _declare_size(archive: Path, member: str, size: int) -> None:
    """Make the central directory of `archive` declare `size` unpacked bytes for `member`, as
    a crafted zip does (the stored bytes stay small)."""
    data = bytearray(archive.read_bytes())
    at = data.rfind(b"PK\x01\x02")
    while at >= 0:
        name_len = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + name_len] == member.encode():
            data[at + 24 : at + 28] = size.to_bytes(4, "little")
            archive.write_bytes(bytes(data))
            return
        at = data.rfind(b"PK\x01\x02", 0, at)
    raise AssertionError(f"{member} not in {archive}")


def test_hostile_zip_members_are_rejects_with_reasons_and_the_rest_is_ingested(
    tmp_path: Path,
) -> None:
    osv = write_osv5m(tmp_path / "osv5m", n=9, form="zip", shards=1)
    ids = list(osv.rows["id"])
    photo = osv.images[ids[0]]
    names = [f"../../escape/{ids[0]}.jpg", f"/abs/{ids[1]}.jpg", *(f"{i}.jpg" for i in ids[2:5])]
    hostile = dict(zip(ids[:5], names, strict=True))
    good = osv.zips[0]
    with zipfile.ZipFile(good) as zf:  # the shard again, without the images made hostile
        kept = [(i, zf.read(i)) for i in zf.infolist() if Path(i.filename).stem not in hostile]
    with zipfile.ZipFile(good, "w") as zf:
        for info, data in kept:
            zf.writestr(info, data)
        zf.writestr(hostile[ids[0]], photo)  # a real photo, but named out of the archive
        zf.writestr(hostile[ids[1]], photo)
        link = zipfile.ZipInfo(hostile[ids[2]])
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # unzip would make a symlink
        zf.writestr(link, "/etc/passwd")
        fifo = zipfile.ZipInfo(hostile[ids[3]])
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, b"")
        zf.writestr(hostile[ids[4]], photo)
    _declare_size(good, hostile[ids[4]], 3 * 2**30)  # "3 GiB unpacked"

    done = subprocess.run(
        [sys.executable, "-m", "geoloc", "data", "ingest", str(osv.root), "--format", "osv5m",
         "--workers", "1"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read 9 = accepted 4 + rejected 5 + duplicates 0" in done.stdout, done.stdout
    rejects = pd.read_parquet(DataPaths.default().rejects)
    by_id = {row.source_ref.rsplit(":", 1)[-1]: row for _, row in rejects.iterrows()}
    reasons = {i: by_id[i]["reason"] for i in hostile}
    assert reasons == {ids[0]: "path_escape", ids[1]: "path_escape", ids[2]: "not_regular_file",
                       ids[3]: "not_regular_file", ids[4]: "decompression_bomb"}  # fmt: skip
    assert "symbolic link" in by_id[ids[2]]["detail"] and "3221225472" in by_id[ids[4]]["detail"]
    assert all(hostile[i] in by_id[i]["detail"] for i in hostile)  # the member is named
    manifest = pd.read_parquet(DataPaths.default().processed_manifest)
    assert sorted(manifest["image_id"]) == sorted(ids[5:])
