"""The image-folder listing of published datasets (`ImageLookup`): compact, yet it finds each
name where a plain sorted walk would, with the same repeats and refusals."""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from pathlib import Path

import pytest
from fixtures.listing_reference import reference_listing

from geoloc.data.sources.archive import ArchiveOrder, ImageLookup, ZipMember
from geoloc.data.sources.folder import IMAGE_SUFFIXES

SUFFIXES = frozenset(s.lower() for s in IMAGE_SUFFIXES)


def _zip(path: Path, names: list[str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"jpeg bytes")


def _tricky_folder(root: Path, outside: Path) -> list[str]:
    """Equal names across folders, suffixes and zips, hidden entries, links and a FIFO."""
    for rel in ("a.png", "a.jpg", "a.JPG", "b/a.jpg", "b/c.jpeg", "b/d/e.jpg", "c/a.jpg",
                "c/c.jpeg", "c/z.jpg", ".hidden/h.jpg", "b/.x.jpg", "b/notes.txt",
                "b/d/f.Jpg", "zz/y.jpg.jpg"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"jpeg bytes")
    outside.write_bytes(b"jpeg bytes")
    (root / "c" / "out.jpg").symlink_to(outside)  # a link leading out: refused
    (root / "b" / "in.jpg").symlink_to(root / "c" / "z.jpg")  # a link that stays inside: fine
    (root / "c" / "linked").symlink_to(root / "b", target_is_directory=True)  # not entered
    os.mkfifo(root / "b" / "pipe.jpg")
    os.mkfifo(root / "c" / "e.jpg")  # refused, yet b/d/e.jpg is found under that name
    _zip(root / "b" / "01.zip", ["m/z.jpg", "m/k.jpg", "n/k.png", "../up.jpg", "q.jpg/"])
    _zip(root / "00.zip", ["k.jpg", "deep/in/s.JPEG", "a.jpg", "s.jpg"])
    (root / "02.zip").write_bytes(b"not a zip")
    return ["a", "b", "c", "d", "e", "f", "h", "x", "z", "k", "s", "m", "in", "out", "pipe",
            "up", "y.jpg", "y", "notes", "q"]  # fmt: skip


def test_the_compact_listing_finds_each_name_where_a_sorted_walk_does(tmp_path: Path) -> None:
    root = tmp_path / "images"
    names = _tricky_folder(root, tmp_path / "outside.jpg")
    lookup = ImageLookup.scan(root, IMAGE_SUFFIXES)
    ref = reference_listing(root, SUFFIXES)
    assert {n: lookup.find(n) for n in names} == {n: ref["found"].get(n) for n in names}
    assert lookup.refused == ref["refused"]
    assert (len(lookup.files), len(lookup.members)) == (ref["files"], ref["members"])
    assert lookup.repeats == ref["repeats"] and lookup.archives == ref["archives"]
    # what the reference says, spelled out: sorted path order, loose files before zips
    assert lookup.find("a") == root / "a.JPG"
    assert lookup.find("k") == ZipMember(root / "00.zip", "k.jpg", 0)
    assert lookup.find("z") == root / "c" / "z.jpg"
    assert lookup.find("e") == root / "b" / "d" / "e.jpg"
    assert set(lookup.refused) == {"out", "pipe", "e", "up"}
    assert list(lookup.bad_archives) == [root / "02.zip"]


def test_a_flat_folder_of_many_images_lists_every_one(tmp_path: Path) -> None:
    ids = [str(10**14 + 7 * i) for i in range(3000)]
    for i in ids:
        (tmp_path / f"{i}.jpg").touch()
    lookup = ImageLookup.scan(tmp_path, IMAGE_SUFFIXES)
    assert len(lookup.files) == 3000 and lookup.repeats == 0
    assert all(lookup.find(i) == tmp_path / f"{i}.jpg" for i in ids)
    assert lookup.find(str(10**14 + 1)) is None and lookup.find("") is None


def test_zipped_items_come_out_by_archive_then_stored_order_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ArchiveOrder, "BUFFER", 7)  # most items go through the disk
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rng = random.Random(0)
    archives = [tmp_path / name for name in ("b.zip", "a.zip", "a10.zip", "a2.zip")]
    added = [(ZipMember(rng.choice(archives), "m.jpg", rng.randrange(20)), i) for i in range(200)]
    order: ArchiveOrder[int] = ArchiveOrder()
    for member, item in added:
        order.add(member, item)
    got = list(order.items())
    # what a stable sort of everything in memory gives (the table order breaks ties)
    assert got == [i for m, i in sorted(added, key=lambda p: (str(p[0].archive), p[0].order))]
    assert not list(tmp_path.glob("geoloc-zipped-*"))  # the temporary folder is gone
