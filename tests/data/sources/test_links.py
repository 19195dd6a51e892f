"""A published dataset is read from inside its own folder only: an image that is a link to a
file outside it is a `path_escape` reject, a FIFO (or any non-regular file) named like an image
a `not_regular_file` reject; neither is read, and the ingest never blocks."""

from __future__ import annotations

import os
import subprocess
import sys
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
